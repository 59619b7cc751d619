"""Phase 13: the server on a Qwen3 checkpoint directory: chat_template_kwargs, reasoning_content, the
checkpoint's sampling defaults, and token ids past the tokenizer's vocabulary.

The directory is the one ``tests/test_06_qwen3_dir.py`` builds (Qwen3's published chat template, a byte-level
BPE in Qwen2's layout with ``<think>``/``</think>`` as added tokens, Qwen3-0.6B's ``generation_config.json``)
at a small width, with a model vocabulary of 1,024 rows for a tokenizer of ~600 tokens: the rows past the
tokenizer are padding, as Qwen3's 151,936 rows are for its 151,669 tokens. Two padding rows are set to win
every greedy and sampled choice, so the model writes nothing but padding ids unless a grammar forbids them.

Answer keys: ``transformers``' ``apply_chat_template`` for the prompt ids (recorded where the engine receives
them), :func:`minivllm.reasoning.extract_reasoning` of the text a regex grammar forces for the split, the
numbers in ``generation_config.json`` for the defaults.
"""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from minivllm.generation_config import GenerationDefaults  # noqa: E402
from minivllm.llm import LLM  # noqa: E402
from minivllm.reasoning import ReasoningStreamParser, extract_reasoning, uses_reasoning  # noqa: E402
from minivllm.server import ServerThread, build_app  # noqa: E402
from minivllm.server import protocol as p  # noqa: E402
from minivllm.server.serving import _delta, _message  # noqa: E402
from minivllm.structured_output import _regex_escape  # noqa: E402

transformers = pytest.importorskip("transformers")
openai = pytest.importorskip("openai")

from test_06_qwen3_dir import CHAT, TEMPLATE, _tokenizer  # noqa: E402

SMALL = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             vocab_size=1024, tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6,
             max_position_embeddings=4096, num_hidden_layers=2)
PADDING = (1022, 1023)  # embedding rows with no token: the model prefers them to everything
NAME = "qwen3-small"
REPLY = "<think>\nThe user asks for a capital.\n</think>\n\nParis."  # what the grammar forces
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


@pytest.fixture(scope="module")
def qwen3_small(tmp_path_factory):
    """The checkpoint directory (Qwen3-0.6B's files and template, a small width)."""
    directory = tmp_path_factory.mktemp("Qwen3-small")
    torch.manual_seed(0)
    hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**SMALL))
    with torch.no_grad():  # the final norm keeps only dimension 0; rows +-100 on it win whatever its sign
        hf.model.norm.weight.zero_()
        hf.model.norm.weight[0] = 1.0
        emb = hf.model.embed_tokens.weight  # tied: also the LM head
        emb[PADDING[0]].zero_()
        emb[PADDING[1]].zero_()
        emb[PADDING[0], 0], emb[PADDING[1], 0] = 100.0, -100.0
    hf.save_pretrained(directory)
    ids = _tokenizer(directory)
    (directory / "generation_config.json").write_text(json.dumps({  # Qwen3-0.6B's, with this vocabulary's ids
        "bos_token_id": ids["<|endoftext|>"], "do_sample": True,
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]], "pad_token_id": ids["<|endoftext|>"],
        "temperature": 0.6, "top_k": 20, "top_p": 0.95, "transformers_version": "4.51.0"}))
    return directory


@pytest.fixture(scope="module")
def served(qwen3_small):
    """(server, the (prompt ids, SamplingParams) of every request the engine received)."""
    llm = LLM(str(qwen3_small), device="cpu", dtype="float32", max_model_len=256, num_kv_blocks=64)
    engine, seen = llm.engine, []
    add_request = engine.add_request

    def recording_add_request(prompt, params=None, **kwargs):
        seen.append((list(prompt), params))
        return add_request(prompt, params, **kwargs)

    engine.add_request = recording_add_request
    app = build_app(engine, model_name=NAME)
    with ServerThread(app) as server:
        yield server, seen
    engine.check_no_leaks()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0].url + "/v1", api_key="unused", max_retries=0)


def _forced(text: str) -> dict:
    """Request fields that make the model write exactly ``text`` (a regex grammar of it)."""
    return {"structured_outputs": {"regex": _regex_escape(text)}}


