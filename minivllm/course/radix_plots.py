"""Phase 09's pictures: the radix tree as requests arrive and leave, and what the cache saves.

:func:`tree_snapshot` copies a :class:`~minivllm.cache.RadixCache`'s tree into plain records (the tree
changes with every request, a picture must not); :func:`draw_trees` draws snapshots side by side,
:func:`draw_tree` one cache as it is now. :func:`cache_size_sweep` plots a simulation's hit rate and
prefill work against the cache size, :func:`radix_ops` the CPU benchmark (``bench/results/09_radix_cpu.json``).
Each returns a matplotlib ``Figure`` already closed in pyplot, so it shows once: as a cell's last expression.
"""

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.patches import FancyBboxPatch, Patch

from minivllm.cache import RadixCache, RadixNode

LOCKED, EVICTABLE, ROOT, HIGHLIGHT = "#C44E52", "#4C72B0", "#8C8C8C", "#E3A72F"


@dataclass(slots=True, frozen=True)
class NodeView:
    """One node of a snapshot: what the picture shows of it."""

    id: int
    parent: int | None  # None for the root
    label: str  # the edge's tokens, as text
    blocks: tuple[int, ...]
    lock_ref: int
    highlighted: bool


def tree_snapshot(cache: RadixCache, words: Callable[[int], str] | Sequence[str] | None = None,
                  highlight: Iterable[RadixNode] = ()) -> list[NodeView]:
    """The tree's nodes, root first, parents before children. ``words`` turns a token id into text;
    ``highlight`` marks nodes (e.g. a match's path) to draw with a gold border."""
    name = words if callable(words) else (lambda t: str(words[t])) if words is not None else str
    marked = {id(n) for n in highlight}
    out, stack = [], [(cache.root, None)]
    while stack:
        node, parent = stack.pop()
        label = " ".join(name(t) for t in node.key) if node is not cache.root else "root"
        out.append(NodeView(len(out), parent, label, tuple(node.blocks), node.lock_ref, id(node) in marked))
        me = out[-1].id
        stack.extend((child, me) for _, child in sorted(node.children.items(), reverse=True))
    return out


def _layout(nodes: list[NodeView]) -> dict[int, tuple[float, float]]:
    """Leaves side by side in depth-first order, each parent centred above its children."""
    children: dict[int, list[int]] = {n.id: [] for n in nodes}
    for n in nodes:
        if n.parent is not None:
            children[n.parent].append(n.id)
    pos: dict[int, tuple[float, float]] = {}
    next_x = [0.0]

    def place(i: int, depth: int) -> float:
        if children[i]:
            x = sum(place(c, depth + 1) for c in children[i]) / len(children[i])
        else:
            x, next_x[0] = next_x[0], next_x[0] + 1
        pos[i] = (x, -depth)
        return x

    place(nodes[0].id, 0)
    return pos


def _draw(ax, nodes: list[NodeView], title: str | None, max_chars: int, depth: int) -> None:
    pos = _layout(nodes)
    for n in nodes:
        if n.parent is not None:
            (x0, y0), (x1, y1) = pos[n.parent], pos[n.id]
            ax.plot([x0, x1], [y0 - 0.2, y1 + 0.2], color="gray", lw=1, zorder=1)
    for n in nodes:
        x, y = pos[n.id]
        color = ROOT if n.parent is None else LOCKED if n.lock_ref else EVICTABLE
        ax.add_patch(FancyBboxPatch((x - 0.44, y - 0.2), 0.88, 0.4, boxstyle="round,pad=0.02", facecolor=color,
                                    alpha=0.9, edgecolor=HIGHLIGHT if n.highlighted else color,
                                    lw=3 if n.highlighted else 1, zorder=2))
        label = n.label if len(n.label) <= max_chars else n.label[: max_chars - 1] + "…"
        ax.text(x, y + 0.06, label, ha="center", va="center", color="white", fontsize=7, zorder=3)
        if n.parent is not None:
            lock = f"  lock {n.lock_ref}" if n.lock_ref else ""
            ax.text(x, y - 0.1, "blocks " + ",".join(map(str, n.blocks)) + lock, ha="center", va="center",
                    color="white", fontsize=6, zorder=3)
    xs = [p[0] for p in pos.values()]
    ax.set_xlim(min(xs) - 0.55, max(xs) + 0.55)
    ax.set_ylim(-depth - 0.4, 0.4)  # the same scale in every panel
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=9)


