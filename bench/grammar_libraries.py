"""Structured output: which grammar library? Compile time and per-token mask time on the default model's vocabulary.

    pip install xgrammar llguidance outlines-core   # only llguidance is a dependency of minivllm
    python -m bench.grammar_libraries                # saves bench/results/10_grammar_libraries_cpu.json

Three libraries made for constrained decoding turn a JSON schema (or a regex) into a per-step token mask:
xgrammar, llguidance and outlines-core. Each gets the same job on SmolLM2's 49,152-token vocabulary:

* **vocabulary**: build the library's tokenizer view once (per engine);
* **compile**: a JSON schema (an object of 5 typed fields, an enum, an array) into a matcher (per request);
* **mask**: for each token of a valid answer (tokenized as the model would write it), compute the
  allowed-token mask, then advance the matcher by that token; the median per token.

Left out: GPU mask application (the mask is applied with torch on whatever device the logits are), batched
(multi-threaded) mask filling, and grammars other than JSON schema.
"""

import argparse
import json
import statistics
import subprocess
import time

import torch

from bench._harness import save, _version

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"}, "height_m": {"type": "number"},
    "city": {"type": "string", "enum": ["Paris", "London", "Rome"]}, "tags": {"type": "array", "items": {"type": "string"}},
    "admin": {"type": "boolean"}}, "required": ["name", "age", "height_m", "city", "tags", "admin"],
    "additionalProperties": False}
ANSWER = {"name": "Ada Lovelace", "age": 36, "height_m": 1.65, "city": "London", "tags": ["math", "engines"],
          "admin": True}


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def run_xgrammar(tok, vocab, eos, text_ids):
    import xgrammar as xgr

    encoded = vocab
    info, t_vocab = _timed(lambda: xgr.TokenizerInfo(encoded, vocab_type=xgr.VocabType.RAW, vocab_size=len(encoded),
                                                      stop_token_ids=sorted(eos)))
    compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
    compiled, t_compile = _timed(lambda: compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=True))
    matcher = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, len(encoded))
    times = []
    for t in text_ids:
        _, dt = _timed(lambda: matcher.fill_next_token_bitmask(bitmask))
        times.append(dt)
        assert matcher.accept_token(t), f"xgrammar rejected token {t}"
    matcher.fill_next_token_bitmask(bitmask)
    ok = all(matcher.accept_token(e) for e in sorted(eos)[:1]) and matcher.is_terminated()
    return t_vocab, t_compile, times, ok


def run_llguidance(tok, vocab, eos, text_ids):
    import llguidance
    import llguidance.torch

    class View:  # what llguidance.TokenizerWrapper reads: the model's vocabulary as bytes, and an encoder
        eos_token_id, bos_token_id, tokens = min(eos), tok.bos_token_id, vocab
        special_token_ids = sorted(tok.special_ids)

        def __call__(self, text: str) -> list[int]:
            return tok.encode(text)

    lltok, t_vocab = _timed(lambda: llguidance.LLTokenizer(llguidance.TokenizerWrapper(View()), eos_token=sorted(eos)))

    def build():
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA),
                                                                defaults={"whitespace_flexible": True})
        return llguidance.LLMatcher(lltok, grammar)

    matcher, t_compile = _timed(build)
    assert not matcher.is_error(), matcher.get_error()
    bitmask = llguidance.torch.allocate_token_bitmask(1, len(vocab))
    times = []
    for t in text_ids:
        _, dt = _timed(lambda: llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0))
        times.append(dt)
        assert matcher.consume_token(t), f"llguidance rejected token {t}: {matcher.get_error()}"
    return t_vocab, t_compile, times, matcher.is_accepting()


def run_outlines(tok, vocab, eos, text_ids):
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    def make_vocab():
        pieces: dict[bytes, list[int]] = {}
        for i, b in enumerate(vocab):
            if b and i not in eos and i not in tok.special_ids:
                pieces.setdefault(b, []).append(i)
        return Vocabulary(min(eos), pieces)

    v, t_vocab = _timed(make_vocab)
    regex = build_regex_from_schema(json.dumps(SCHEMA))
    index, t_compile = _timed(lambda: Index(regex, v))
    guide = Guide(index)
    mask = torch.zeros((len(vocab) + 31) // 32, dtype=torch.int32)
    times = []
    for t in text_ids:
        _, dt = _timed(lambda: guide.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size()))
        times.append(dt)
        guide.advance(t)
    return t_vocab, t_compile, times, guide.is_finished()


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args()
    from minivllm.default_model import default_model_path
    from minivllm.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(default_model_path())
    vocab = []
    for i in range(tok.vocab_size):
        try:
            vocab.append(tok.encoding.decode_single_token_bytes(i))
        except KeyError:
            vocab.append(b"")
    text = json.dumps(ANSWER)  # valid under each library's flexible-whitespace JSON
    text_ids = tok.encode(text)
    eos = set(tok.eos_token_ids)
    results = {}
    for name, fn, dist in (("xgrammar", run_xgrammar, "xgrammar"), ("llguidance", run_llguidance, "llguidance"),
                           ("outlines-core", run_outlines, "outlines-core")):
        try:
            t_vocab, t_compile, times, finished = fn(tok, vocab, eos, text_ids)
        except ImportError:
            print(name, "not installed: pip install", dist)
            continue
        results[name] = {"version": _version(dist), "vocabulary_s": round(t_vocab, 4), "compile_s": round(t_compile, 4),
                         "mask_median_us": round(statistics.median(times) * 1e6, 1),
                         "mask_max_us": round(max(times) * 1e6, 1), "tokens": len(times), "answer_accepted": finished}
        print(name, results[name], flush=True)
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    path = save("10_grammar_libraries_cpu", {"vocab_size": len(vocab), "schema": SCHEMA, "answer": text,
                                             "uptime": load, "results": results})
    print("saved", path)


if __name__ == "__main__":
    main()
