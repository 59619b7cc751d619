"""Split a reasoning model's output into its thinking and its answer: Qwen3's ``<think>…</think>`` blocks.

Qwen3 (with ``enable_thinking``, its template's default) writes ``<think>\\n…\\n</think>\\n\\n`` and then its
answer. An OpenAI-style API returns the two apart, as vLLM's reasoning parser does: ``reasoning_content``
(what was inside the block) and ``content`` (the rest). The rule, one state machine for whole texts and
streams alike::

    before <think>      content      (no <think> at all: everything is content)
    <think> … </think>  reasoning    (no </think> yet: the model is still thinking, or ran out of tokens)
    after </think>      content      (later tags are plain text)

A template that opens the block itself (the prompt ends inside ``<think>``, as Qwen3-2507 "Thinking"
checkpoints do) starts the parser in the reasoning state: see :func:`prompt_opens_reasoning`.

Streaming (:class:`ReasoningStreamParser`): a tag may arrive cut across deltas (``"<thi"``, ``"nk>"``), so
a delta's tail that could be the start of the tag being looked for is held back until the next delta
shows what it is (or :meth:`~ReasoningStreamParser.flush` releases it). Pushing every delta and flushing
gives exactly what :func:`extract_reasoning` gives for the whole text. Text is returned as generated: no
whitespace is stripped (the newlines around the tags stay), so the pieces always add up to the output.

The server splits chat answers this way when the model's chat template is a reasoning template (it writes
``<think>`` and ``</think>``, as Qwen3's does): :func:`uses_reasoning`. vLLM needs ``--reasoning-parser qwen3``
for that; here ``auto`` (the default) decides from the template, ``qwen3`` forces it on, ``none`` off.

Left out: other models' tag pairs (DeepSeek-R1 uses the same tags and would work), tool-call parsing,
and the token-id shortcuts vLLM takes (this works on text, so it needs no tokenizer).
"""

from dataclasses import dataclass

THINK_START, THINK_END = "<think>", "</think>"
REASONING_PARSERS = ("auto", "qwen3", "none")  # the server's choices: from the chat template, on, off
_BEFORE, _THINKING, _AFTER = "before", "thinking", "after"


@dataclass(slots=True, frozen=True)
class ReasoningSplit:
    """Thinking and answer text (of a whole output, or of one streamed delta); None where there is none."""

    reasoning_content: str | None
    content: str | None


def _held_back(text: str, tag: str) -> int:
    """How many trailing characters of ``text`` could be the beginning of ``tag`` (a proper prefix of it)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ReasoningStreamParser:
    """Feed a request's text deltas with :meth:`push`; each call returns that delta's reasoning and content."""

    def __init__(self, *, starts_in_reasoning: bool = False) -> None:
        self.state = _THINKING if starts_in_reasoning else _BEFORE
        self.pending = ""  # a tail that may be the start of the next tag, waiting for more text

    def push(self, delta: str) -> ReasoningSplit:
        """Add generated text; return what became certain (a cut tag's start is held back)."""
        text, self.pending = self.pending + delta, ""
        parts = {_THINKING: [], _BEFORE: []}  # reasoning and content pieces ("before" and "after" are content)
        while text:
            if self.state == _AFTER:
                parts[_BEFORE].append(text)
                break
            tag = THINK_START if self.state == _BEFORE else THINK_END
            channel = parts[self.state]
            at = text.find(tag)
            if at < 0:
                keep = _held_back(text, tag)
                channel.append(text[:len(text) - keep])
                self.pending = text[len(text) - keep:]
                break
            channel.append(text[:at])
            text = text[at + len(tag):]
            self.state = _THINKING if self.state == _BEFORE else _AFTER
        return ReasoningSplit("".join(parts[_THINKING]) or None, "".join(parts[_BEFORE]) or None)

    def flush(self) -> ReasoningSplit:
        """End of the output: a held-back tail was not a tag after all; it goes where it stood."""
        rest, self.pending = self.pending, ""
        if not rest:
            return ReasoningSplit(None, None)
        return ReasoningSplit(rest, None) if self.state == _THINKING else ReasoningSplit(None, rest)

    @property
    def in_reasoning(self) -> bool:
        """Whether the text so far ends inside the thinking block."""
        return self.state == _THINKING


def extract_reasoning(text: str, *, starts_in_reasoning: bool = False) -> ReasoningSplit:
    """Split a whole output into ``reasoning_content`` and ``content`` (the same rule as streaming).

    >>> extract_reasoning("<think>\\nHm.\\n</think>\\n\\nParis.")
    ReasoningSplit(reasoning_content='\\nHm.\\n', content='\\n\\nParis.')
    >>> extract_reasoning("Paris.")
    ReasoningSplit(reasoning_content=None, content='Paris.')
    """
    parser = ReasoningStreamParser(starts_in_reasoning=starts_in_reasoning)
    head, tail = parser.push(text), parser.flush()
    reasoning = (head.reasoning_content or "") + (tail.reasoning_content or "")
    content = (head.content or "") + (tail.content or "")
    return ReasoningSplit(reasoning or None, content or None)


def prompt_opens_reasoning(prompt: str) -> bool:
    """Whether a rendered prompt ends inside an open ``<think>`` block (its last ``<think>`` is not closed).

    Qwen3-0.6B's template never does this (the model writes ``<think>`` itself; ``enable_thinking=False``
    appends a closed, empty block); templates that pre-open the block do.
    """
    return prompt.rfind(THINK_START) > prompt.rfind(THINK_END)


def uses_reasoning(parser: str, chat_template: str | None) -> bool:
    """Whether to split answers into reasoning and content: ``parser`` is one of :data:`REASONING_PARSERS`;
    ``auto`` is on for a chat template that writes both tags (Qwen3's), off otherwise (SmolLM2's ChatML)."""
    if parser not in REASONING_PARSERS:
        raise ValueError(f"reasoning_parser must be one of {', '.join(REASONING_PARSERS)}, got {parser!r}")
    if parser == "auto":
        return bool(chat_template) and THINK_START in chat_template and THINK_END in chat_template
    return parser == "qwen3"
