"""Phase 13's picture (every stage and arrow drawn), read_sse on bodies by hand and by the server's models."""

import io

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402

from minivllm.course import server_diagrams as sd  # noqa: E402
from minivllm.server import protocol as p  # noqa: E402


def test_request_path_draws_every_stage_and_arrow():
    fig = sd.request_path()
    (ax,) = fig.axes
    texts = [t.get_text() for t in ax.texts]
    for s in sd.STAGES:
        assert s.name in texts and s.detail in texts, s.name
    gids = [patch.get_gid() for patch in ax.patches]
    assert gids.count("stage") == len(sd.STAGES) and gids.count("flow") == len(sd.FLOW)
    assert gids.count("lane") == 2 and gids.count("error") == 1
    assert {n for src, dst, *_ in sd.FLOW for n in (src, dst)} == {s.name for s in sd.STAGES}
    fig.savefig(io.BytesIO(), format="png")  # it renders


def test_read_sse_parses_data_events_and_drops_nulls_and_ids():
    body = ('data: {"id": "a", "created": 1, "choices": [{"delta": {"role": null, "content": "Hi"}, '
            '"finish_reason": null}]}\n\ndata: [DONE]\n\n')
    assert sd.read_sse(body) == [{"choices": [{"delta": {"content": "Hi"}}]}, "[DONE]"]
    assert sd.read_sse(body, drop=())[0]["id"] == "a"


def test_read_sse_equal_for_the_same_chunks_with_other_ids():
    def chunk(rid: str, content: str | None, finish: str | None) -> str:
        choice = p.ChatChunkChoice(index=0, delta=p.DeltaMessage(content=content), finish_reason=finish)
        return f"data: {p.ChatCompletionChunk(id=rid, model='m', choices=[choice]).model_dump_json()}\n\n"

    one = chunk("x", "Par", None) + chunk("x", None, "stop") + "data: [DONE]\n\n"
    other = chunk("y", "Par", None) + chunk("y", None, "stop") + "data: [DONE]\n\n"
    assert sd.read_sse(one) == sd.read_sse(other)
    assert sd.read_sse(one)[1] == {"object": "chat.completion.chunk", "model": "m",
                                   "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    assert sd.read_sse(one) != sd.read_sse(chunk("x", "Paris", None) + chunk("x", None, "stop") + "data: [DONE]\n\n")


@pytest.mark.parametrize("body", ["data: [DONE]\n", "data: {}\ndata: {}\n\n", "event: x\n\n", '{"a": 1}\n\n'])
def test_read_sse_rejects_bad_framing(body):
    with pytest.raises(ValueError):
        sd.read_sse(body)
