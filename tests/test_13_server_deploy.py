"""Phase 13: the server as people deploy it, on a tiny random model (token-id prompts, no tokenizer).

Checked, each against what OpenAI's API / vLLM do: a body over the size limit gets 413 (OpenAI's error
body) before it is read whole; ``--api-key`` guards ``/v1/*`` (401) but not ``/health`` or ``/metrics``;
the Host check refuses names outside ``allowed_hosts``; a bug's 500 hides its text and is counted; the 429
limit counts sequences (prompts x ``n``); streamed ``text_offset`` is cumulative and equals the
non-streamed one; ``continuous_usage_stats`` puts usage in every chunk; shutdown ends a stream with
``finish_reason: "abort"`` and ``[DONE]`` and a waiting non-streaming request with a JSON 503; the
vLLM-style metrics count what was served.
"""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from minivllm.llm import LLM
from minivllm.model.config import ModelConfig
from minivllm.sampling_params import SamplingParams
from minivllm.server import ServerThread, build_app

TINY = ModelConfig("qwen3", 256, 64, 128, 2, 4, 2, 16, 1e-6, 1e4, 256, True, True)
PROMPT = [5, 17, 33, 9]
NAME = "random-weights"


def _llm(**kwargs) -> LLM:
    return LLM(TINY, device="cpu", num_kv_blocks=64, **kwargs)


def _body(**extra) -> dict:
    return {"model": NAME, "prompt": PROMPT, "max_tokens": 4, "temperature": 0, **extra}


def _error(r: httpx.Response, status: int, code: str | None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["code"] == code, error
    return error


def _metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def _events(r: httpx.Response) -> list:
    lines = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]", lines[-3:]
    return [json.loads(line) for line in lines[:-1]]


@pytest.fixture(scope="module")
def served():
    llm = _llm()
    app = build_app(llm.engine, api_key="s3cret", allowed_hosts=["localhost", "127.0.0.1", "::1"],
                    max_request_bytes=4096)
    with ServerThread(app) as server:
        yield server, llm.engine
    llm.engine.check_no_leaks()


@pytest.fixture(scope="module")
def http(served):
    with httpx.Client(base_url=served[0].url, headers={"Authorization": "Bearer s3cret"}, timeout=60) as client:
        yield client


def test_api_key_guards_the_api_but_not_health_or_metrics(served, http):
    url = served[0].url
    _error(httpx.post(url + "/v1/completions", json=_body()), 401, "invalid_api_key")
    _error(httpx.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"}), 401, "invalid_api_key")
    _error(httpx.get(url + "/v1/models", headers={"Authorization": "s3cret"}), 401, "invalid_api_key")
    assert httpx.get(url + "/health").status_code == 200 and httpx.get(url + "/metrics").status_code == 200
    assert http.post("/v1/completions", json=_body()).status_code == 200
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()
    assert openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0).models.list().data[0].id == NAME


def test_host_header_must_be_an_allowed_name(served, http):
    port = served[0].port
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}"):
        assert http.get("/health", headers={"Host": host}).status_code == 200, host
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", "localhost.:80"):
        _error(http.get("/v1/models", headers={"Host": host}), 400, "invalid_host")


def test_a_body_over_the_limit_gets_413_and_the_server_goes_on(served, http):
    big = _body(prompt=[7] * 3000)  # ~9 kB of JSON > 4096 bytes
    _error(http.post("/v1/completions", json=big), 413, "request_too_large")

    def chunks():  # no Content-Length: the limit is enforced on the bytes as they arrive
        data = json.dumps(big).encode()
        for i in range(0, len(data), 1000):
            yield data[i:i + 1000]

    _error(http.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"}), 413,
           "request_too_large")
    assert http.post("/v1/completions", json=_body()).status_code == 200


def test_a_bug_answers_500_without_its_text_and_is_counted(served, http, monkeypatch):
    before = http.get("/metrics").text
    serving = served[0].app.state.serving

    def broken(prompt):
        raise RuntimeError("secret-internal-detail")

    monkeypatch.setattr(serving, "_completion_prompts", broken)
    r = http.post("/v1/completions", json=_body())
    error = _error(r, 500, "internal_error")
    assert "secret" not in r.text and "RuntimeError" not in r.text and error["type"] == "internal_error"
    after = http.get("/metrics").text
    assert _metric(after, "minivllm_internal_errors_total") == _metric(before, "minivllm_internal_errors_total") + 1
    key = 'minivllm_requests_total{endpoint="/v1/completions",status="500"}'
    assert _metric(after, key) == _metric(before, key) + 1


