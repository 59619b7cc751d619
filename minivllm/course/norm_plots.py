"""Notebook 03's plots: how a block reduces a row and what fusing the residual add saves. Each function
returns a matplotlib ``Figure`` and shows nothing.

How fast the RMSNorm kernels run is drawn by :func:`minivllm.course.plots.kernel_bandwidth` (shared with
phases 04 and 05), for the kernels in :data:`NORM_KERNELS`.
"""

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, Patch, Rectangle

NORM_KERNELS = ("rms_norm", "fused_add_rms_norm", "qk_norm")
_WARP_COLORS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860")


def add_norm_traffic(hidden: int = 1024, dtype_bytes: int = 2) -> Figure:
    """Bytes per token that must cross HBM for ``residual += x; x = rms_norm(residual)``.

    Two kernels: the add reads x and residual and writes residual; the norm reads residual again and
    writes x. Fused: each tensor read once and written once. (The weight, read by every row, stays in cache.)
    """
    row = hidden * dtype_bytes
    bars = {  # label -> [(what, bytes, read?)]
        "add kernel, then\nRMSNorm kernel": [("read x", row, True), ("read residual", row, True),
                                            ("write residual", row, False), ("read residual", row, True),
                                            ("write x", row, False)],
        "fused_add_rms_norm": [("read x", row, True), ("read residual", row, True),
                               ("write residual", row, False), ("write x", row, False)],
    }
    fig, ax = plt.subplots(figsize=(9, 2.8))
    for y, (label, parts) in enumerate(bars.items()):
        left = 0
        for what, size, is_read in parts:
            ax.barh(y, size, left=left, color="#4C72B0" if is_read else "#DD8452", edgecolor="white")
            ax.text(left + size / 2, y, what, ha="center", va="center", color="white", fontsize=8)
            left += size
        ax.text(left + row * 0.05, y, f"{left:,} B", va="center", fontsize=9)
    unfused, fused = (sum(p[1] for p in parts) for parts in bars.values())
    ax.set_yticks(range(len(bars)), list(bars))
    ax.invert_yaxis()
    ax.set_xlim(0, unfused * 1.15)
    ax.set_xlabel(f"bytes per token (hidden {hidden:,}, {dtype_bytes} B per value)")
    ax.legend(handles=[Patch(color="#4C72B0", label="read"), Patch(color="#DD8452", label="written")],
              loc="lower right", fontsize=8)
    ax.set_title(f"fusing the residual add into the norm moves {1 - fused / unfused:.0%} fewer bytes", fontsize=10)
    fig.tight_layout()
    return fig


def two_level_reduction(warps: int = 4, lanes: int = 8) -> Figure:
    """How a block of ``warps`` warps sums one row (drawn with ``lanes`` lanes per warp instead of 32).

    Round 1: each warp sums its lanes with shuffles; lane 0 writes the warp's sum to ``partials[warp]``
    in shared memory. One ``syncthreads()``. Round 2: every warp reads ``partials`` and sums it with
    shuffles, so every thread holds the row's total.
    """
    if not 2 <= warps <= 32 or lanes < 2:
        raise ValueError(f"need 2..32 warps and at least 2 lanes, got {warps} warps of {lanes} lanes")
    fig, ax = plt.subplots(figsize=(max(8.0, 0.42 * warps * (lanes + 1) + 2.5), 5.2))
    width = warps * (lanes + 1) - 1
    y_threads, y_warp, y_shared, y_total = 4.0, 2.8, 1.6, 0.2
    for w in range(warps):
        color = _WARP_COLORS[w % len(_WARP_COLORS)]
        x0 = w * (lanes + 1)
        for lane in range(lanes):
            ax.add_patch(Rectangle((x0 + lane + 0.1, y_threads - 0.3), 0.8, 0.6, facecolor=color, alpha=0.8))
        ax.text(x0 + lanes / 2, y_threads + 0.55, f"warp {w}: Σ x² of its lanes' values", ha="center", fontsize=8,
                color=color)
        center = x0 + lanes / 2
        ax.add_patch(Rectangle((center - 0.6, y_warp - 0.3), 1.2, 0.6, facecolor=color))
        ax.text(center, y_warp, f"Σ w{w}", ha="center", va="center", color="white", fontsize=8)
        ax.add_patch(FancyArrowPatch((center, y_threads - 0.35), (center, y_warp + 0.35), arrowstyle="->",
                                     mutation_scale=10, color=color))
        slot = width / 2 - warps * 0.6 + w * 1.2  # partials[w] in shared memory
        ax.add_patch(Rectangle((slot, y_shared - 0.3), 1.2, 0.6, facecolor=color, edgecolor="black"))
        ax.add_patch(FancyArrowPatch((center, y_warp - 0.35), (slot + 0.6, y_shared + 0.35), arrowstyle="->",
                                     mutation_scale=10, color=color))
    ax.text(width + 0.8, (y_threads + y_warp) / 2, "round 1: shfl_xor_sync\n(registers, no barrier)", va="center",
            fontsize=8, family="monospace")
    ax.text(width + 0.8, y_shared, "lane 0 writes\npartials[warp]\n(shared memory)", va="center", fontsize=8,
            family="monospace")
    ax.axhline((y_shared + y_total) / 2 + 0.15, color="gray", linestyle=":", xmin=0.02, xmax=0.98)
    ax.text(0, (y_shared + y_total) / 2 + 0.25, "cuda.syncthreads()", fontsize=8, color="gray", family="monospace")
    ax.add_patch(Rectangle((width / 2 - 1.5, y_total - 0.3), 3.0, 0.6, facecolor="black"))
    ax.text(width / 2, y_total, "Σ x² of the row", ha="center", va="center", color="white", fontsize=9)
    ax.add_patch(FancyArrowPatch((width / 2, y_shared - 0.35), (width / 2, y_total + 0.35), arrowstyle="->",
                                 mutation_scale=10, color="black"))
    ax.text(width + 0.8, y_total, "round 2: every warp\nreduces partials:\nall threads get it", va="center",
            fontsize=8, family="monospace")
    ax.set_title(f"two-level block reduction: {warps} warps (drawn with {lanes} lanes each; a real warp has 32)",
                 fontsize=10)
    ax.set_xlim(-0.5, width + 7)
    ax.set_ylim(-0.4, y_threads + 0.9)
    ax.axis("off")
    fig.tight_layout()
    return fig
