"""Incremental detokenization: turn a stream of token ids into text, never emitting half a character.

A byte-level BPE token is a run of *bytes*, not of characters: "👋" is four UTF-8 bytes
(``F0 9F 91 8B``) and may arrive as two tokens of two bytes each. Decoding each token on its own
would print two replacement characters (``�``). So the detokenizer keeps a small byte buffer and
emits only the longest prefix that ends on a character boundary (:func:`complete_utf8_prefix`);
the rest waits for the next token.

Bytes that can never become a valid character (a stray continuation byte, an invalid lead byte) are
emitted at once as ``�``, the way ``bytes.decode(errors="replace")`` would: the stream's text is always
exactly ``decode(all ids)``. Leaves out: SentencePiece's leading-space rules and stop strings (the
sampler's job, phase 10).
"""

from collections.abc import Callable


def complete_utf8_prefix(buf: bytes) -> int:
    """Length of the longest prefix of ``buf`` that does not end inside an unfinished UTF-8 character.

    Only the last character can be unfinished: find the last byte that is not a continuation byte
    (``10xxxxxx``); if it is a lead byte (``110xxxxx``: 2 bytes, ``1110xxxx``: 3, ``11110xxx``: 4) and
    fewer bytes than it announces follow it, cut before it. Anything else (ASCII, a finished character,
    invalid bytes) is complete: there is nothing to wait for.
    """
    for back in range(1, min(4, len(buf)) + 1):  # a character has at most 3 continuation bytes
        byte = buf[-back]
        if byte & 0xC0 != 0x80:  # not a continuation byte: where the last character starts
            need = 2 if byte >> 5 == 0b110 else 3 if byte >> 4 == 0b1110 else 4 if byte >> 3 == 0b11110 else 1
            return len(buf) - back if need > back else len(buf)
    return len(buf)


class IncrementalDetokenizer:
    """Feed token ids one at a time with :meth:`push`; each call returns the text that became complete.

    ``token_bytes(id)`` gives a token's bytes; ids in ``special_ids`` are control tokens
    (``<|im_end|>``) that become their text, or are dropped when ``skip_special_tokens``: the stream's
    text equals ``Tokenizer.decode(ids, skip_special_tokens=...)`` with the same flag. ``boundary`` is the
    rule of :func:`complete_utf8_prefix` (notebook 02 plugs in the learner's version).
    """

    def __init__(self, token_bytes: Callable[[int], bytes], special_ids: frozenset[int] = frozenset(), *,
                 skip_special_tokens: bool = True,
                 boundary: Callable[[bytes], int] = complete_utf8_prefix) -> None:
        self.token_bytes = token_bytes
        self.special_ids = special_ids
        self.skip_special_tokens = skip_special_tokens
        self.boundary = boundary
        self.pending = b""  # bytes of an unfinished character, waiting for the next token

    def push(self, token_id: int) -> str:
        """Add one token; return the newly complete text (often ``""`` mid-character)."""
        if token_id in self.special_ids:
            if self.skip_special_tokens:  # as if it were not there: pending bytes keep waiting
                return ""
            return self.flush() + self.token_bytes(token_id).decode("utf-8", errors="replace")
        buf = self.pending + self.token_bytes(token_id)
        cut = self.boundary(buf)
        self.pending = buf[cut:]
        return buf[:cut].decode("utf-8", errors="replace")

    def flush(self) -> str:
        """End of stream: whatever is pending, with ``�`` for an unfinished character."""
        buf, self.pending = self.pending, b""
        return buf.decode("utf-8", errors="replace")
