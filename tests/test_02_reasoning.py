"""Phase 02 (chat side): splitting Qwen3's ``<think>…</think>`` output into reasoning and content.

Answer keys are hand-written: each case says what a reader of vLLM's Qwen3 reasoning parser expects
(text inside the block is reasoning, no ``<think>`` at all means it is all content). Streaming is checked
by cutting the same texts into deltas at every position, and into every tag split across two deltas:
the pieces must add up to the whole-text answer, and no delta may show part of a tag.
"""

import pytest

from minivllm.reasoning import (ReasoningSplit, ReasoningStreamParser, extract_reasoning,
                                prompt_opens_reasoning)

CASES = [  # (generated text, reasoning_content, content)
    ("<think>\nThe user greets me.\n</think>\n\nHello!", "\nThe user greets me.\n", "\n\nHello!"),
    ("Paris is the capital.", None, "Paris is the capital."),  # enable_thinking=False: no tags at all
    ("<think>\nstill thinking when max_tokens ran out", "\nstill thinking when max_tokens ran out", None),
    ("<think></think>Answer.", None, "Answer."),  # an empty block
    ("<think>a</think>", "a", None),  # thought, then stopped before answering
    ("<think>x < y and </thin is not a tag</think>ok", "x < y and </thin is not a tag", "ok"),
    ("<think>r</think>then <think>later tags</think> are text", "r", "then <think>later tags</think> are text"),
    ("a stray </think> without an opening tag", None, "a stray </think> without an opening tag"),
    ("Let me <think>see</think> done", "see", "Let me  done"),  # text before <think> is content
    ("ends with a partial tag <thi", None, "ends with a partial tag <thi"),
    ("<think>ends with a partial close </thi", "ends with a partial close </thi", None),
    ("", None, None),
]


@pytest.mark.parametrize("text, reasoning, content", CASES)
def test_whole_text_splits_as_written(text, reasoning, content):
    assert extract_reasoning(text) == ReasoningSplit(reasoning, content)


def _stream(deltas: list[str], **kwargs) -> tuple[list[ReasoningSplit], ReasoningSplit]:
    parser = ReasoningStreamParser(**kwargs)
    pieces = [parser.push(d) for d in deltas]
    pieces.append(parser.flush())
    r = "".join(p.reasoning_content or "" for p in pieces) or None
    c = "".join(p.content or "" for p in pieces) or None
    return pieces, ReasoningSplit(r, c)


@pytest.mark.parametrize("text, reasoning, content", CASES)
def test_every_two_delta_cut_streams_the_same_split(text, reasoning, content):
    for cut in range(len(text) + 1):
        _, total = _stream([text[:cut], text[cut:]])
        assert total == ReasoningSplit(reasoning, content), f"cut at {cut}: {text[:cut]!r} | {text[cut:]!r}"


@pytest.mark.parametrize("text, reasoning, content", CASES)
def test_one_character_deltas_stream_the_same_split(text, reasoning, content):
    # a tag leaking out in pieces, or text lost while held back, would change the totals
    _, total = _stream(list(text))
    assert total == ReasoningSplit(reasoning, content)


def test_tags_cut_across_deltas_are_held_back_then_consumed():
    parser = ReasoningStreamParser()
    assert parser.push("<th") == ReasoningSplit(None, None)  # might be <think>: wait
    assert parser.push("ink>\nWe") == ReasoningSplit("\nWe", None)
    assert parser.in_reasoning
    assert parser.push(" add.</") == ReasoningSplit(" add.", None)  # "</" held back
    assert parser.push("thi") == ReasoningSplit(None, None)
    assert parser.push("nk>\n\n4") == ReasoningSplit(None, "\n\n4")
    assert not parser.in_reasoning
    assert parser.push("</think>") == ReasoningSplit(None, "</think>")  # after the block: plain text
    assert parser.flush() == ReasoningSplit(None, None)


def test_a_held_back_prefix_that_is_not_a_tag_is_released():
    parser = ReasoningStreamParser()
    assert parser.push("x <") == ReasoningSplit(None, "x ")
    assert parser.push("b>") == ReasoningSplit(None, "<b>")
    assert parser.push("<thin") == ReasoningSplit(None, None)
    assert parser.flush() == ReasoningSplit(None, "<thin")


def test_one_delta_holding_a_whole_block_and_the_answer():
    parser = ReasoningStreamParser()
    assert parser.push("<think>hm</think>\n\nYes") == ReasoningSplit("hm", "\n\nYes")


def test_a_prompt_that_opens_the_block_starts_in_reasoning():
    opened = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n"
    closed = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    plain = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert prompt_opens_reasoning(opened)
    assert not prompt_opens_reasoning(closed) and not prompt_opens_reasoning(plain)
    text = "It is a greeting.\n</think>\n\nHello!"
    assert extract_reasoning(text, starts_in_reasoning=True) == ReasoningSplit("It is a greeting.\n", "\n\nHello!")
    assert extract_reasoning(text) == ReasoningSplit(None, text)  # no <think>: all content
    _, total = _stream(list(text), starts_in_reasoning=True)
    assert total == ReasoningSplit("It is a greeting.\n", "\n\nHello!")
