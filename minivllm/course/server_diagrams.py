"""Phase 13's picture of the server, and how its checks read what the server sends.

:func:`request_path` draws one streaming chat request through ``minivllm.server``: the FastAPI route,
pydantic validation, ``OpenAIServing``, the ``AsyncLLMEngine`` command queue, the engine thread's step
loop, the request's own ``asyncio.Queue`` and the SSE generator, on two lanes (the event loop's thread
and the engine thread). :func:`read_sse` turns an SSE body into the list of its ``data:`` payloads, in
the form the notebook's checks compare. The layout is placed by hand for these stages: this is not a
general graph-drawing module, and ``read_sse`` reads only ``data:`` events (no ``event:``, ``id:``,
``retry:`` fields, which the server never sends).
"""

import json
from dataclasses import dataclass

import matplotlib.pyplot as plt  # importing pyplot is what lets Jupyter show a returned Figure
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle

from minivllm.course.diagrams import COLORS


@dataclass(frozen=True, slots=True)
class Stage:
    name: str  # the box's title
    detail: str  # the code that does it
    xy: tuple[float, float]  # centre in request_path()'s 12 x 6.4 canvas
    kind: str  # colour group, a key of diagrams.COLORS


_LOOP_Y, _BACK_Y, _ENGINE_Y = 4.45, 2.95, 1.0  # the request row, the answer row, the engine thread
STAGES: tuple[Stage, ...] = (
    Stage("client", "openai,\nhttpx,\nbrowser", (0.7, 3.7), "io"),
    Stage("FastAPI route", "POST /v1/chat/completions", (3.2, _LOOP_Y), "io"),
    Stage("pydantic validation", "ChatCompletionRequest", (5.7, _LOOP_Y), "control"),
    Stage("OpenAIServing", "chat template, SamplingParams", (8.2, _LOOP_Y), "control"),
    Stage("command queue", "AsyncLLMEngine.add", (10.75, _LOOP_Y), "memory"),
    Stage("engine thread", "add_request; loop: step()", (8.6, _ENGINE_Y), "engine"),
    Stage("asyncio.Queue", "one per request", (7.2, _BACK_Y), "memory"),
    Stage("SSE generator", "data: {chunk}\\n\\n ... [DONE]", (3.6, _BACK_Y), "io"),
)
# (from, to, label, where the label sits relative to the arrow's middle): the request's path, then its answer
FLOW = (
    ("client", "FastAPI route", "JSON", (0.0, 0.2)),
    ("FastAPI route", "pydantic validation", "", (0.0, 0.0)),
    ("pydantic validation", "OpenAIServing", "valid", (0.0, 0.52)),
    ("OpenAIServing", "command queue", "token ids, params", (0.0, 0.52)),
    ("command queue", "engine thread", "thread-safe queue.Queue", (0.25, 0.0)),
    ("engine thread", "asyncio.Queue", "loop.call_soon_threadsafe(put, RequestOutput)", (-0.25, 0.0)),
    ("asyncio.Queue", "SSE generator", "async for output", (0.0, 0.2)),
    ("SSE generator", "client", "chunks", (0.0, 0.25)),
)
_W, _H = 1.95, 0.85


def _figure(width: float, height: float) -> Figure:
    fig = plt.figure(figsize=(width, height))
    plt.close(fig)  # pyplot lets go of it: it shows once, as the value it is returned as
    return fig


def _size(s: Stage) -> tuple[float, float]:
    return {"client": (1.1, 2.3), "engine thread": (5.2, 1.05), "SSE generator": (2.4, _H),
            "asyncio.Queue": (2.4, _H)}.get(s.name, (_W, _H))


def _edge(s: Stage, toward: tuple[float, float]) -> tuple[float, float]:
    """Where the line from ``s``'s centre toward ``toward`` leaves its box."""
    (x, y), (w, h) = s.xy, _size(s)
    dx, dy = toward[0] - x, toward[1] - y
    t = min(w / 2 / abs(dx) if dx else float("inf"), h / 2 / abs(dy) if dy else float("inf"))
    return x + t * dx, y + t * dy