def draw_trees(snapshots: Sequence[list[NodeView]], titles: Sequence[str] | None = None,
               max_chars: int = 22) -> Figure:
    """Snapshots side by side (one panel each): red nodes are locked, blue ones evictable."""
    widths = [max(1, sum(1 for n in s if not any(m.parent == n.id for m in s))) for s in snapshots]
    depth = max(-min(p[1] for p in _layout(s).values()) for s in snapshots)
    fig, axes = plt.subplots(1, len(snapshots), figsize=(1.35 * sum(widths) + 0.6 * len(snapshots), 0.8 * depth + 1.7),
                             gridspec_kw={"width_ratios": widths}, squeeze=False)
    for i, (ax, snap) in enumerate(zip(axes[0], snapshots)):
        _draw(ax, snap, titles[i] if titles else None, max_chars, depth)
    handles = [Patch(color=LOCKED, label="locked (a running request uses it)"),
               Patch(color=EVICTABLE, label="evictable"),
               Patch(facecolor="white", edgecolor=HIGHLIGHT, lw=3, label="matched / inserted by the last request")]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    plt.close(fig)
    return fig


def draw_tree(cache: RadixCache, words: Callable[[int], str] | Sequence[str] | None = None,
              highlight: Iterable[RadixNode] = (), title: str | None = None) -> Figure:
    """The cache's tree as it is now."""
    return draw_trees([tree_snapshot(cache, words, highlight)], [title] if title else None)


def cache_size_sweep(result: dict) -> Figure:
    """Token hit rate, and prefill tokens computed, against the cache size in blocks.

    ``result``: ``cache_blocks``, ``token_hit_rate`` (0..1) and ``prefill_tokens`` (lists of one length),
    ``prefill_tokens_without_cache`` (a number), and optionally ``working_set_blocks``: the blocks that
    hold every prefix the workload ever produced (a larger cache gains nothing), and
    ``system_prompt_hit_rate``: the hit rate that sharing the system prompts alone would give.
    """
    sizes, rate, prefill = result["cache_blocks"], result["token_hit_rate"], result["prefill_tokens"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(sizes, [100 * r for r in rate], marker="o", color=EVICTABLE, label="prompt tokens found in the cache")
    if result.get("system_prompt_hit_rate") is not None:
        ax1.axhline(100 * result["system_prompt_hit_rate"], color=EVICTABLE, ls="--", alpha=0.6,
                    label="from the system prompts alone")
    ax1.set_ylabel("token hit rate (%)")
    ax1.set_ylim(0, 100)
    ax2.plot(sizes, prefill, marker="o", color=LOCKED, label="with the radix cache")
    ax2.axhline(result["prefill_tokens_without_cache"], color="gray", ls="--", label="without a cache")
    ax2.set_ylabel("prefill tokens computed")
    ax2.set_ylim(0, 1.1 * result["prefill_tokens_without_cache"])
    ax2.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:,.0f}"))
        ax.set_xlabel("cache size (KV blocks, log scale)")
        ax.grid(True, alpha=0.3)
        if result.get("working_set_blocks"):
            ax.axvline(result["working_set_blocks"], color="gray", ls=":", label="everything fits")
        ax.legend(loc="lower right" if ax is ax1 else "upper right", fontsize=8)
    ax1.set_title("how much of each prompt the cache already holds", fontsize=9)
    ax2.set_title("how much prefill work is left", fontsize=9)
    fig.tight_layout()
    plt.close(fig)
    return fig


def radix_ops(result: dict) -> Figure:
    """Operations per second of each RadixCache operation, from ``bench/results/09_radix_cpu.json``."""
    ops = result["ops_per_s"]
    labels, values = list(ops), list(ops.values())
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(labels) + 1.5))
    bars = ax.barh(labels, values, color=EVICTABLE)
    ax.bar_label(bars, labels=[f"{v:,.0f}/s" for v in values], padding=3, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlim(min(values) / 2, max(values) * 3)
    ax.set_xlabel("operations per second (one Python thread)")
    w = result.get("workload", {})
    where = result.get("cpu") or result.get("meta", {}).get("host", "CPU")
    ax.set_title(f"RadixCache with {w.get('sequences', '?'):,} cached sequences of {w.get('tokens_per_sequence', '?')} "
                 f"tokens\n{where}, {str(result.get('meta', {}).get('date', ''))[:10]}", fontsize=9)
    ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    plt.close(fig)
    return fig
