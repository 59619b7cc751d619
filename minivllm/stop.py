"""When a request ends: stop tokens, lengths, and stop strings found in the streamed text.

Tokens: :func:`check_stop` is vLLM's rule after each new token (the scheduler applies it): once
``min_tokens`` are out, an EOS token (unless ``ignore_eos``) or one of ``stop_token_ids`` -> ``"stop"``;
otherwise ``max_tokens`` reached -> ``"length"``. Those tokens stay in the output's token ids.

Strings: a stop string can span token boundaries ("\\n\\nUser" may arrive as "\\n", "\\n", "User"), so it is
looked for in the decoded *text*. :func:`scan_stop_strings` is the pure step: given the text so far and the
new text, it reports a match (the text is cut before it, or after it with ``include_stop_str``) and how
many trailing characters must be **held back** from a stream because they might begin a stop string.
:class:`StopChecker` keeps that state for one request and returns only what is safe to send.

A match counts where a stop string first *ends* (the longest, if two end together): the answer
is the same however the text was cut into tokens. vLLM takes the first stop string in list order that
occurs in the new text instead, and holds back ``len(longest stop string) - 1`` characters always;
here only a real prefix of a stop string is held back.
"""

from collections.abc import Collection, Sequence
from typing import NamedTuple

from minivllm.sampling_params import SamplingParams


class Finish(NamedTuple):
    reason: str  # "stop" or "length", as in vLLM's finish_reason
    stop_reason: int | str | None = None  # the stop token id or stop string; None for EOS and length


def check_stop(params: SamplingParams, output_token_ids: Sequence[int], eos_token_ids: Collection[int] = (),
               *, max_model_len_reached: bool = False) -> Finish | None:
    """Whether the request ends after its latest token (``output_token_ids[-1]``); None: it goes on.

    The scheduler runs exactly this after every appended token. The order is vLLM's: once ``min_tokens``
    are out, an EOS (unless ``ignore_eos``), then a stop token; only then the length. So an EOS sampled as
    the ``max_tokens``-th token ends the request with ``"stop"``: the model finished its answer.
    """
    n = len(output_token_ids)
    if n and n >= params.min_tokens:
        last = output_token_ids[-1]
        if not params.ignore_eos and last in eos_token_ids:
            return Finish("stop")
        if last in params.stop_token_ids:
            return Finish("stop", last)
    if max_model_len_reached or (params.max_tokens is not None and n >= params.max_tokens):
        return Finish("length")
    return None


def partial_stop_length(text: str, stop: Sequence[str]) -> int:
    """The length of the longest end of ``text`` that is the beginning of a stop string, but not all of it."""
    best = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), best, -1):  # longest first; shorter than best: no use
            if text.endswith(s[:k]):
                best = k
                break
    return best


class StopScan(NamedTuple):
    text: str  # all the text to keep: old + new, cut at a matched stop string
    stop_str: str | None  # the stop string that matched, None if none did
    held: int  # characters at the end of ``text`` that may begin a stop string: not safe to stream yet


def scan_stop_strings(text: str, new_text: str, stop: Sequence[str], include_stop_str: bool = False) -> StopScan:
    """Look for stop strings that end inside ``new_text``, appended to ``text`` (already scanned, no match).

    A match: the text up to the stop string (through it with ``include_stop_str``), ``held`` 0. No match:
    the whole text, and ``held`` = :func:`partial_stop_length`.
    """
    full = text + new_text
    best: tuple[int, int, str] | None = None  # (end, -length, stop string): the earliest end, then the longest
    for s in stop:
        start = full.find(s, max(0, len(text) - len(s) + 1))  # a match must end in the new text
        if start != -1 and (best is None or (start + len(s), -len(s)) < best[:2]):
            best = (start + len(s), -len(s), s)
    if best is None:
        return StopScan(full, None, partial_stop_length(full, stop))
    end, _, s = best
    return StopScan(full[: end if include_stop_str else end - len(s)], s, 0)


class StopChecker:
    """One request's stop strings, for streaming: :meth:`push` each piece of decoded text, send what it returns.

    ``text`` is the output so far (cut at a match), ``stop_str`` the match once :attr:`stopped`.
    ``scan`` is the step function, returning ``(text, stop_str, held)`` (notebook 10 plugs in the learner's).
    """

    scan = staticmethod(scan_stop_strings)

    def __init__(self, stop: Sequence[str], include_stop_str: bool = False) -> None:
        self.stop = tuple(stop)
        self.include_stop_str = include_stop_str
        self.text = ""
        self.stop_str: str | None = None
        self.sent = 0  # characters of text already returned

    @property
    def stopped(self) -> bool:
        return self.stop_str is not None

    def push(self, new_text: str, *, check: bool = True) -> str:
        """Add new text; return the newly safe part. ``check=False`` (before ``min_tokens``): no match is
        looked for, but a possible stop-string beginning is still held back."""
        if self.stopped:
            raise RuntimeError(f"the request already stopped at {self.stop_str!r}")
        if not self.stop:  # nothing to find, nothing to hold back: all of it is safe
            self.text += new_text
            return self._send(len(self.text))
        text, stop_str, held = self.scan(self.text, new_text, self.stop if check else (), self.include_stop_str)
        if not check:
            held = partial_stop_length(text, self.stop)
        self.text, self.stop_str = text, stop_str
        return self._send(len(self.text) - held)

    def flush(self) -> str:
        """The request ended for another reason (EOS, length): what was held back is final, send it."""
        return self._send(len(self.text))

    def _send(self, upto: int) -> str:
        out, self.sent = self.text[self.sent: upto], max(self.sent, upto)
        return out