def _arrow(ax, start, end, label: str, offset: tuple[float, float]) -> None:
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=15, lw=1.4, color="#333333",
                                 gid="flow", zorder=2))
    if label:
        (dx, dy), right = offset, offset[0] < 0
        ax.text((start[0] + end[0]) / 2 + dx, (start[1] + end[1]) / 2 + dy, label, ha="right" if right else
                "left" if dx > 0 else "center", va="center", fontsize=7.5, family="monospace", zorder=4)


def request_path() -> Figure:
    """One streaming chat request through the server: two threads, two queues, one engine."""
    fig = _figure(12, 6.4)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set(xlim=(0, 12), ylim=(0, 6.4))
    ax.axis("off")
    lanes = (("event loop thread (uvicorn, asyncio): one coroutine per HTTP request", 2.2, 5.45, COLORS["io"]),
             ("engine thread: the only caller of LLMEngine", 0.25, 1.8, COLORS["engine"]))
    for i, (title, y0, y1, color) in enumerate(lanes):
        ax.add_patch(Rectangle((2.0, y0), 9.85, y1 - y0, facecolor=color, alpha=0.07, edgecolor=color, lw=1,
                               gid="lane"))
        ax.text(*((11.75, y0 + 0.1) if i == 0 else (2.1, y1 - 0.1)), title, ha="right" if i == 0 else "left",
                va="bottom" if i == 0 else "top", fontsize=9, fontstyle="italic", color=color)
    stages = {s.name: s for s in STAGES}
    for s in STAGES:
        (x, y), (w, h) = s.xy, _size(s)
        ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02,rounding_size=0.12",
                                    facecolor=COLORS[s.kind], edgecolor=COLORS[s.kind], gid="stage", zorder=1))
        ax.text(x, y + 0.13, s.name, ha="center", va="center", color="white", fontsize=10, fontweight="bold", zorder=3)
        ax.text(x, y - 0.19, s.detail, ha="center", va="center", color="white", fontsize=7.5, family="monospace",
                zorder=3)
    for src, dst, label, offset in FLOW:
        a, b = stages[src], stages[dst]
        _arrow(ax, _edge(a, b.xy), _edge(b, a.xy), label, offset)
    # a bad body never gets past validation: OpenAI's error shape, straight back
    v, c = stages["pydantic validation"], stages["client"]
    ax.add_patch(FancyArrowPatch((v.xy[0], v.xy[1] + _H / 2), (c.xy[0], c.xy[1] + _size(c)[1] / 2),
                                 arrowstyle="-|>", mutation_scale=15, lw=1.3, color="#C44E52", linestyle="--",
                                 connectionstyle="arc3,rad=0.25", gid="error", zorder=2))
    ax.text(3.3, 5.7, 'invalid: 400 {"error": {"message", "type", "param", "code"}}', ha="center", va="center",
            fontsize=8, color="#C44E52", family="monospace")
    ax.text(5.7, _ENGINE_Y - 0.3,
            "each step: schedule → run → sample → postprocess,\nfor every request in flight at once",
            ha="right", va="center", fontsize=8, color=COLORS["engine"])
    return fig


def read_sse(body: str, drop: tuple[str, ...] = ("id", "created")) -> list[dict | str]:
    """The ``data:`` payloads of a Server-Sent Events body, in order, as a client reads them.

    JSON payloads are parsed, with JSON nulls and the ``drop`` keys (per-request id, timestamp) removed at
    every level, so two streams of the same answer compare equal; a non-JSON payload (``[DONE]``) is kept as
    a string. Raises ValueError if an event is not one ``data: ...`` line, or the body does not end with the
    blank line that closes the last event.
    """
    if not body.endswith("\n\n"):
        raise ValueError(f"an SSE body ends with a blank line ('\\n\\n'); this one ends with {body[-20:]!r}")
    events = []
    for event in body[:-2].split("\n\n"):
        if not event.startswith("data: ") or "\n" in event:
            raise ValueError(f"expected one 'data: ...' line per event, got {event[:80]!r}")
        payload = event[len("data: "):]
        try:
            events.append(_clean(json.loads(payload), drop))
        except json.JSONDecodeError:
            events.append(payload)
    return events


def _clean(value, drop: tuple[str, ...]):
    if isinstance(value, dict):
        return {k: _clean(v, drop) for k, v in value.items() if v is not None and k not in drop}
    if isinstance(value, list):
        return [_clean(v, drop) for v in value]
    return value
