"""Plots shared by the notebooks. Each function returns a matplotlib ``Figure`` and shows nothing.

Phase 01: :func:`thread_hierarchy` and :func:`reduction_tree` (pictures of CUDA ideas), and
:func:`bandwidth` / :func:`launch_overhead` for measurements in the ``bench/results`` schema
(``{"meta": {...}, "bandwidth": {...}, "launch_us": {...}}``). Phases 03-05: :func:`kernel_bandwidth`
for ``bench/results/03_05_kernels.json`` (``{"meta": {...}, "results": [{"kernel", "tokens",
"numba_gbps", "eager_gbps", "compile_gbps", ...}]}``). A measurement's plot always names where and
when it was taken, read from ``meta`` (:func:`provenance`).
"""

from collections.abc import Sequence

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.patches import FancyBboxPatch, Rectangle

_BLOCK_COLORS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860")
_KERNEL_SERIES = {"numba": "numba kernel", "eager": "eager PyTorch", "compile": "torch.compile"}  # key -> label


def provenance(meta: dict) -> str:
    """One line on where a measurement comes from: GPU, date, command."""
    gpu = meta.get("gpu") or "unknown GPU"
    date = str(meta["date"])[:10] if meta.get("date") else "unknown date"  # ISO date, no time of day
    command = meta.get("command")
    return f"{gpu}, {date}" + (f"  ·  `{command}`" if command else "")


def thread_hierarchy(grid_blocks: int = 3, block_threads: int = 8) -> Figure:
    """A 1-D grid of ``grid_blocks`` blocks of ``block_threads`` threads, each with its global index.

    Every thread computes ``i = blockIdx.x * blockDim.x + threadIdx.x`` (``cuda.grid(1)``): the
    blocks tile the index range side by side.
    """
    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * grid_blocks * (block_threads + 1), 2.6))
    for b in range(grid_blocks):
        color = _BLOCK_COLORS[b % len(_BLOCK_COLORS)]
        x0 = b * (block_threads + 1)
        ax.add_patch(FancyBboxPatch((x0 - 0.15, -0.35), block_threads + 0.3, 1.7, boxstyle="round,pad=0.05",
                                    facecolor=color, alpha=0.15, edgecolor=color))
        ax.text(x0 + block_threads / 2, 1.55, f"blockIdx.x = {b}", ha="center", color=color, fontweight="bold")
        for t in range(block_threads):
            ax.add_patch(Rectangle((x0 + t + 0.08, 0.35), 0.84, 0.8, facecolor=color, alpha=0.75))
            ax.text(x0 + t + 0.5, 0.75, str(t), ha="center", va="center", color="white", fontsize=9)
            ax.text(x0 + t + 0.5, -0.05, str(b * block_threads + t), ha="center", va="center", fontsize=9)
    width = grid_blocks * (block_threads + 1) - 1
    ax.text(-0.4, 0.75, "threadIdx.x", ha="right", va="center", fontsize=9)
    ax.text(-0.4, -0.05, "i", ha="right", va="center", fontsize=9, fontstyle="italic")
    ax.set_title(f"grid of {grid_blocks} blocks × blockDim.x = {block_threads} threads:  "
                 "i = blockIdx.x · blockDim.x + threadIdx.x  (= cuda.grid(1))", fontsize=10)
    ax.set_xlim(-2.2, width + 0.4)
    ax.set_ylim(-0.5, 1.9)
    ax.axis("off")
    fig.tight_layout()
    return fig


def reduction_tree(n: int = 8, pattern: str = "halving") -> Figure:
    """How ``n`` values (a power of two) are summed in log2(n) steps.

    ``pattern="halving"``: the shared-memory tree, where at stride ``h`` thread ``t < h`` adds
    element ``t + h``, with a ``syncthreads`` between steps. ``pattern="xor"``: the warp butterfly,
    where every lane adds the value of lane ``t ^ h`` (``shfl_xor_sync``), so all end with the total.
    """
    if n < 2 or n & (n - 1):
        raise ValueError(f"n must be a power of two >= 2, got {n}")
    if pattern not in ("halving", "xor"):
        raise ValueError(f"pattern must be 'halving' or 'xor', got {pattern!r}")
    steps = n.bit_length() - 1
    fig, ax = plt.subplots(figsize=(0.8 * n + 2.5, 1.1 * steps + 1.4))
    active = n
    for level in range(steps + 1):
        y = steps - level
        for t in range(n):
            live = pattern == "xor" or t < active
            ax.add_patch(Rectangle((t + 0.1, y - 0.3), 0.8, 0.6, facecolor="#4C72B0" if live else "#DDDDDD"))
            text = f"x{t}" if level == 0 else f"Σ{1 << level}" if live else ""  # Σk: a sum of k inputs
            ax.text(t + 0.5, y, text, ha="center", va="center", color="white", fontsize=9)
        if level == steps:
            break
        h = active // 2 if pattern == "halving" else n >> (level + 1)
        for t in range(n):
            src = t + h if pattern == "halving" else t ^ h
            if pattern == "halving" and t >= h:
                continue
            ax.annotate("", xy=(t + 0.5, y - 0.72), xytext=(t + 0.5, y - 0.3),  # its own value
                        arrowprops=dict(arrowstyle="->", color="gray", lw=1, alpha=0.6))
            ax.annotate("", xy=(t + 0.5, y - 0.72), xytext=(src + 0.5, y - 0.3),
                        arrowprops=dict(arrowstyle="->", color="#C44E52", lw=1, alpha=0.8))
        label = f"stride {h}" + ("   syncthreads()" if pattern == "halving" else f"   shfl_xor_sync(·, {h})")
        ax.text(n + 0.2, y - 0.5, label, va="center", fontsize=9, family="monospace")
        active = h
    title = ("shared-memory tree: thread t adds t + stride; one barrier per step" if pattern == "halving"
             else "warp butterfly: lane t adds lane t ^ stride; every lane ends with the sum")
    ax.set_title(title, fontsize=10)
    ax.set_xlim(0, n + 3.2)
    ax.set_ylim(-0.5, steps + 0.5)
    ax.axis("off")
    fig.tight_layout()
    return fig


