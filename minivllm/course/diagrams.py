"""Pictures of the engine for the course notebooks: its parts, and the path of one request through them.

:data:`COMPONENTS` is the one list of the engine's parts, with the phase that builds each and the
module it lands in; :func:`built` says which of those modules exist. :func:`architecture` draws the
parts and the request flow; :func:`learner_map` draws which parts hold the learner's own code (from
``minivllm.course.progress.workspace_status``); :func:`request_path` draws one request from real data
(its tokens, block table and next-token probabilities); :func:`engine_steps` the steps the engine took
for one request (:class:`StepView`); :func:`next_token_distributions` compares probability vectors.
Each returns a :class:`~matplotlib.figure.Figure` already closed in pyplot, so nothing is left open or
shown twice: a notebook shows it by making it the cell's last expression. The layout is placed by hand
for these parts: this is not a general graph-drawing module.
"""

import importlib.util
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import matplotlib.pyplot as plt  # importing pyplot is what lets Jupyter show a returned Figure
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle
from matplotlib.path import Path

if TYPE_CHECKING:
    from minivllm.course.progress import PartStatus

COLORS = {"io": "#4C72B0", "control": "#DD8452", "memory": "#55A868", "compute": "#8172B3", "engine": "#937860"}


@dataclass(frozen=True, slots=True)
class Component:
    name: str
    phase: str  # the course phase that builds it
    module: str  # where it lands in the package
    xy: tuple[float, float]  # centre in architecture()'s 12 x 7 canvas
    kind: str  # colour group, a key of COLORS


_K = 1.0  # y of the kernel row
COMPONENTS: tuple[Component, ...] = (
    Component("server", "13", "minivllm.server", (4.0, 6.3), "io"),
    Component("tokenizer", "02", "minivllm.tokenizer", (7.8, 6.3), "io"),
    Component("engine", "12", "minivllm.engine", (6.0, 2.5), "engine"),  # the frame around the step loop
    Component("scheduler", "11", "minivllm.scheduler", (1.9, 4.2), "control"),
    Component("Qwen3 model", "06", "minivllm.model", (6.6, 4.2), "compute"),
    Component("sampler", "10", "minivllm.sampler", (10.3, 4.2), "control"),
    Component("radix cache", "09", "minivllm.cache.radix", (1.9, 2.4), "memory"),
    Component("paged KV cache", "08", "minivllm.cache", (4.6, 2.4), "memory"),
    Component("launch layer", "01", "kernels._launch", (1.3, _K), "compute"),
    Component("RMSNorm", "03", "kernels.rmsnorm", (3.2, _K), "compute"),
    Component("RoPE", "04", "kernels.rope", (5.1, _K), "compute"),
    Component("SwiGLU", "05", "kernels.activation", (7.0, _K), "compute"),
    Component("flash attention", "07", "kernels.flash_attention", (8.9, _K), "compute"),
    Component("paged attention", "08", "kernels.paged_attention", (10.8, _K), "compute"),
)
# (from, to, label, curvature): solid arrows, the request's path; "client" is the outside world
FLOW = (
    ("client", "server", "prompt", 0.15), ("server", "tokenizer", "text", 0.15),
    ("tokenizer", "scheduler", "token ids", 0.0), ("scheduler", "Qwen3 model", "batch + block tables", 0.0),
    ("Qwen3 model", "sampler", "logits", 0.0), ("sampler", "scheduler", "next token: one more step", -0.25),
    ("sampler", "tokenizer", "new token ids", 0.0), ("tokenizer", "server", "text pieces", 0.15),
    ("server", "client", "streamed text", 0.15),
)
# dashed lines: which part uses which
USES = (
    ("scheduler", "paged KV cache", "allocates blocks"), ("radix cache", "paged KV cache", "shares prefixes"),
    ("Qwen3 model", "paged KV cache", "writes, reads K and V"), ("Qwen3 model", "SwiGLU", "runs on the kernels"),
)
_SIZE = {"engine": (11.6, 4.8), "client": (1.4, 0.8)}


def _figure(width: float, height: float) -> Figure:
    """A new figure that pyplot has already let go of: it shows once, as the value it is returned as."""
    fig = plt.figure(figsize=(width, height))
    plt.close(fig)
    return fig


