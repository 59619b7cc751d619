"""Phase 10: structured output (minivllm.structured_output): a grammar as a token mask on the default model's vocabulary.

Answer keys written here, independent of the grammar library: for a list of choices, the allowed tokens
after each prefix are found by brute force over all 49,152 tokens (a token is allowed iff the text plus its
bytes is still the beginning of a choice; EOS iff the text is a whole choice; the library may only leave out
lone-space tokens that the tokenizer would merge with the next word). For a JSON schema, random
logits sampled through the mask always give text that ``json.loads`` parses and a schema check accepts.
End to end, ``LLM.generate`` with ``structured_outputs`` on the real model returns exactly a choice / a match.
"""

import json
import re
from pathlib import Path

import pytest
import torch

from minivllm.default_model import default_model_path
from minivllm.sampling_params import SamplingParams
from minivllm.structured_output import (GrammarCompiler, StructuredOutputsParams, allowed_tokens, apply_bitmask,
                                        fill_bitmask)
from minivllm.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]

CHOICES = ["Paris", "Par", "London", "a.b (c)"]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 130},
                                           "tags": {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 3},
                                           "ok": {"type": "boolean"}},
          "required": ["name", "age", "tags", "ok"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_gguf(default_model_path())


@pytest.fixture(scope="module")
def compiler(tok) -> GrammarCompiler:
    return GrammarCompiler(tok, tok.eos_token_ids)


def _vocab_bytes(tok: Tokenizer) -> list[bytes | None]:
    out = []
    for i in range(tok.vocab_size):
        out.append(None if i in tok.special_ids else tok.encoding.decode_single_token_bytes(i))
    return out


def test_params_need_exactly_one_valid_constraint():
    assert StructuredOutputsParams(choice=["a", "b"]).choice == ("a", "b")
    assert json.loads(StructuredOutputsParams(json={"type": "object"}).json) == {"type": "object"}
    assert StructuredOutputsParams(json='{"type": "string"}').kind == "json"
    for bad in ({}, {"regex": "a", "choice": ["b"]}, {"choice": []}, {"choice": ["a", ""]}, {"regex": ""},
                {"json": "{not json"}):
        with pytest.raises(ValueError):
            StructuredOutputsParams(**bad)
    with pytest.raises(TypeError):
        StructuredOutputsParams(json="[1, 2]")
    with pytest.raises(TypeError):
        SamplingParams(structured_outputs={"regex": "a"})
    params = SamplingParams(n=2, structured_outputs=StructuredOutputsParams(regex="[0-9]+"))
    assert params.for_child(1).structured_outputs == params.structured_outputs


def test_bad_grammars_are_refused_with_the_reason(compiler):
    with pytest.raises(ValueError, match="regex"):
        compiler.compile(StructuredOutputsParams(regex="(unclosed"))
    with pytest.raises(ValueError, match="json"):
        compiler.compile(StructuredOutputsParams(json={"type": "no-such-type"}))
    with pytest.raises(ValueError, match="tokenizer"):
        GrammarCompiler(None, {0})


def test_choice_mask_equals_brute_force_at_every_step(tok, compiler):
    vocab = _vocab_bytes(tok)
    eos = set(tok.eos_token_ids)
    choices = [c.encode() for c in CHOICES]
    grammar = compiler.compile(StructuredOutputsParams(choice=CHOICES))
    for target in ("Paris", "Par", "a.b (c)"):
        matcher, text = compiler.matcher(grammar), b""
        for token in tok.encode(target):
            allowed = set(allowed_tokens(fill_bitmask([matcher]), tok.vocab_size)[0].nonzero().flatten().tolist())
            want = {i for i, b in enumerate(vocab) if b and any(c.startswith(text + b) for c in choices)}
            want |= eos if text in choices else set()
            # NOTE: llguidance also drops a lone-space token before a word (" (" is one token: the tokenizer
            # never writes " " then "("): a split the model never saw; nothing else may differ
            assert allowed <= want and all(vocab[i].isspace() for i in want - allowed), (target, text)
            assert token in allowed  # the tokenizer's own split of the choice is always allowed
            assert matcher.accept(token)
            text += vocab[token]
        done = matcher.is_finished  # "Paris" and "a.b (c)" end the grammar; "Par" may still become "Paris"
        assert done == (target != "Par")
        if not done:
            allowed = allowed_tokens(fill_bitmask([matcher]), tok.vocab_size)[0]
            assert all(allowed[e] for e in eos) and allowed[tok.encode("is")[0]]


def test_random_logits_through_the_mask_always_give_schema_valid_json(tok, compiler):
    jsonschema = pytest.importorskip("jsonschema")
    grammar = compiler.compile(StructuredOutputsParams(json=SCHEMA))
    eos = set(tok.eos_token_ids)
    gen = torch.Generator().manual_seed(0)
    for trial in range(4):
        matchers = [compiler.matcher(grammar) for _ in range(2)]  # two rows of a batch, masked together
        texts = [[], []]
        for _ in range(120):
            live = [r for r, m in enumerate(matchers) if not m.is_finished]
            if not live:
                break
            logits = torch.randn((3, tok.vocab_size), generator=gen) * 3  # row 2 is unconstrained
            masked = apply_bitmask(logits, fill_bitmask([matchers[r] for r in live]), live)
            assert torch.equal(masked[2], logits[2])
            for r in live:
                token = int(torch.multinomial(masked[r].softmax(-1), 1, generator=gen))
                assert matchers[r].accept(token), matchers[r].error
                if token not in eos:
                    texts[r].append(token)
        for ids in texts:
            value = json.loads(tok.decode(ids))
            jsonschema.validate(value, SCHEMA)


def test_llm_generate_follows_choice_and_regex():
    from minivllm.llm import LLM

    llm = LLM(device="cpu", max_model_len=256)
    choice = StructuredOutputsParams(choice=["yes", "no"])
    regex = StructuredOutputsParams(regex=r" [0-9]{4}\.")
    outs = llm.generate(["Is Paris in France? Answer:", "The year is"],
                        [SamplingParams(temperature=0, max_tokens=6, structured_outputs=choice),
                         SamplingParams(temperature=1.0, seed=3, n=2, max_tokens=8, structured_outputs=regex)],
                        use_tqdm=False)
    assert outs[0].outputs[0].text in ("yes", "no") and outs[0].outputs[0].finish_reason == "stop"
    for o in outs[1].outputs:
        assert re.fullmatch(r" [0-9]{4}\.", o.text) and o.finish_reason == "stop", o.text
    with pytest.raises(ValueError, match="regex"):
        llm.generate("x", SamplingParams(structured_outputs=StructuredOutputsParams(regex="(")), use_tqdm=False)
    assert llm.engine.num_unfinished_requests == 0
    llm.engine.check_no_leaks()


def test_bench_dry_run_counts_valid_outputs_and_identical_threaded_tokens(tmp_path):
    """``bench/structured_output.py`` on a one-field schema: its bookkeeping, not its timings."""
    pytest.importorskip("jsonschema")
    from bench import structured_output as bench

    assert bench.main(["--batches", "2", "--repeats", "1", "--free-tokens", "3", "--schema", "flag",
                       "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "15_structured_output_dry_run.json").read_text())
    assert {"date", "command", "host", "versions"} <= set(data["meta"]) and data["schema"] == bench.FLAG
    row = data["results"]["batch2"]
    assert row["constrained_outputs"] == {"total": 4, "parsed": 4, "valid": 4,
                                          "thread_tokens_identical_to_serial": "2/2"}
    assert row["free"]["decode_steps"] == 2  # 3 tokens: one from the prefill, two full-batch decode steps
    assert row["free"]["mask_fill_ms_median"] == 0.0 and row["schema"]["mask_fill_ms_median"] > 0
    assert row["schema"]["decode_steps"] == row["schema+thread"]["decode_steps"] >= 1
    assert all(json.loads(text) in ({"ok": True}, {"ok": False}) for text in row["example_outputs"])


def test_an_llguidance_older_than_the_pin_is_named_with_what_to_install(monkeypatch, tok):
    """llguidance 1.6's tokenizer takes one EOS id and fails deep inside with a TypeError; the compiler says instead
    which version it needs (the same lower bound as pyproject.toml's)."""
    from minivllm import structured_output as so

    pinned = re.search(r'"llguidance>=([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert ".".join(map(str, so.MIN_LLGUIDANCE)) == pinned
    monkeypatch.setattr(so.metadata, "version", lambda dist: "1.6.1")
    with pytest.raises(RuntimeError, match=rf"llguidance>={re.escape(pinned)}, this environment has 1.6.1"):
        so.GrammarCompiler(tok, {0}).lltokenizer
    monkeypatch.setattr(so.metadata, "version", lambda dist: pinned + ".0")
    assert so.GrammarCompiler(tok, {0}).lltokenizer is not None
