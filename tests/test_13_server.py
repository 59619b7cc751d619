"""Phase 13: the OpenAI-compatible server end to end, on a real uvicorn (loopback, a free port) serving the
embedded SmolLM2 model on the CPU.

The answer key is ``LLM.generate`` / ``LLM.chat`` on the same engine, computed before the server takes the
engine over: greedy text through the server (the official ``openai`` client, streaming or not, 64 clients
at once) must equal it. Clients that go away must leave every KV block free; bad input gets OpenAI's error
body and the server keeps serving; schemathesis, driven by the app's own OpenAPI schema, finds no 5xx.
"""

import asyncio
import json
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402
import pytest  # noqa: E402

from minivllm.llm import LLM  # noqa: E402
from minivllm.sampling_params import SamplingParams  # noqa: E402
from minivllm.server import ServerThread, build_app  # noqa: E402

openai = pytest.importorskip("openai")

MAX_MODEL_LEN = 160
QUESTIONS = ["What is the capital of France?", "Name a colour."]
PROMPTS = [f"{a}, {a + 1}, {a + 2}," for a in range(64)]  # 64 short, different prompts: little prefill work
COMPLETION = "The capital of France is"
GREEDY = SamplingParams(temperature=0, max_tokens=6)


def _chat(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


@pytest.fixture(scope="module")
def served():
    """(server, engine, answer key): references from LLM first, then the server owns the engine."""
    llm = LLM(device="cpu", max_model_len=MAX_MODEL_LEN, max_num_seqs=64)
    key = {"chat": [o.outputs[0] for o in llm.chat([_chat(q) for q in QUESTIONS], GREEDY, use_tqdm=False)],
           "completion": llm.generate(COMPLETION, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0],
           "many": [o.outputs[0] for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]}
    app = build_app(llm.engine, model_name="smollm2")
    with ServerThread(app) as server:
        yield server, llm.engine, key
    assert not app.state.front.is_running, "the engine thread should stop with the server"
    llm.engine.check_no_leaks()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0].url + "/v1", api_key="unused", max_retries=0)


def _wait_idle(server: ServerThread, timeout: float = 30.0) -> None:
    """Until the engine thread has handled every abort and nothing is in flight (bounded wait)."""
    front = server.app.state.front
    deadline = time.monotonic() + timeout
    while front.num_in_flight or front.snapshot.running or front.snapshot.waiting:
        assert time.monotonic() < deadline, "requests still in flight"
        time.sleep(0.05)
    time.sleep(0.1)  # the engine thread publishes after handling the last command