def bandwidth(result: dict, l2_bytes: float | None = None) -> Figure:
    """GB/s against bytes per tensor for every series in ``result["bandwidth"]`` (log-x), with the
    reachable HBM bandwidth ``meta["hbm_peak_gbps"]`` as a dashed line.

    ``l2_bytes`` (the GPU's L2 cache size) marks the size below which a copy's two tensors fit in L2.
    """
    meta, data = result.get("meta", {}), result["bandwidth"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, gbps in data["series"].items():
        ax.plot(data["bytes"], gbps, marker="o", label=name)
    peak = meta.get("hbm_peak_gbps")
    if peak:
        ax.axhline(peak, linestyle="--", color="gray", label=f"reachable HBM bandwidth ({peak:,.0f} GB/s)")
    if l2_bytes:
        ax.axvline(l2_bytes / 2, linestyle=":", color="gray")
        ax.text(l2_bytes / 2, 0.03, " ← source + destination fit in L2 ", transform=ax.get_xaxis_transform(),
                ha="right", fontsize=8, color="gray")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("bytes per tensor")
    ax.set_ylabel("GB/s (bytes read + written per second)")
    ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: _human_bytes(v)))
    ax.set_ylim(0, 1.12 * max([peak or 0, *(v for s in data["series"].values() for v in s)]))
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left")
    ax.set_title(f"copy bandwidth\nmeasured on {provenance(meta)}", fontsize=9)
    fig.tight_layout()
    return fig


def launch_overhead(result: dict) -> Figure:
    """Microseconds per call of a tiny kernel, one horizontal bar per way of launching it."""
    meta, data = result.get("meta", {}), result["launch_us"]
    labels, us = list(data), list(data.values())
    fig, ax = plt.subplots(figsize=(8, 0.55 * len(labels) + 1.4))
    bars = ax.barh(labels, us, color=_BLOCK_COLORS[: len(labels)])
    ax.bar_label(bars, labels=[f"{v:.1f} µs" for v in us], padding=3, fontsize=9)
    ax.invert_yaxis()  # first entry on top
    ax.set_xlabel("µs per call (calls issued back to back)")
    ax.set_xlim(0, max(us) * 1.18)
    ax.set_title(f"launch overhead\nmeasured on {provenance(meta)}", fontsize=9)
    fig.tight_layout()
    return fig


def kernel_bandwidth(result: dict, kernels: Sequence[str], *, title: str | None = None,
                     peak_gbps: float | None = None) -> Figure:
    """GB/s against tokens, one panel per kernel of ``kernels`` that ``result`` has (a phase 03-05 result),
    on a shared y axis: the numba kernel, eager PyTorch and ``torch.compile`` of the reference.

    A series is drawn only where every row of the panel has it. ``peak_gbps`` (default
    ``meta["hbm_peak_gbps"]``) draws the reachable HBM bandwidth as a dashed line; ``title`` (default:
    the kernels drawn and how they were timed) heads the figure, above the measurement's provenance.
    """
    if isinstance(kernels, str):
        raise TypeError(f"kernels must be a sequence of kernel names, e.g. [{kernels!r}], not a string")
    meta = result.get("meta", {})
    peak = peak_gbps or meta.get("hbm_peak_gbps")
    panels = {k: sorted((r for r in result["results"] if r["kernel"] == k), key=lambda r: r["tokens"])
              for k in kernels}
    panels = {k: rows for k, rows in panels.items() if rows}
    if not panels:
        raise ValueError(f"no results for any of the kernels {list(kernels)}")
    top = max([peak or 0, *(r.get(f"{s}_gbps") or 0 for rows in panels.values() for r in rows
                            for s in _KERNEL_SERIES)])
    fig, axes = plt.subplots(1, len(panels), figsize=(max(8.0, 5.0 * len(panels)), 4.2), squeeze=False,
                             sharey=True)
    for ax, (kernel, rows) in zip(axes[0], panels.items()):
        tokens = [r["tokens"] for r in rows]
        for (key, label), color in zip(_KERNEL_SERIES.items(), _BLOCK_COLORS):
            if all(r.get(f"{key}_gbps") is not None for r in rows):
                ax.plot(tokens, [r[f"{key}_gbps"] for r in rows], marker="o", color=color, label=label)
        if peak:
            ax.axhline(peak, linestyle="--", color="gray", label=f"reachable HBM bandwidth ({peak:,.0f} GB/s)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(tokens, [f"{t:,}" for t in tokens])
        ax.set_xlabel("tokens in the batch")
        ax.set_ylim(0, 1.12 * top or 1.0)
        ax.grid(True, alpha=0.3)
        ax.set_title(f"{kernel} ({rows[0].get('dtype', '')})", fontsize=10)
    axes[0][0].set_ylabel("GB/s (bytes read + written per second)")
    axes[0][0].legend(loc="center left", fontsize=8)  # small batches sit near 0 GB/s: the left is free
    heading = title or f"{', '.join(panels)}: GPU time per call (CUDA-graph replay)"
    fig.suptitle(f"{heading}\nmeasured on {provenance(meta)}", fontsize=9)
    fig.tight_layout()
    return fig


def _human_bytes(v: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(v) < 1024:
            return f"{v:g} {unit}"
        v /= 1024
    return f"{v:g} PiB"
