"""Phase 13: the async front of the engine (minivllm.server.async_engine) under stress, on a tiny random model.

A random-weight model has no tokenizer, so requests send token ids to ``/v1/completions``. The answer key
is ``LLM.generate`` on the same engine before the server owns it. Checked: an idle engine thread sleeps;
a full queue answers 429 with Retry-After; an engine exception fails only the request that caused it,
even when it shares a step with others; shutdown finishes or aborts in-flight requests and leaks nothing.
"""

import os
import signal
import socket
import subprocess
import sys
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
PROMPTS = [[5 + i, 17, 33 + 2 * i, 9] for i in range(4)]
POISON = 250  # a prompt starting with this token makes the model raise


def _llm(**kwargs) -> LLM:
    return LLM(TINY, device="cpu", num_kv_blocks=64, **kwargs)


def _complete(url: str, prompt: list[int], max_tokens: int = 5, **extra) -> httpx.Response:
    body = {"model": "random-weights", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
    return httpx.post(url + "/v1/completions", json=body, timeout=60)


def _gate(engine) -> threading.Event:
    """Make the engine thread wait at the start of each step until the returned event is set."""
    gate, step = threading.Event(), engine.step

    def gated_step():
        gate.wait(timeout=60)
        return step()

    engine.step = gated_step
    return gate


def _tokens(response: httpx.Response) -> list[int]:
    return [int(t.removeprefix("token_id:")) for t in response.json()["choices"][0]["logprobs"]["tokens"]]


def test_idle_engine_thread_sleeps_until_a_request_comes():
    llm = _llm()
    app = build_app(llm.engine)
    with ServerThread(app) as server:
        front = app.state.front
        assert _complete(server.url, PROMPTS[0]).status_code == 200
        time.sleep(0.1)
        woken = front.wakeups
        time.sleep(0.3)  # no requests: the thread must be blocked on its queue, not looping
        assert front.wakeups == woken
        assert _complete(server.url, PROMPTS[1]).status_code == 200
        assert front.wakeups > woken


def test_a_full_queue_answers_429_with_retry_after_and_recovers():
    llm = _llm(max_num_seqs=2, max_num_batched_tokens=64)
    want = llm.generate(PROMPTS[:3], SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)
    gate = _gate(llm.engine)
    app = build_app(llm.engine, max_queued_requests=1)  # 2 running + 1 waiting, then 429
    with ServerThread(app) as server, ThreadPoolExecutor(3) as pool:
        held = [pool.submit(_complete, server.url, p, logprobs=0) for p in PROMPTS[:3]]
        deadline = time.monotonic() + 30
        while app.state.front.num_in_flight < 3:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        refused = _complete(server.url, PROMPTS[3])
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        gate.set()
        for future, ref in zip(held, want):
            assert _tokens(future.result()) == ref.outputs[0].token_ids
        assert _complete(server.url, PROMPTS[3]).status_code == 200
    llm.engine.check_no_leaks()


@pytest.mark.parametrize("overlap", [False, True])
def test_an_engine_exception_fails_only_the_request_that_caused_it(caplog, overlap):
    llm = _llm(async_scheduling=overlap)  # the overlapped loop too: its failed steps are retried the same way
    want = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)
    engine = llm.engine
    prepare = engine.runner.prepare  # every step's inputs, in either loop (the plain one's execute calls it)

    def prepare_or_raise(plan):
        if any(e.seq.prompt_token_ids[0] == POISON for e in plan.scheduled):
            raise RuntimeError("poisoned batch")
        return prepare(plan)

    engine.runner.prepare = prepare_or_raise
    gate = _gate(engine)
    app = build_app(engine)
    with ServerThread(app) as server, ThreadPoolExecutor(5) as pool:
        futures = [pool.submit(_complete, server.url, p, logprobs=0) for p in PROMPTS]
        bad = pool.submit(_complete, server.url, [POISON, 1, 2])
        deadline = time.monotonic() + 30
        while app.state.front.num_in_flight < 5:  # all five reach the first step together
            assert time.monotonic() < deadline
            time.sleep(0.01)
        gate.set()
        failed = bad.result()
        assert failed.status_code == 500 and failed.json()["error"]["type"] == "internal_error"
        assert "poisoned" not in failed.text  # the exception's text stays in the log
        for future, ref in zip(futures, want):
            assert _tokens(future.result()) == ref.outputs[0].token_ids
        streamed = httpx.post(server.url + "/v1/completions", timeout=60, json={
            "model": "random-weights", "prompt": [POISON], "max_tokens": 3, "stream": True})
        assert streamed.status_code == 200 and '"error"' in streamed.text and streamed.text.endswith("[DONE]\n\n")
        assert _complete(server.url, PROMPTS[0]).status_code == 200  # still serving
    assert "poisoned batch" in caplog.text
    engine.check_no_leaks()


@pytest.mark.parametrize("grace", [30.0, 0.2])
def test_shutdown_finishes_or_aborts_in_flight_requests_cleanly(grace):
    llm = _llm()
    engine = llm.engine
    step = engine.step
    engine.step = lambda: (time.sleep(0.01), step())[1]  # ~100 steps/s: a 150-token request takes > 1 s
    app = build_app(engine, shutdown_grace_seconds=grace)
    server = ServerThread(app, timeout_graceful_shutdown=grace).start()
    body = {"model": "random-weights", "prompt": PROMPTS[0], "max_tokens": 150, "ignore_eos": True, "stream": True,
            "logprobs": 0}  # logprobs: a chunk per token (a random model has no text to stream)
    lines: list[str] = []
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as response:
        stopper = None
        try:
            for line in response.iter_lines():
                if line:
                    lines.append(line)
                if stopper is None and line.startswith("data: "):
                    stopper = threading.Thread(target=server.stop)
                    stopper.start()
        except httpx.HTTPError:
            pytest.fail("the server cut the stream instead of ending it")
    stopper.join(60)
    assert not server.thread.is_alive() and not app.state.front.is_running
    assert engine.num_unfinished_requests == 0
    engine.check_no_leaks()
    finished = lines[-1] == "data: [DONE]" and '"finish_reason":"length"' in "".join(lines)
    assert finished == (grace > 1), "a long grace lets the request finish; a short one aborts it"
    assert lines[-1] == "data: [DONE]" and ('"finish_reason":"abort"' in "".join(lines)) == (grace < 1)


def test_cli_serve_answers_on_localhost_and_stops_on_sigint():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "minivllm.cli", "serve", "--port", str(port), "--device", "cpu",
                             "--max-num-seqs", "4", "--max-model-len", "128"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "MINIVLLM_API_KEY": "k3y"})
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except httpx.TransportError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError("minivllm serve did not answer:\n" + proc.stdout.read().decode()) from None
                time.sleep(0.5)
        assert health.json() == {"status": "ok"}
        page = httpx.get(f"http://127.0.0.1:{port}/", timeout=5)
        assert "minivllm chat" in page.text  # the page ships as package data
        models = f"http://127.0.0.1:{port}/v1/models"
        assert httpx.get(models, timeout=5).status_code == 401  # $MINIVLLM_API_KEY is the key
        name = httpx.get(models, headers={"Authorization": "Bearer k3y"}, timeout=5).json()["data"][0]["id"]
        assert name == "SmolLM2-135M-Instruct.Q4_1"
        rebound = httpx.get(f"http://127.0.0.1:{port}/health", headers={"Host": "attacker.example"}, timeout=5)
        assert rebound.status_code == 400  # on 127.0.0.1 only loopback Host names are answered
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) == 0
