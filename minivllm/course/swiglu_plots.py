"""Plots for notebook 05 (SwiGLU). Each function returns a matplotlib ``Figure`` and shows nothing.

* :func:`activation_curves` -- SiLU beside ReLU and GELU, and SwiGLU's gate ``silu(g) * u`` as a map.
* :func:`memory_traffic` -- bytes moved by silu-then-mul (two kernels), by the eager fp32 reference, and by
  the fused kernel (:func:`traffic_bytes` gives the numbers).

GB/s per call from a saved GPU run is drawn by :func:`minivllm.course.plots.kernel_bandwidth` (phases 03-05).
"""

import math

import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure

SILU_MIN_X = -1.2784645  # where d/dx x*sigmoid(x) = 0: 1 + x * (1 - sigmoid(x)) = 0


def activation_curves(lo: float = -6.0, hi: float = 4.0) -> Figure:
    """Left: ReLU, GELU and SiLU on [lo, hi]. Right: ``silu(g) * u``, the value SwiGLU passes on.

    SiLU is smooth, lets small negative values through (minimum -0.278 at x = -1.278) and tends to
    ReLU for large |x|. In SwiGLU it gates a second projection: for g << 0 the output is ~0 whatever u
    is; for g >> 0 it is ~g * u.
    """
    x = torch.linspace(lo, hi, 401)
    fig, (ax, gate_ax) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1.2, 1]})
    for name, y in (("ReLU", torch.relu(x)), ("GELU", torch.nn.functional.gelu(x)),
                    ("SiLU = x · sigmoid(x)", torch.nn.functional.silu(x))):
        ax.plot(x.numpy(), y.numpy(), label=name, lw=2 if name.startswith("SiLU") else 1.3)
    y_min = SILU_MIN_X / (1 + math.exp(-SILU_MIN_X))
    ax.plot([SILU_MIN_X], [y_min], "o", color="C2")
    ax.annotate(f"min {y_min:.3f} at x = {SILU_MIN_X:.3f}", xy=(SILU_MIN_X, y_min), xytext=(-5.8, 1.2),
                arrowprops=dict(arrowstyle="->", color="gray"), fontsize=9)
    ax.axhline(0, color="gray", lw=0.5)
    ax.axvline(0, color="gray", lw=0.5)
    ax.set_xlabel("x")
    ax.set_ylabel("activation(x)")
    ax.set_ylim(-1, hi)
    ax.legend(loc="upper left")
    ax.grid(True, alpha=0.3)
    ax.set_title("SiLU: smooth, non-monotonic, ReLU-like for large |x|", fontsize=10)

    g = torch.linspace(-6, 6, 121)
    u = torch.linspace(-3, 3, 61)
    value = torch.nn.functional.silu(g)[None, :] * u[:, None]  # (u, g)
    limit = float(value.abs().max())
    image = gate_ax.imshow(value.numpy(), origin="lower", extent=(-6, 6, -3, 3), aspect="auto", cmap="RdBu_r",
                           vmin=-limit, vmax=limit)
    fig.colorbar(image, ax=gate_ax, label="silu(g) · u")
    gate_ax.set_xlabel("g = gate(x)")
    gate_ax.set_ylabel("u = up(x)")
    gate_ax.set_title("SwiGLU: the gate decides how much of up(x) passes", fontsize=10)
    fig.tight_layout()
    return fig


def traffic_bytes(tokens: int, inter: int, dtype_bytes: int = 2) -> dict[str, dict[str, int]]:
    """Bytes read and written from HBM by three ways of computing ``silu(gate) * up``.

    * silu, then mul: ``s = silu(gate)`` reads gate, writes s; ``s * up`` reads s and up, writes out:
      3 reads + 2 writes of a (tokens, inter) tensor.
    * eager fp32 reference (:func:`kernels.activation.silu_and_mul_ref`): for 2-byte dtypes, ``float()``
      first writes gate_up in fp32, every step then reads and writes fp32, and ``to(dtype)`` rounds at the end.
    * fused silu_and_mul: read gate_up once (2 halves), write out (1).
    """
    half = tokens * inter * dtype_bytes
    wide = tokens * inter * 4  # one half row in fp32
    convert = dtype_bytes < 4  # float() and to(dtype) are no-ops on fp32
    reference_read = (2 * half if convert else 0) + wide + 2 * wide + (wide if convert else 0)
    reference_written = (2 * wide if convert else 0) + wide + wide + (half if convert else 0)
    return {"silu, then mul (2 kernels)": {"read": 3 * half, "written": 2 * half},
            "eager fp32 reference": {"read": reference_read, "written": reference_written},
            "fused silu_and_mul": {"read": 2 * half, "written": half}}


def memory_traffic(tokens: int = 4096, inter: int = 3072, dtype_bytes: int = 2) -> Figure:
    """Stacked bars of MB read and written by the unfused and fused activation (:func:`traffic_bytes`)."""
    traffic = traffic_bytes(tokens, inter, dtype_bytes)
    names = list(traffic)
    read = [traffic[n]["read"] / 1e6 for n in names]
    written = [traffic[n]["written"] / 1e6 for n in names]
    fig, ax = plt.subplots(figsize=(8, 0.8 * len(names) + 1.2))
    ax.barh(names, read, color="#4C72B0", label="read")
    bars = ax.barh(names, written, left=read, color="#DD8452", label="written")
    totals = [r + w for r, w in zip(read, written)]
    ax.bar_label(bars, labels=[f"{t:.1f} MB" for t in totals], padding=4, fontsize=9)
    ax.invert_yaxis()  # first entry on top
    ax.set_xlim(0, max(totals) * 1.2)
    ax.set_xlabel("MB moved to and from HBM")
    ax.legend(loc="lower right")
    ax.set_title(f"{tokens} tokens × inter {inter}, {dtype_bytes} bytes per value\nthe fused kernel moves "
                 f"{totals[0] / totals[-1]:.2f}× fewer bytes than silu, then mul", fontsize=10)
    fig.tight_layout()
    return fig
