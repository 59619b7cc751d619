"""Tokenization for the engine (phase 02): a ``tiktoken`` encoding plus chat templates and streaming.

>>> tok = Tokenizer.from_gguf(default_model_path())        # the default model, SmolLM2-135M-Instruct
>>> ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True)
>>> stream = tok.detokenizer(); text = "".join(stream.push(i) for i in ids) + stream.flush()

Modules: ``bpe`` (byte-level BPE: regexes, ranks, a slow reference), ``loaders`` (GGUF, tokenizer.json,
tiktoken names; GGUF files are read by :mod:`minivllm.gguf_file`), ``chat`` (Jinja chat templates),
``detokenize`` (incremental detokenization), ``tokenizer`` (the ``Tokenizer`` class).
"""

from minivllm.default_model import default_model_path
from minivllm.tokenizer.detokenize import IncrementalDetokenizer, complete_utf8_prefix
from minivllm.tokenizer.tokenizer import Tokenizer

__all__ = ["IncrementalDetokenizer", "Tokenizer", "complete_utf8_prefix", "default_model_path"]