def test_the_template_is_a_reasoning_template_and_padding_ids_have_no_token(served, qwen3_small):
    app = served[0].app
    tok = app.state.engine.tokenizer
    assert app.state.serving.reasoning and uses_reasoning("auto", TEMPLATE)
    assert tok.vocab_size <= PADDING[0] < app.state.engine.model.config.vocab_size
    assert tok.token_bytes(PADDING[0]) == tok.token_bytes(PADDING[1]) == b""
    assert tok.decode([PADDING[0], *tok.encode("Paris"), PADDING[1]]) == "Paris"


def test_reasoning_parser_choices_and_the_default_model_is_not_a_reasoning_template():
    from minivllm.tokenizer import Tokenizer, default_model_path

    smollm2 = Tokenizer.from_gguf(default_model_path()).chat_template
    assert "<|im_start|>" in smollm2 and not uses_reasoning("auto", smollm2)  # its answers stay as they were
    assert uses_reasoning("qwen3", smollm2) and not uses_reasoning("none", TEMPLATE)
    assert not uses_reasoning("auto", None)
    with pytest.raises(ValueError, match="reasoning_parser must be one of auto, qwen3, none"):
        uses_reasoning("deepseek", TEMPLATE)


@pytest.mark.parametrize("kwargs", [None, {"enable_thinking": True}, {"enable_thinking": False}])
def test_chat_template_kwargs_render_the_prompt_as_transformers_does(served, client, qwen3_small, kwargs):
    server, seen = served
    theirs = transformers.AutoTokenizer.from_pretrained(qwen3_small)
    text = theirs.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False, **(kwargs or {}))
    expected = theirs.encode(text, add_special_tokens=False)
    extra = {"chat_template_kwargs": kwargs} if kwargs is not None else None
    before = len(seen)
    reply = client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=1, extra_body=extra)
    assert [ids for ids, _ in seen[before:]] == [expected]
    assert reply.usage.prompt_tokens == len(expected)
    assert text.endswith("<think>\n\n</think>\n\n") == (kwargs == {"enable_thinking": False})


@pytest.mark.parametrize("kwargs, message", [
    ("yes", "valid dictionary"), (["enable_thinking"], "valid dictionary"),
    ({"add_generation_prompt": False}, "'add_generation_prompt' is set by the server"),
    ({"messages": []}, "'messages' is set by the server"),
])
def test_bad_chat_template_kwargs_are_a_400_naming_the_field(served, kwargs, message):
    body = {"model": NAME, "messages": CHAT, "max_tokens": 1, "chat_template_kwargs": kwargs}
    r = httpx.post(served[0].url + "/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "chat_template_kwargs" and error["type"] == "invalid_request_error"
    assert message in error["message"], error["message"]


def test_a_think_block_comes_back_as_reasoning_content(served, client):
    split = extract_reasoning(REPLY)
    assert (split.reasoning_content, split.content) == ("\nThe user asks for a capital.\n", "\n\nParis.")
    reply = client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=64, temperature=0,
                                           extra_body=_forced(REPLY))
    message = reply.choices[0].message
    assert reply.choices[0].finish_reason == "stop"
    assert (message.reasoning_content, message.content) == (split.reasoning_content, split.content)
    # raw JSON: the field is there with reasoning, absent without it (thinking off: the answer is all content)
    body = {"model": NAME, "messages": CHAT, "max_tokens": 16, "temperature": 0,
            "chat_template_kwargs": {"enable_thinking": False}, **_forced("Paris.")}
    message = httpx.post(served[0].url + "/v1/chat/completions", json=body).json()["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "Paris."}


def test_streamed_deltas_add_up_to_the_same_split(served, client):
    split = extract_reasoning(REPLY)
    stream = client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=64, stream=True,
                                            extra_body=_forced(REPLY))
    reasoning, content, order, reasons = [], [], [], []
    for chunk in stream:
        for choice in chunk.choices:
            delta = choice.delta
            if getattr(delta, "reasoning_content", None):
                reasoning.append(delta.reasoning_content)
                order.append("reasoning")
            if delta.content:
                content.append(delta.content)
                order.append("content")
            reasons.append(choice.finish_reason)
    assert ("".join(reasoning), "".join(content)) == (split.reasoning_content, split.content)
    assert order == sorted(order, key=lambda kind: kind == "content")  # all thinking first, then the answer
    assert reasons[-1] == "stop"


