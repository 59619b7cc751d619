"""Notebook 04's plots: what RoPE does to a vector and why attention then sees relative positions. Each
function returns a matplotlib ``Figure`` and shows nothing.

Both compute with the package's reference, :func:`kernels.rope.apply_rope_ref`, so they draw what the engine
does. How fast the kernel runs is drawn by :func:`minivllm.course.plots.kernel_bandwidth` (phases 03-05).
"""

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure

from kernels.rope import apply_rope_ref, rope_cache


def rotate_one(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """One head vector ``x`` (d,) rotated to each of ``positions``: (len(positions), d), float32."""
    table = rope_cache(x.numel(), int(positions.max()) + 1, theta)
    xs = x.float().expand(len(positions), 1, -1).contiguous()  # (positions, 1 head, d)
    return apply_rope_ref(xs, xs, positions, table)[0][:, 0]


def pair_rotation(head_dim: int = 8, theta: float = 10_000.0, n_positions: int = 9, seed: int = 0) -> Figure:
    """Each pair (x[i], x[i + d/2]) of a random vector, drawn at positions 0..n_positions-1: one panel per pair.

    Pair i turns by inv_freq[i] = theta^(-2i/d) radians per position: the first pairs spin, the last barely move.
    """
    x = torch.randn(head_dim, generator=torch.Generator().manual_seed(seed))
    out = rotate_one(x, torch.arange(n_positions), theta).numpy()  # (positions, d)
    half = head_dim // 2
    fig, axes = plt.subplots(1, half, figsize=(2.6 * half, 3.2), squeeze=False, layout="constrained")
    colors = plt.get_cmap("viridis")(np.linspace(0, 0.9, n_positions))
    for i, ax in enumerate(axes[0]):
        u, v = out[:, i], out[:, i + half]
        r = float(np.hypot(u[0], v[0]))
        ax.add_patch(plt.Circle((0, 0), r, fill=False, color="lightgray"))
        ax.plot(u, v, color="gray", lw=0.8, zorder=1)
        ax.scatter(u, v, c=colors, s=28, zorder=2)
        ax.annotate("p=0", (u[0], v[0]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlim(-1.25 * r, 1.25 * r)
        ax.set_ylim(-1.25 * r, 1.25 * r)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"pair ({i}, {i + half})\n{theta ** (-2 * i / head_dim):.3g} rad / position", fontsize=9)
    fig.suptitle(f"RoPE turns each pair of a {head_dim}-dim vector by its own angle per position "
                 f"(theta = {theta:g}; positions 0..{n_positions - 1}, dark to light)", fontsize=10)
    return fig


def relative_scores(head_dim: int = 64, theta: float = 10_000.0, n_positions: int = 48,
                    offsets: tuple[int, ...] = (0, 500, 5000), seed: int = 0) -> Figure:
    """Left: the score rope(q, m) · rope(k, n) for query position m and key position n (constant along
    diagonals). Right: the same score against the distance m - n, for keys at several absolute offsets.

    k is q plus noise, a key that matches the query: its score is highest at distance 0.
    """
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(head_dim, generator=g)
    k = q + 0.5 * torch.randn(head_dim, generator=g)
    pos = torch.arange(n_positions)
    scores = rotate_one(q, pos, theta) @ rotate_one(k, pos, theta).T  # (m, n)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    image = left.imshow(scores.numpy(), cmap="RdBu_r", origin="upper")
    fig.colorbar(image, ax=left, shrink=0.85)
    left.set_xlabel("key position n")
    left.set_ylabel("query position m")
    left.set_title("q·k after RoPE: constant along each diagonal m − n", fontsize=10)
    distance = torch.arange(n_positions)
    for j, offset in enumerate(offsets):  # query at offset + distance, key at offset: the curves coincide
        rq = rotate_one(q, offset + distance, theta)
        rk = rotate_one(k, torch.full_like(distance, offset), theta)
        right.plot(distance.numpy(), (rq * rk).sum(-1).numpy(), lw=6 / (j + 1), alpha=0.8,
                   linestyle="-" if j == 0 else (0, (4, 2 * j)), label=f"key at position {offset}")
    right.set_xlabel("distance m − n (query after key)")
    right.set_ylabel("q·k")
    right.set_title("the same curve wherever the pair sits in the sequence", fontsize=10)
    right.grid(True, alpha=0.3)
    right.legend()
    fig.tight_layout()
    return fig