def _no_leaks_soon(engine, timeout: float = 30.0) -> None:
    """``check_no_leaks`` once the engine thread has caught up with the aborts (a loaded machine lags)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return engine.check_no_leaks()
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_models_health_page_and_schema(served):
    server, engine, _ = served
    with httpx.Client(base_url=server.url) as http:
        models = http.get("/v1/models").json()
        assert [m["id"] for m in models["data"]] == ["smollm2"] and models["data"][0]["max_model_len"] == MAX_MODEL_LEN
        assert http.get("/health").json() == {"status": "ok"}
        page = http.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "/v1/chat/completions" in page.text and "<script>" in page.text
        assert 'src="http' not in page.text and 'href="http' not in page.text  # no CDN: works offline
        paths = http.get("/openapi.json").json()["paths"]
        assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"} <= set(paths)


def test_openai_client_chat_and_completion_equal_llm(served, client):
    _, _, key = served
    chat = client.chat.completions.create(model="smollm2", messages=_chat(QUESTIONS[0]), max_tokens=6, temperature=0)
    assert chat.choices[0].message.content == key["chat"][0].text
    assert chat.choices[0].finish_reason == key["chat"][0].finish_reason
    assert chat.usage.completion_tokens == len(key["chat"][0].token_ids) and chat.usage.prompt_tokens > 20
    done = client.completions.create(model="smollm2", prompt=COMPLETION, max_tokens=8, temperature=0)
    assert done.choices[0].text == key["completion"].outputs[0].text
    assert done.usage.prompt_tokens == len(key["completion"].prompt_token_ids)
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
    metrics = httpx.get(served[0].url + "/metrics").text
    hit_rate = next(line for line in metrics.splitlines() if line.startswith("minivllm_prefix_cache_hit_rate"))
    assert float(hit_rate.split()[-1]) > 0, "the chat's system prompt was cached by the reference run"


def test_streaming_chat_and_completion_with_usage(served, client):
    _, _, key = served
    chunks = list(client.chat.completions.create(model="smollm2", messages=_chat(QUESTIONS[1]), max_tokens=6,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == key["chat"][1].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == key["chat"][1].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(key["chat"][1].token_ids)
    assert all(c.usage is None for c in chunks[:-1])
    parts = list(client.completions.create(model="smollm2", prompt=COMPLETION, max_tokens=8, temperature=0,
                                           stream=True))
    assert len(parts) > 1 and "".join(p.choices[0].text for p in parts) == key["completion"].outputs[0].text


def test_64_concurrent_streaming_clients_get_their_own_complete_answers(served):
    server, engine, key = served

    async def one(client, prompt: str) -> tuple[str, str | None, int]:
        stream = await client.completions.create(model="smollm2", prompt=prompt, max_tokens=6, temperature=0,
                                                 stream=True, stream_options={"include_usage": True})
        text, reason, usage = "", None, -1
        async for chunk in stream:
            for choice in chunk.choices:
                text += choice.text
                reason = choice.finish_reason or reason
            if chunk.usage is not None:
                usage = chunk.usage.completion_tokens
        return text, reason, usage

    async def all_clients():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as client:
            return await asyncio.gather(*(one(client, prompt) for prompt in PROMPTS))

    results = asyncio.run(all_clients())
    for (text, reason, usage), want in zip(results, key["many"]):
        assert (text, reason, usage) == (want.text, want.finish_reason, len(want.token_ids))
    assert len(set(r[0] for r in results)) > 10, "different prompts should get different answers"
    _wait_idle(server)
    engine.check_no_leaks()
    metrics = httpx.get(server.url + "/metrics").text
    ttft = next(line for line in metrics.splitlines() if line.startswith("minivllm_time_to_first_token_seconds_count"))
    assert float(ttft.split()[-1]) >= 64
    assert 'minivllm_requests_total{endpoint="/v1/completions",status="200"}' in metrics
    assert "minivllm_kv_blocks_used" in metrics and "minivllm_num_requests_running 0.0" in metrics


def test_disconnects_abort_their_requests_and_free_every_block(served):
    server, engine, _ = served
    body = {"model": "smollm2", "prompt": "Once upon a time", "max_tokens": 120, "ignore_eos": True, "temperature": 0}
    before = engine.stats["generation_tokens"]
    with httpx.Client(base_url=server.url) as http:
        with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                    break  # some text arrived: now hang up mid-stream
        _wait_idle(server)
        _no_leaks_soon(engine)
        with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up
            http.post("/v1/completions", json=body, timeout=httpx.Timeout(10.0, read=0.5))
        _wait_idle(server)
        _no_leaks_soon(engine)
    assert engine.stats["generation_tokens"] - before < 2 * 120, "both requests should have been cut short"


BAD = [  # (path, raw body, status, param, code)
    ("/v1/completions", b'{"model": "smollm2", "prompt": "Hi"', 400, None, None),
    ("/v1/completions", b'["not", "an", "object"]', 400, None, None),
    ("/v1/completions", {"model": "smollm2", "prompt": 42}, 400, "prompt", None),
    ("/v1/completions", {"model": "smollm2", "prompt": "Hi", "max_tokens": "many"}, 400, "max_tokens", None),
    ("/v1/completions", {"model": "smollm2", "prompt": "Hi", "temperature": -1}, 400, "temperature", None),
    ("/v1/completions", {"model": "smollm2", "prompt": "Hi", "top_p": 1.5}, 400, "top_p", None),
    ("/v1/completions", {"model": "smollm2", "prompt": "Hi", "max_tokens": 0}, 400, "max_tokens", None),
    ("/v1/completions", {"model": "smollm2", "prompt": "Hi", "repetition_penalty": 0}, 400, "repetition_penalty",
     None),
    ("/v1/completions", {"model": "smollm2", "prompt": "Hi", "min_tokens": 9, "max_tokens": 3}, 400, "min_tokens",
     None),
    ("/v1/completions", {"model": "smollm2", "prompt": ""}, 400, "prompt", None),
    ("/v1/completions", {"model": "smollm2", "prompt": []}, 400, "prompt", None),
    ("/v1/completions", {"model": "smollm2", "prompt": [1, 2, 10**6]}, 400, "prompt", None),
    ("/v1/completions", {"model": "smollm2", "prompt": [-1], "echo": True}, 400, "prompt", None),
    ("/v1/completions", {"model": "smollm2", "prompt": [2**70], "echo": True}, 400, "prompt", None),
    ("/v1/completions", {"model": "smollm2", "prompt": [[5], [2**70]]}, 400, "prompt", None),
    ("/v1/completions", {"model": "smollm2", "prompt": "Hi", "top_k": 2**70}, 400, "top_k", None),
    ("/v1/completions", {"model": "smollm2", "prompt": "Hi", "seed": 2**70}, 400, "seed", None),
    ("/v1/completions", {"model": "smollm2", "prompt": "Hi", "min_tokens": 2**70}, 400, "min_tokens", None),
    ("/v1/completions", {"model": "smollm2", "prompt": "Hi", "max_tokens": 2**70}, 400, "max_tokens",
     "context_length_exceeded"),
    ("/v1/completions", {"model": "smollm2", "prompt": "Hi", "stop_token_ids": [10**6], "min_tokens": 2}, 400,
     "stop_token_ids", None),
    ("/v1/completions", {"model": "smollm2", "prompt": "Hi", "stop_token_ids": [-1]}, 400, "stop_token_ids", None),
    ("/v1/completions", {"model": "smollm2", "prompt": "Hi", "stop_token_ids": [2**70]}, 400, "stop_token_ids",
     None),
    ("/v1/completions", b'{"model": "smollm2", "prompt": "Hi", "temperature": NaN}', 400, "temperature", None),
    ("/v1/completions", b'{"model": "smollm2", "prompt": "Hi", "repetition_penalty": Infinity}', 400,
     "repetition_penalty", None),
    ("/v1/completions", {"model": "smollm2", "prompt": "Hi", "n": 16, "best_of": 3}, 400, "best_of",
     "unsupported_field"),
    ("/v1/completions", {"model": "smollm2", "prompt": "word " * 400}, 400, "prompt", "context_length_exceeded"),
    ("/v1/completions", {"model": "smollm2", "prompt": "Hi", "max_tokens": 10**4}, 400, "max_tokens",
     "context_length_exceeded"),
    ("/v1/completions", {"model": "gpt-4o", "prompt": "Hi"}, 404, "model", "model_not_found"),
    ("/v1/completions", {"model": "smollm2", "prompt": "Hi", "structured_outputs": {"regex": "(a"}}, 400,
     "structured_outputs", None),
    ("/v1/completions", {"model": "smollm2", "prompt": "Hi", "structured_outputs": {"regex": "a", "choice": ["b"]}},
     400, "structured_outputs", None),
    ("/v1/completions", {"model": "smollm2", "prompt": "Hi", "guided_regex": "b", "guided_choice": ["a"]}, 400,
     "guided_choice", None),
    ("/v1/completions", {"model": "smollm2", "prompt": "Hi", "guided_json": {"type": "frob"}}, 400, "guided_json",
     None),
    ("/v1/completions", {"model": "smollm2", "prompt": "Hi", "suffix": "!"}, 400, "suffix", "unsupported_field"),
    ("/v1/chat/completions", {"model": "smollm2", "messages": []}, 400, "messages", None),
    ("/v1/chat/completions", {"model": "smollm2", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages",
     None),
    ("/v1/chat/completions", {"model": "smollm2", "messages": _chat("Hi"), "n": 0}, 400, "n", None),
    ("/v1/chat/completions", {"model": "smollm2", "messages": _chat("Hi"), "top_logprobs": 2}, 400, "top_logprobs",
     None),
    ("/v1/chat/completions", {"model": "smollm2", "messages": _chat("Hi"), "response_format": {"type": "json_schema"}},
     400, "response_format", None),
    ("/v1/chat/completions", {"model": "smollm2", "messages": _chat("Hi"), "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
            "a": {"type": "no-such-type"}}}}}}, 400, "response_format", None),
    ("/v1/chat/completions", {"model": "smollm2", "messages": _chat("Hi"), "response_format": {"type": "yaml"}}, 400,
     "response_format", None),
    ("/v1/chat/completions", {"model": "smollm2", "messages": _chat("Hi"), "tools": [{"type": "function"}]}, 400,
     "tools", "unsupported_field"),
    ("/v1/chat/completions", {"model": "smollm2", "messages": _chat("word " * 400)}, 400, "messages",
     "context_length_exceeded"),
    ("/v1/chat/completions", {"model": "nope", "messages": _chat("Hi")}, 404, "model", "model_not_found"),
    ("/v1/nothing-here", {}, 404, None, "not_found"),
]


@pytest.mark.parametrize("path, body, status, param, code", BAD, ids=range(len(BAD)))
def test_bad_input_gets_an_openai_error_and_the_server_keeps_serving(served, path, body, status, param, code):
    server, engine, _ = served
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + path, content=raw, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["param"], error["code"]) == (param, code), error
    assert engine.num_unfinished_requests == 0  # nothing of a refused request stays queued


def test_schemathesis_finds_no_server_error(served):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings

    server, engine, _ = served
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    positive, negative = schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE
    calls = []
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (positive, negative) if operation.method.upper() == "POST" else (positive,):
            @settings(max_examples=10, deadline=None, database=None, derandomize=True, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def check(case):
                if mode is positive and isinstance(case.body, dict) and "model" in case.body:
                    case.body["model"] = "smollm2"  # reach generation, not only the 404 for a made-up model
                    for field in ("max_tokens", "max_completion_tokens"):
                        case.body[field] = min(case.body.get(field) or 4, 4)  # keep the run to seconds
                response = case.call(base_url=server.url, timeout=60)
                calls.append(response.status_code)
                assert response.status_code < 500, f"{case.method} {case.path} {case.body!r}: {response.text}"

            check()
    assert len(calls) > 40 and any(c == 200 for c in calls) and any(400 <= c < 500 for c in calls)
    _wait_idle(server)
    engine.check_no_leaks()


PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}


def test_structured_output_json_schema_choice_and_regex(served, client):
    jsonschema = pytest.importorskip("jsonschema")
    chat = client.chat.completions.create(
        model="smollm2", messages=_chat("Invent a person. Reply in JSON."), max_tokens=40, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}})
    jsonschema.validate(json.loads(chat.choices[0].message.content), PERSON)
    assert chat.choices[0].finish_reason == "stop"  # the grammar ended it, not max_tokens
    picked = client.chat.completions.create(model="smollm2", messages=_chat("Is the sky blue?"), max_tokens=5,
                                            temperature=0, extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert picked.choices[0].message.content in ("yes", "no")
    year = client.completions.create(model="smollm2", prompt="The year is", max_tokens=6, temperature=0.8, seed=2,
                                     extra_body={"guided_regex": r" [12][0-9]{3}"})
    assert re.fullmatch(r" [12][0-9]{3}", year.choices[0].text), year.choices[0].text


def test_openai_leniency_nulls_unknown_fields_and_a_long_stop_string(served, caplog):
    server, engine, key = served
    body = {"model": "smollm2", "messages": _chat(QUESTIONS[0]), "max_tokens": 6, "temperature": 0, "n": None,
            "stream": None, "logprobs": None, "top_logprobs": None, "stop": "\n\n### End of answer",
            "store": False, "metadata": {"k": "v"}, "service_tier": "auto", "reasoning_effort": "low",
            "modalities": ["text"], "prediction": {"type": "content", "content": "x"}}
    with caplog.at_level("WARNING", logger="minivllm.server"):
        r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == key["chat"][0].text
    warned = " ".join(rec.getMessage() for rec in caplog.records)
    assert all(f in warned for f in ("store", "metadata", "service_tier", "reasoning_effort", "modalities"))


def test_tokenizing_runs_off_the_event_loop(served, monkeypatch):
    server, engine, _ = served
    entered, release = threading.Event(), threading.Event()
    encode = engine.tokenizer.encode

    def slow_encode(*args, **kwargs):  # stands in for a huge prompt
        entered.set()
        release.wait(timeout=60)
        return encode(*args, **kwargs)

    monkeypatch.setattr(engine.tokenizer, "encode", slow_encode)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(httpx.post, server.url + "/v1/completions", timeout=60,
                              json={"model": "smollm2", "prompt": COMPLETION, "max_tokens": 2, "temperature": 0})
        assert entered.wait(timeout=30)
        try:  # the event loop is free while the prompt is being tokenized
            assert httpx.get(server.url + "/health", timeout=30).json() == {"status": "ok"}
        finally:
            release.set()
        assert pending.result().status_code == 200