def _size(c: Component) -> tuple[float, float]:
    return _SIZE.get(c.name, (1.75, 0.75) if c.xy[1] == _K else (2.3, 0.8))


def built() -> set[str]:
    """Names of the components whose module exists in the installed package (one phase done each)."""
    def exists(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # its parent package does not exist yet
            return False
    return {c.name for c in COMPONENTS if exists(c.module)}


def architecture(done: Collection[str] | None = None, notes: Mapping[str, str] | None = None) -> Figure:
    """The engine's parts, each with the phase that builds it, and the path of a request through them.

    ``done``: names of components drawn solid (built, or yours: :func:`learner_map`); the others are drawn
    faded with dashed edges. ``None`` draws every part solid. ``notes``: a short line per part, drawn on it.
    """
    fig = _figure(12, 7)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set(xlim=(0, 12), ylim=(0, 7))
    ax.axis("off")
    parts = {c.name: c for c in COMPONENTS} | {"client": Component("client", "", "", (0.8, 6.3), "io")}
    for c in parts.values():
        (x, y), (w, h) = c.xy, _size(c)
        ready = done is None or c.name in done or c.name == "client"
        frame = c.name == "engine"
        ax.add_patch(FancyBboxPatch(
            (x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02,rounding_size=0.12", gid="component",
            facecolor="none" if frame or c.name == "client" else COLORS[c.kind], alpha=1 if ready else 0.35,
            edgecolor=COLORS[c.kind], linewidth=2 if frame else 1.2, linestyle="-" if ready else "--", zorder=1))
        if frame:
            ax.text(x + w / 2 - 0.15, y - h / 2 + 0.12, "engine · 12: the step loop (decode as a CUDA graph)",
                    ha="right", va="bottom", fontsize=11, fontweight="bold", color=COLORS[c.kind])
        else:
            color = COLORS["io"] if c.name == "client" else "white" if ready else "#444444"
            label = c.name if c.name == "client" else f"{c.name} · {c.phase}"
            ax.text(x, y + 0.1 * (c.name != "client"), label, ha="center", va="center", color=color,
                    fontsize=9 if y == _K else 10.5, fontweight="bold", zorder=3)
            if c.module:
                ax.text(x, y - 0.2, c.module, ha="center", va="center", color=color, fontsize=7,
                        family="monospace", zorder=3)
        if notes and c.name in notes:  # a tag on the box's upper edge
            ax.text(x + w / 2 - 0.08, y + h / 2, notes[c.name], ha="right", va="center", fontsize=7, zorder=5,
                    color="#333333", gid="note", bbox=dict(boxstyle="round,pad=0.15", facecolor="white",
                                                           edgecolor=COLORS[c.kind], linewidth=0.8))
    ax.text(0.45, _K + 0.55, "numba.cuda kernels", fontsize=9, fontstyle="italic", color=COLORS["compute"])
    for src, dst, label, rad in FLOW:
        _connect(ax, parts[src], parts[dst], label, rad, solid=True)
    for src, dst, label in USES:
        _connect(ax, parts[src], parts[dst], label, 0.0, solid=False)
    ax.text(11.9, 6.85, "solid: the request's path   dashed: uses", ha="right", va="top", fontsize=8, color="gray")
    return fig


def learner_map(status: Mapping[str, "PartStatus"]) -> Figure:
    """:func:`architecture` with the learner's workspace: solid where every exercise that plugs into a part is
    yours (and where none plugs in: the package's), faded where some are still to write; a tag on each part."""
    done = {name for name, st in status.items() if st.state in ("yours", "no exercise")}
    fig = architecture(done, {name: st.note for name, st in status.items()})
    counts = [len(st.yours) for st in status.values()], [len(st.exercises) for st in status.values()]
    ax = fig.axes[0]
    ax.set_ylim(-0.5, 7)  # a strip below the engine for the legend
    fig.set_size_inches(12, 7.5)
    ax.text(6, -0.25, f"your workspace: {sum(counts[0])} of {sum(counts[1])} exercises that plug into the engine   ·   "
            "solid: yours, or the package's where no exercise plugs in   ·   faded: still to write",
            ha="center", va="center", fontsize=9, color="#333333", gid="summary")
    return fig


def _edge(c: Component, toward: tuple[float, float]) -> tuple[float, float]:
    """Where the line from ``c``'s centre toward ``toward`` leaves ``c``'s box."""
    (x, y), (w, h) = c.xy, _size(c)
    dx, dy = toward[0] - x, toward[1] - y
    t = min(w / 2 / abs(dx) if dx else float("inf"), h / 2 / abs(dy) if dy else float("inf"))
    return x + t * dx, y + t * dy


def _connect(ax, a: Component, b: Component, label: str, rad: float, *, solid: bool) -> None:
    (x1, y1), (x2, y2) = a.xy, b.xy
    control = ((x1 + x2) / 2 + rad * (y2 - y1), (y1 + y2) / 2 - rad * (x2 - x1))  # bends by rad x distance
    start, end = _edge(a, control), _edge(b, control)  # leave and enter along the curve's tangents
    curve = Path([start, control, end], [Path.MOVETO, Path.CURVE3, Path.CURVE3])  # quadratic Bézier
    ax.add_patch(FancyArrowPatch(
        path=curve, arrowstyle="-|>" if solid else "-", mutation_scale=14,
        color="#333333" if solid else "gray", linestyle="-" if solid else "--", lw=1.3,
        gid="flow" if solid else "uses", zorder=2))
    mx, my = (start[0] + 2 * control[0] + end[0]) / 4, (start[1] + 2 * control[1] + end[1]) / 4  # mid-curve
    ax.text(mx, my, label, ha="center", va="center", fontsize=8, color="#333333" if solid else "gray",
            bbox=dict(boxstyle="round,pad=0.15", facecolor="white", edgecolor="none", alpha=0.9), zorder=4)


def request_path(pieces: Sequence[str], token_ids: Sequence[int], block_table: Sequence[int], block_size: int,
                 next_token_probs: Mapping[str, float], sampled: str) -> Figure:
    """One request, stage by stage: its text cut into tokens, where their K and V live, and the next token.

    ``pieces[i]`` is the text of token ``token_ids[i]``; ``block_table[j]`` is the physical KV block
    that holds the sequence's tokens ``j*block_size`` to ``(j+1)*block_size - 1``;
    ``next_token_probs`` maps candidate next tokens to probabilities, and ``sampled`` is the one drawn.
    """
    n = len(token_ids)
    if len(pieces) != n:
        raise ValueError(f"{len(pieces)} pieces for {n} token ids")
    if len(block_table) * block_size < n:
        raise ValueError(f"{len(block_table)} blocks of {block_size} slots cannot hold {n} tokens")
    if sampled not in next_token_probs:
        raise ValueError(f"sampled token {sampled!r} is not among the candidates")
    fig = _figure(12, 8.5)
    axes = fig.subplots(3, 1, gridspec_kw=dict(height_ratios=(1.2, 1.1, 1.0)))
    titles = ("① text → token ids  (tokenizer, phase 02)",
              "② token ids → KV blocks  (paged KV cache, phase 08)",
              "③ model → logits → probabilities → sampled token  (model 06, sampler 10)")
    for ax, title in zip(axes, titles):
        ax.set_title(title, loc="left", fontsize=11, fontweight="bold")
    _token_chips(axes[0], pieces, token_ids, block_size)
    _kv_blocks(axes[1], n, block_table, block_size)
    _next_token(axes[2], next_token_probs, sampled, n, block_table, block_size)
    fig.tight_layout()
    return fig


def _block_color(j: int) -> str:
    return COLORS["control"] if j % 2 else COLORS["io"]  # neighbouring KV blocks alternate


def _shown(piece: str) -> str:
    """A token's text as the pictures show it: spaces as ·, newlines as ⏎."""
    return piece.replace(" ", "·").replace("\n", "⏎")


def _token_chips(ax, pieces: Sequence[str], token_ids: Sequence[int], block_size: int, width: float = 24) -> None:
    x = y = 0.0  # chips wrap like text; a chip's width follows its characters
    for i, (piece, tid) in enumerate(zip(pieces, token_ids)):
        shown = _shown(piece)
        w = max(len(shown), len(str(tid))) * 0.22 + 0.35
        if x + w > width:
            x, y = 0.0, y - 1.15
        ax.add_patch(FancyBboxPatch((x, y), w, 0.55, boxstyle="round,pad=0.02", facecolor=_block_color(i // block_size),
                                    alpha=0.85, edgecolor="white", gid="token"))
        ax.text(x + w / 2, y + 0.27, shown, ha="center", va="center", color="white", family="monospace", fontsize=9)
        ax.text(x + w / 2, y - 0.22, str(tid), ha="center", va="center", fontsize=8, color="#333333")
        x += w + 0.1
    ax.text(width, y - 0.45, "· is a space; colour = KV block", ha="right", fontsize=8, color="gray")
    ax.set(xlim=(-0.1, width + 0.1), ylim=(y - 0.5, 0.75))
    ax.axis("off")


def _kv_blocks(ax, n: int, block_table: Sequence[int], block_size: int, width: float = 24) -> None:
    n_phys = max(max(block_table) + 1, len(block_table))
    bw = min(2.2, width / n_phys - 0.2)
    logical_w = n_phys * (bw + 0.2) / len(block_table)  # the logical row spans the physical one
    for j, b in enumerate(block_table):  # top row: the sequence's logical blocks, arrows to where they live
        first, last = j * block_size, min(n, (j + 1) * block_size) - 1
        lx = j * logical_w + (logical_w - bw) / 2
        ax.add_patch(Rectangle((lx, 2.0), bw, 0.9, facecolor=_block_color(j), alpha=0.85))
        ax.text(lx + bw / 2, 2.45, f"logical {j}\n" + (f"tokens {first}–{last}" if first <= last else "(empty)"),
                ha="center", va="center", color="white", fontsize=8)
        ax.add_patch(FancyArrowPatch((lx + bw / 2, 2.0), (b * (bw + 0.2) + bw / 2, 1.0), arrowstyle="-|>",
                                     mutation_scale=12, color="#333333", lw=1))
    for b in range(n_phys):  # bottom row: the GPU's physical KV blocks, shared by all requests
        px, mine = b * (bw + 0.2), b in block_table
        ax.add_patch(Rectangle((px, 0), bw, 1.0, facecolor="none" if mine else "#DDDDDD", hatch=None if mine else "//",
                               edgecolor="#333333" if mine else "#BBBBBB", gid="kv_block"))
        if mine:
            j = block_table.index(b)
            filled = min(block_size, max(0, n - j * block_size))
            ax.add_patch(Rectangle((px, 0), bw * filled / block_size, 1.0, facecolor=_block_color(j), alpha=0.85,
                                   gid="kv_fill"))
            ax.text(px + bw / 2, 0.5, f"{filled}/{block_size}", ha="center", va="center", fontsize=8)
        ax.text(px + bw / 2, -0.3, f"block {b}", ha="center", va="center", fontsize=8)
    ax.text(width, 3.2, f"block table = {list(block_table)}   (grey: free, or another request's)", ha="right",
            fontsize=9, family="monospace")
    ax.set(xlim=(-0.1, width + 0.1), ylim=(-0.6, 3.4))
    ax.axis("off")


def _next_token(ax, probs: Mapping[str, float], sampled: str, n: int, block_table: Sequence[int],
                block_size: int) -> None:
    bars = ax.bar([s.replace(" ", "·") for s in probs], list(probs.values()),
                  color=[COLORS["control"] if s == sampled else COLORS["io"] for s in probs])
    ax.bar_label(bars, labels=[f"{p:.2f}" for p in probs.values()], fontsize=8)
    ax.set(ylabel="probability", ylim=(0, max(probs.values()) * 1.25))
    j, offset = divmod(n, block_size)  # where the sampled token's K and V are written in the next step
    where = f"block {block_table[j]}, slot {block_table[j] * block_size + offset}" if j < len(block_table) \
        else "a new block"
    ax.text(0.99, 0.9, f"sampled {sampled!r}: it becomes token {n}; its K and V go to {where}",
            transform=ax.transAxes, ha="right", fontsize=9, color=COLORS["control"], fontweight="bold")
    ax.spines[["top", "right"]].set_visible(False)


@dataclass(frozen=True, slots=True)
class StepView:
    """One engine step, seen from one request (read from ``LLMEngine.step_log`` and the request's ``Sequence``)."""

    step: int
    is_prefill: bool  # a prefill chunk (the prompt) or a decode (one new token)
    start: int  # position of the first token computed in this step
    num_tokens: int  # tokens computed in this step
    block_table: tuple[int, ...]  # the request's KV blocks after the step (empty: finished, blocks released)
    sampled: str | None  # the text of the token sampled at the end of the step; None: nothing sampled
    ms: float  # the step's wall time


def engine_steps(steps: Sequence[StepView], block_size: int) -> Figure:
    """One request through the engine, step by step. Top: tokens computed per step (prefill chunks, decodes),
    each bar labelled with the token sampled after it. Bottom: the request's block table after each step, one
    square per KV block (its id), filled as far as its slots hold computed tokens."""
    if not steps:
        raise ValueError("no steps to draw")
    fig = _figure(max(8.0, 0.62 * len(steps) + 2.5), 5.6)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw=dict(height_ratios=(1.2, 1.0)))
    xs = [s.step for s in steps]
    colors = [COLORS["control"] if s.is_prefill else COLORS["io"] for s in steps]
    bars = top.bar(xs, [s.num_tokens for s in steps], color=colors, gid="step")
    for bar, s in zip(bars, steps):
        label, color = ("no token yet", "gray") if s.sampled is None else (_shown(s.sampled), "#333333")
        top.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f" {label}", ha="center", va="bottom",
                 rotation=90, fontsize=8, family="monospace", color=color)
    top.set_ylim(0, max(s.num_tokens for s in steps) * 1.9)
    top.set_ylabel("tokens computed")
    top.set_title("what each step computed (orange: a prefill chunk of the prompt, blue: a decode) and the token "
                  "sampled after it", fontsize=10, loc="left")
    top.spines[["top", "right"]].set_visible(False)
    most = max(len(s.block_table) for s in steps)
    for s in steps:
        filled = s.start + s.num_tokens  # tokens whose K and V are in the cache after the step
        for j, block in enumerate(s.block_table):
            part = min(block_size, max(0, filled - j * block_size)) / block_size
            bottom.add_patch(Rectangle((s.step - 0.4, j), 0.8, 0.9, facecolor="white", edgecolor="#333333", lw=0.8,
                                       gid="kv_block"))
            bottom.add_patch(Rectangle((s.step - 0.4, j), 0.8 * part, 0.9, facecolor=_block_color(j), alpha=0.85))
            bottom.text(s.step, j + 0.45, str(block), ha="center", va="center", fontsize=8)
        if not s.block_table:
            bottom.text(s.step, 0.45, "freed", ha="center", va="center", fontsize=8, rotation=90, color="gray")
    bottom.set(ylim=(-0.2, most + 0.2), xlabel="engine step", ylabel="logical block")
    bottom.set_yticks([j + 0.45 for j in range(most)], [str(j) for j in range(most)])
    bottom.set_xticks(xs)
    bottom.set_title(f"the request's block table after each step (the number: the physical block; fill: its "
                     f"{block_size} slots in use)", fontsize=10, loc="left")
    bottom.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return fig


def next_token_distributions(candidates: Sequence[str], dists: Mapping[str, Sequence[float]]) -> Figure:
    """One bar chart per probability vector over the same ``candidates``, side by side, same y scale."""
    fig = _figure(3.2 * len(dists), 3.2)
    axes = fig.subplots(1, len(dists), sharey=True, squeeze=False)[0]
    labels = [c.replace(" ", "·") for c in candidates]
    for ax, (title, p) in zip(axes, dists.items()):
        if len(p) != len(candidates):
            raise ValueError(f"{title!r}: {len(p)} probabilities for {len(candidates)} candidates")
        ax.bar(labels, p, color=COLORS["io"])
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelrotation=60, labelsize=8)
        ax.spines[["top", "right"]].set_visible(False)
    axes[0].set_ylabel("probability")
    fig.tight_layout()
    return fig