def test_delta_builder_holds_a_cut_tag_back_and_releases_it_at_the_end():
    parser = ReasoningStreamParser()
    deltas = [("<thi", False), ("nk>Hm", False), (".</th", False), ("ink>\n\nParis.", True)]
    assert [(d.reasoning_content, d.content) for d in (_delta(parser, t, last) for t, last in deltas)] == [
        (None, None), ("Hm", None), (".", None), (None, "\n\nParis.")]
    parser = ReasoningStreamParser()  # "<" could start <think>: held back, then released by the last (empty) delta
    assert [(d.reasoning_content, d.content) for d in (_delta(parser, "Hi <", False), _delta(parser, "", True))] \
        == [(None, "Hi "), (None, "<")]
    assert _delta(None, "plain", last=True).model_dump(exclude={"role"}) == {"content": "plain"}
    whole = _message("<think>A</think>B", thinking=False)
    assert (whole.reasoning_content, whole.content) == ("A", "B")
    opened = _message("still thinking", thinking=True)  # a template that opens the block; out of tokens
    assert (opened.reasoning_content, opened.content) == ("still thinking", None)
    assert _message("", thinking=False).model_dump() == {"role": "assistant", "content": ""}  # as without a parser
    assert _message("<think></think>B", thinking=False).model_dump() == {"role": "assistant", "content": "B"}
    assert _message("<think>A</think>B", thinking=None).model_dump() == {"role": "assistant",
                                                                         "content": "<think>A</think>B"}


def test_generation_config_defaults_fill_what_a_request_leaves_unset(served, client):
    _, seen = served
    before = len(seen)
    client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=1)
    client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=1, temperature=0, top_p=0.5,
                                   extra_body={"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.2})
    client.completions.create(model=NAME, prompt="Hello", max_tokens=1)
    client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=1, extra_body={"top_k": -1})
    got = [tuple(getattr(params, f) for f in SAMPLING_FIELDS) for _, params in seen[before:]]
    assert got == [(0.6, 0.95, 20, 0.0, 1.0),  # the checkpoint's temperature, top_p, top_k; the rest OpenAI's
                   (0.0, 0.5, 5, 0.1, 1.2),  # every value the request gives wins
                   (0.6, 0.95, 20, 0.0, 1.0),  # completions too
                   (0.6, 0.95, -1, 0.0, 1.0)]  # top_k -1 (vLLM: no top-k) is a value, not "unset"


def test_defaults_reach_every_field_and_max_tokens_stays_inside_the_context():
    req = p.ChatCompletionRequest(model=NAME, messages=CHAT, top_p=None, repetition_penalty=1.3)
    params = req.sampling_params(None, None, defaults=GenerationDefaults(
        temperature=0.7, top_p=0.8, top_k=40, min_p=0.05, repetition_penalty=1.1, max_tokens=9))
    assert tuple(getattr(params, f) for f in SAMPLING_FIELDS) == (0.7, 0.8, 40, 0.05, 1.3)
    assert req.sampling_params(None, None).temperature == 1.0  # no checkpoint defaults: OpenAI's


def test_ids_past_the_vocabulary_decode_to_nothing_in_text_and_logprobs(served, client):
    reply = client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=4, logprobs=True, top_logprobs=2,
                                           temperature=0, extra_body={"chat_template_kwargs":
                                                                      {"enable_thinking": False}})
    choice = reply.choices[0]
    assert choice.message.content == "" and reply.usage.completion_tokens == 4 and choice.finish_reason == "length"
    assert len(choice.logprobs.content) == 4
    for entry in choice.logprobs.content:  # a padding row, also the first alternative: no text, no bytes
        assert (entry.token, entry.bytes) == ("", [])
        assert len(entry.top_logprobs) == 2 and (entry.top_logprobs[0].token, entry.top_logprobs[0].bytes) == ("", [])
    done = client.completions.create(model=NAME, prompt="Hello", max_tokens=3, logprobs=2, temperature=0)
    lp = done.choices[0].logprobs
    assert done.choices[0].text == "" and lp.tokens == ["", "", ""] and lp.text_offset == [0, 0, 0]
    stream = client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=3, stream=True, logprobs=True)
    tokens = [e.token for chunk in stream for c in chunk.choices if c.logprobs for e in c.logprobs.content]
    assert tokens == ["", "", ""]
