"""Byte-level BPE: the pieces a ``tiktoken.Encoding`` is built from, and a slow pure-Python BPE to learn from.

A byte-level BPE tokenizer (GPT-2, SmolLM2, Llama 3, Qwen) works on UTF-8 bytes:

1. a **pre-tokenizer regex** cuts the text into pieces (words with their leading space, single digits,
   runs of punctuation or whitespace); merges never cross a piece boundary;
2. inside a piece, **BPE** starts from single bytes and repeatedly merges the adjacent pair whose merged
   token has the lowest **rank** (the earliest-learned merge), until no adjacent pair is in the vocabulary.

Hugging Face files spell each token's bytes as printable characters (GPT-2's ``bytes_to_unicode``:
space is ``Ġ``, newline ``Ċ``); :func:`token_bytes` undoes that. tiktoken wants ``{bytes: rank}``;
when a vocabulary's ids grow with its merge order (true of every BPE trained by ``tokenizers``; checked
by :func:`mergeable_ranks`), the token id *is* the rank, and tiktoken's lowest-rank-first merging gives
the same ids as Hugging Face's merge list.

Leaves out: SentencePiece-style BPE (Llama 2, Mistral v1: ``▁`` for space, byte fallback), BPE dropout.
"""

from collections.abc import Callable, Iterable, Mapping

import regex

# The pre-tokenizer regexes, by the name llama.cpp writes in GGUF's `tokenizer.ggml.pre`.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# SmolLM: every digit on its own first (HF: Digits(individual_digits=True)), then GPT-2's regex on the
# rest. In one regex: a digit is a piece, and whitespace may end right before a digit, as it would at
# the end of a separate piece ("a  1" -> "a", "  ", "1"; GPT-2's regex gives "a", " ", " 1").
SMOLLM_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
                  r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN2_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")
PRE_TOKENIZERS = {"gpt2": GPT2_PATTERN, "default": GPT2_PATTERN, "smollm": SMOLLM_PATTERN,
                  "llama3": LLAMA3_PATTERN, "llama-bpe": LLAMA3_PATTERN, "qwen2": QWEN2_PATTERN}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character: printable Latin-1 maps to itself, the other
    68 bytes (control characters, space, ...) to U+0100 onwards, so that ``0x20`` (space) is ``Ġ``."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


_TO_LATIN1 = {ord(c): b for b, c in bytes_to_unicode().items()}  # printable char -> the byte it stands for


def token_bytes(token: str) -> bytes:
    """A byte-level vocabulary entry (``"Ġthe"``) as the bytes it stands for (``b" the"``)."""
    try:
        return token.translate(_TO_LATIN1).encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError(f"{token!r} is not a byte-level BPE token (a SentencePiece vocabulary?)") from None


def mergeable_ranks(vocab: Mapping[str, int], merges: Iterable[str | tuple[str, str] | list[str]],
                    skip_ids: set[int] = frozenset()) -> dict[bytes, int]:
    """tiktoken's ``{token bytes: rank}`` from a Hugging Face vocabulary and merge list; the rank is the id.

    Raises ``ValueError`` unless the merges' results have non-decreasing ids: otherwise the ids are not
    merge priorities, and tiktoken would merge in a different order than Hugging Face does.
    """
    last = -1
    for i, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        merged = vocab.get(left + right)
        if merged is None or merged < last:
            raise ValueError(f"merge {i} ({left!r} + {right!r}) does not produce a later token id than the merge "
                             "before it: the ids are not merge priorities, so this vocabulary cannot be a "
                             "tiktoken encoding")
        last = merged
    return {token_bytes(tok): i for tok, i in vocab.items() if i not in skip_ids}


# ---------------------------------------------------------------------------- slow BPE, for learning
def bpe_merge_steps(piece: bytes, ranks: Mapping[bytes, int]) -> list[list[bytes]]:
    """Every state of BPE on one pre-tokenized piece, from single bytes to the final tokens.

    Each step merges the adjacent pair whose merged bytes have the lowest rank (leftmost on a tie),
    exactly as tiktoken does; it stops when no adjacent pair forms a token.
    """
    parts = [piece[i:i + 1] for i in range(len(piece))]
    steps = [parts]
    while len(parts) > 1:
        pair_ranks = [ranks.get(a + b) for a, b in zip(parts, parts[1:])]
        candidates = [(r, i) for i, r in enumerate(pair_ranks) if r is not None]
        if not candidates:
            break
        _, i = min(candidates)
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]
        steps.append(parts)
    return steps


def bpe_encode_piece(piece: bytes, ranks: Mapping[bytes, int]) -> list[int]:
    """The token ids of one piece, by :func:`bpe_merge_steps` (slow: a reference, not the engine)."""
    return [ranks[part] for part in bpe_merge_steps(piece, ranks)[-1]]


def encode_ordinary_python(text: str, pattern: str, bpe: Callable[[bytes], list[int]]) -> list[int]:
    """Encode ``text`` without special tokens: cut it with the pre-tokenizer ``pattern``, then run the
    given BPE function (yours, in notebook 02) on each piece's UTF-8 bytes."""
    return [i for piece in regex.findall(pattern, text) for i in bpe(piece.encode("utf-8"))]