def test_streamed_text_offset_is_cumulative_and_usage_can_come_in_every_chunk(served, http):
    body = _body(max_tokens=6, logprobs=1, ignore_eos=True)
    whole = http.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]
    want = [sum(len(t) for t in whole["tokens"][:i]) for i in range(len(whole["tokens"]))]
    assert whole["text_offset"] == want
    events = _events(http.post("/v1/completions", json={**body, "stream": True, "stream_options": {
        "include_usage": True, "continuous_usage_stats": True}}))
    offsets = [o for e in events for c in e["choices"] for o in (c["logprobs"] or {}).get("text_offset", [])]
    assert offsets == want
    usages = [e["usage"] for e in events]
    assert all(u is not None for u in usages) and usages[-1]["completion_tokens"] == 6
    counts = [u["completion_tokens"] for u in usages]
    assert counts == sorted(counts) and counts[0] >= 1 and {u["prompt_tokens"] for u in usages} == {len(PROMPT)}
    plain = _events(http.post("/v1/completions", json={**body, "stream": True, "stream_options": {
        "include_usage": True}}))
    assert all(e["usage"] is None for e in plain[:-1]) and plain[-1]["usage"]["completion_tokens"] == 6


def test_metrics_count_latency_queue_time_finish_reasons_and_kv_usage(served, http):
    before = http.get("/metrics").text
    for _ in range(2):
        assert http.post("/v1/completions", json=_body(n=2, ignore_eos=True)).status_code == 200
    after = http.get("/metrics").text
    for name in ("minivllm_e2e_request_latency_seconds_count", "minivllm_request_queue_time_seconds_count"):
        assert _metric(after, name) == _metric(before, name) + 2, name  # per request (its n samples together)
    key = 'minivllm_request_success_total{finished_reason="length"}'
    assert _metric(after, key) == _metric(before, key) + 4  # per sample
    usage = _metric(after, "minivllm_kv_cache_usage_perc")
    assert 0.0 <= usage <= 1.0
    assert "minivllm_num_preemptions_total" in after


def test_admission_counts_sequences_not_prompts():
    llm = _llm(max_num_seqs=2, max_num_batched_tokens=64)
    engine, step, gate = llm.engine, llm.engine.step, threading.Event()
    engine.step = lambda: (gate.wait(timeout=60), step())[1]
    app = build_app(engine, max_queued_requests=1)  # at most 3 sequences in flight
    with ServerThread(app) as server, ThreadPoolExecutor(1) as pool:
        url = server.url + "/v1/completions"
        too_big = httpx.post(url, json=_body(prompt=[PROMPT, PROMPT], n=2), timeout=60)  # 4 sequences, never fit
        assert _error(too_big, 400, None)["param"] == "n"
        held = pool.submit(httpx.post, url, json=_body(n=2), timeout=60)
        deadline = time.monotonic() + 30
        while app.state.front.num_in_flight < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        _error(httpx.post(url, json=_body(n=2), timeout=60), 429, "rate_limit_exceeded")  # 2 + 2 > 3
        gate.set()
        assert held.result().status_code == 200 and len(held.result().json()["choices"]) == 2
        assert httpx.post(url, json=_body(n=2), timeout=60).status_code == 200
    engine.check_no_leaks()


def test_shutdown_ends_streams_with_abort_and_answers_waiting_requests_with_json_503():
    llm = _llm()
    engine, step = llm.engine, llm.engine.step
    engine.step = lambda: (time.sleep(0.01), step())[1]  # ~100 steps/s: 200 tokens take > 2 s
    app = build_app(engine, shutdown_grace_seconds=0.3)
    server = ServerThread(app).start()
    long = _body(max_tokens=200, ignore_eos=True, logprobs=0)
    with ThreadPoolExecutor(2) as pool:
        waiting = pool.submit(httpx.post, server.url + "/v1/completions", json=long, timeout=60)
        deadline = time.monotonic() + 30
        while app.state.front.num_in_flight < 1:  # NOTE: in the server before it stops, not refused at the door
            assert time.monotonic() < deadline
            time.sleep(0.01)
        lines: list[str] = []
        with httpx.stream("POST", server.url + "/v1/completions", json={**long, "stream": True, "n": 2},
                          timeout=60) as response:
            for line in response.iter_lines():
                if line:
                    lines.append(line)
                if len(lines) == 1:
                    stopper = threading.Thread(target=server.stop)
                    stopper.start()
        stopper.join(60)
        answer = waiting.result()
    assert lines[-1] == "data: [DONE]"
    reasons = {c["index"]: c["finish_reason"] for line in lines[:-1] for c in json.loads(line[6:])["choices"]
               if c["finish_reason"]}
    assert reasons == {0: "abort", 1: "abort"}
    _error(answer, 503, "service_unavailable")
    assert not server.thread.is_alive() and engine.num_unfinished_requests == 0
    engine.check_no_leaks()
