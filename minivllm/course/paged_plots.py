"""Phase 08's pictures: why paging, what a block table is, and how fast decode attention reads the cache.

:func:`simulate_fragmentation` runs one arrival/departure process of requests against a KV memory of
``num_slots`` token slots under three allocation schemes, and reports, at every moment a request is
refused, what the memory held; :func:`fragmentation_plot` draws the averages as stacked bars.
:func:`draw_block_tables` draws sequences' logical blocks and the physical pool they map into.
:func:`decode_vs_floor` draws ``bench/results/08_paged_attention.json`` (``bench/attention.py``).
Each returns a matplotlib ``Figure`` already closed in pyplot, so it shows once: as a cell's last expression.
"""

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from minivllm.utils import cdiv

SCHEMES = ("contiguous, reserve max_len", "contiguous, exact size", "paged")
PARTS = ("holds tokens", "reserved, still empty", "free, but the next request does not fit")
PART_COLORS = ("#4C72B0", "#DD8452", "#C44E52")
SEQ_COLORS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C")


@dataclass(slots=True, frozen=True)
class Fragmentation:
    """Fractions of the memory, averaged over the moments a request was refused (they sum to <= 1)."""

    scheme: str
    holds_tokens: float
    reserved_empty: float  # inside a sequence's allocation, not (yet) holding a token
    unusable_free: float  # free slots, yet the refused request does not fit (holes, or too few in all)
    refusals: int


def _first_fit(holes: list[list[int]], size: int) -> int | None:
    for h in holes:
        if h[1] >= size:
            start = h[0]
            h[0] += size
            h[1] -= size
            return start
    return None


def simulate_fragmentation(num_slots: int = 4096, max_len: int = 1024, block_size: int = 16,
                           requests: int = 2000, seed: int = 0) -> list[Fragmentation]:
    """Each request has a final length uniform in ``16 .. max_len``; requests arrive until one is
    refused, then a random running one finishes. Contiguous schemes place an allocation first-fit in
    the holes of one address range; *reserve max_len* must reserve the longest possible sequence (the
    output length is unknown at admission); paged allocates ``ceil(length / block_size)`` blocks anywhere.
    Lengths are final lengths: a snapshot of every sequence when fully grown, the kindest case for contiguous.
    """
    results = []
    for scheme in SCHEMES:
        rng = random.Random(seed)
        lengths = [rng.randint(16, max_len) for _ in range(requests)]
        running: list[tuple[int, int, int]] = []  # (start, reserved, length)
        holes = [[0, num_slots]]  # contiguous: [start, size] of free ranges, by start
        free_blocks = num_slots // block_size
        sums, refusals, i = [0.0, 0.0, 0.0], 0, 0
        while i < len(lengths):
            n = lengths[i]
            size = max_len if scheme == SCHEMES[0] else n
            if scheme == SCHEMES[2]:
                size = cdiv(n, block_size) * block_size
                start = 0 if free_blocks * block_size >= size else None
                if start is not None:
                    free_blocks -= size // block_size
            else:
                start = _first_fit(holes, size)
            if start is not None:
                running.append((start, size, n))
                i += 1
                continue
            held = sum(r[2] for r in running)
            reserved = sum(r[1] for r in running)
            sums[0] += held / num_slots
            sums[1] += (reserved - held) / num_slots
            sums[2] += (num_slots - reserved) / num_slots
            refusals += 1
            start, size, _ = running.pop(rng.randrange(len(running)))
            if scheme == SCHEMES[2]:
                free_blocks += size // block_size
            else:
                holes.append([start, size])
                holes.sort()
                merged = [holes[0]]
                for h in holes[1:]:  # join neighbouring holes
                    if merged[-1][0] + merged[-1][1] == h[0]:
                        merged[-1][1] += h[1]
                    else:
                        merged.append(h)
                holes[:] = merged
        results.append(Fragmentation(scheme, *(s / max(refusals, 1) for s in sums), refusals))
    return results


def fragmentation_plot(results: Sequence[Fragmentation]) -> Figure:
    """Stacked horizontal bars: what the KV memory held when a request was refused, per scheme."""
    fig, ax = plt.subplots(figsize=(9, 2.8))
    for y, r in enumerate(results):
        left = 0.0
        for part, value, color in zip(PARTS, (r.holds_tokens, r.reserved_empty, r.unusable_free), PART_COLORS):
            ax.barh(y, value, left=left, color=color, label=part if y == 0 else None)
            if value > 0.06:
                ax.text(left + value / 2, y, f"{value:.0%}", ha="center", va="center", color="white", fontsize=9)
            left += value
    ax.set_yticks(range(len(results)), [r.scheme for r in results])
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("fraction of the KV memory when the next request does not fit")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=3, frameon=False)
    ax.set_title("Where KV memory goes: contiguous vs paged allocation")
    fig.tight_layout()
    plt.close(fig)
    return fig


def draw_block_tables(tables: Mapping[str, Sequence[int]], lengths: Mapping[str, int], num_blocks: int,
                      block_size: int) -> Figure:
    """Top: each sequence's logical blocks (filled slots shaded); bottom: the physical pool, each block
    coloured by the sequence that owns it; a line joins every logical block to its physical block."""
    width = max(num_blocks, max((len(t) for t in tables.values()), default=0))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * width + 2), 1.0 + 0.7 * len(tables) + 1.2))
    pool_y = -1.6
    owner: dict[int, int] = {}
    for row, (name, table) in enumerate(tables.items()):
        color = SEQ_COLORS[row % len(SEQ_COLORS)]
        y = row * 0.9
        ax.text(-0.3, y + 0.3, f"{name} ({lengths[name]} tokens)", ha="right", va="center", fontsize=9)
        for j, block in enumerate(table):
            filled = min(max(lengths[name] - j * block_size, 0), block_size) / block_size
            ax.add_patch(Rectangle((j, y), 0.9, 0.6, facecolor="white", edgecolor=color))
            ax.add_patch(Rectangle((j, y), 0.9 * filled, 0.6, facecolor=color, alpha=0.45, edgecolor="none"))
            ax.text(j + 0.45, y + 0.3, str(block), ha="center", va="center", fontsize=8)
            ax.plot([j + 0.45, block + 0.45], [y, pool_y + 0.6], color=color, lw=0.8, alpha=0.6)
            owner[block] = row
    for b in range(num_blocks):
        color = SEQ_COLORS[owner[b] % len(SEQ_COLORS)] if b in owner else "#EEEEEE"
        ax.add_patch(Rectangle((b, pool_y), 0.9, 0.6, facecolor=color, edgecolor="black", lw=0.5, gid=f"pool{b}"))
        ax.text(b + 0.45, pool_y - 0.25, str(b), ha="center", va="center", fontsize=7)
    ax.text(-0.3, pool_y + 0.3, "physical pool", ha="right", va="center", fontsize=9)
    ax.set_xlim(-0.2, width + 0.1)
    ax.set_ylim(pool_y - 0.5, 0.9 * len(tables) + 0.2)
    ax.axis("off")
    ax.set_title(f"Block tables map each sequence's logical blocks to physical blocks ({block_size} tokens each)")
    fig.tight_layout()
    plt.close(fig)
    return fig


DECODE_SERIES = {"paged": ("ours, v1 (a thread per key row)", "#C44E52"),
                 "warp": ("ours, v2 (a warp per key row)", "#8172B3"),
                 "gather_sdpa": ("gather + SDPA", "#55A868"),
                 "sdpa": ("SDPA on pre-gathered K/V", "#4C72B0")}
# the left panel: one colour family per kernel (v1 reds, v2 purples), darker for larger batches, and its own
# line style and marker, so that no two of the (kernels x batch sizes) lines look alike
KERNEL_STYLE = {"paged": ("Reds", "--", "s"), "warp": ("Purples", "-", "o")}


def _shades(cmap: str, n: int) -> list:
    """``n`` distinct shades of a sequential colormap, light to dark (its palest end left out: too faint)."""
    colors = plt.get_cmap(cmap)
    return [colors(0.4 + 0.6 * i / max(n - 1, 1)) for i in range(n)]


def decode_vs_floor(result: dict, *, batch: int = 32) -> Figure:
    """``bench/results/08_paged_attention.json`` drawn. Left: each decode kernel's fraction of the bandwidth
    floor (K and V bytes / HBM bandwidth, divided by the measured time) against context length, one line per
    kernel and batch size (kernel: colour family, line style and marker; batch: shade), and the target.
    Right: µs per call at ``batch`` sequences, every method and the floor itself."""
    from minivllm.course.plots import provenance

    rows = result["decode"]
    if not rows:
        raise ValueError("the result has no decode rows")
    kernels = [k for k in ("paged", "warp") if any(r.get(f"{k}_us") is not None for r in rows)]
    batches = sorted({r["batch"] for r in rows})
    fig, (ax_f, ax_t) = plt.subplots(1, 2, figsize=(12, 5.4))
    for k in kernels:
        cmap, style, marker = KERNEL_STYLE[k]
        for b, color in zip(batches, _shades(cmap, len(batches))):
            pts = sorted((r["context"], r[f"{k}_floor_frac"]) for r in rows
                         if r["batch"] == b and r.get(f"{k}_us") is not None)
            if pts:
                ctx, frac = zip(*pts)
                ax_f.plot(ctx, frac, linestyle=style, marker=marker, ms=4, color=color,
                          label=f"{'v1' if k == 'paged' else 'v2'}, batch {b}", gid=f"{k}:{b}")
    target = result.get("floor_target")
    if target:
        ax_f.axhline(target, color="gray", linestyle=":", label=f"target {target:.0%}")
    ax_f.set_ylim(0, 1.05)
    ax_f.set_ylabel("fraction of the bandwidth floor")
    handles = {h.get_gid() or "target": h for h in ax_f.get_lines()}  # one column per batch size: v1 above v2
    # (the target line is the one without a gid)
    order = [handles[f"{k}:{b}"] for b in batches for k in kernels if f"{k}:{b}" in handles]
    order += [handles["target"]] if "target" in handles else []
    fig.legend(handles=order, fontsize=7, ncol=len(batches) + 1, loc="lower center", frameon=False,
               title="left panel: v1 (a thread per key row) reds, dashed, squares  ·  v2 (a warp per key row) "
                     "purples, solid, circles  ·  darker: larger batch", title_fontsize=7)
    ax_f.set_title("decode kernels against the HBM floor", fontsize=10)
    at = sorted((r for r in rows if r["batch"] == batch), key=lambda r: r["context"])
    if at:
        ctx = [r["context"] for r in at]
        ax_t.plot(ctx, [r["floor_us"] for r in at], "k:", label="floor: K/V bytes / HBM bandwidth", gid="floor")
        for key, (label, color) in DECODE_SERIES.items():
            if all(r.get(f"{key}_us") is not None for r in at):
                ax_t.plot(ctx, [r[f"{key}_us"] for r in at], "o-", color=color, label=label, gid=key)
        ax_t.set_yscale("log")
        ax_t.legend(fontsize=8)
    ax_t.set_ylabel("µs per call (CUDA-graph replay)")
    ax_t.set_title(f"batch {batch}: time per decode attention call", fontsize=10)
    contexts = sorted({r["context"] for r in rows})
    for ax in (ax_f, ax_t):
        ax.set_xscale("log", base=2)
        ax.set_xticks(contexts, [f"{c:,}" for c in contexts])
        ax.set_xlabel("context length (tokens per sequence)")
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"paged decode attention, one layer\nmeasured on {provenance(result.get('meta', {}))}", fontsize=9)
    fig.tight_layout(rect=(0, 0.13, 1, 1))
    plt.close(fig)
    return fig


def decode_settings(result: dict, current: tuple[int, int] | None = None) -> Figure:
    """``bench/results/17_paged_decode_cuda.json`` drawn (``python -m bench.paged_decode``): for each case, the
    fraction of the bandwidth floor that each launch setting of version 2's 16-byte kernel reaches: warps per
    block and tokens per lane group per trip (``unroll``: its loads all issued before any is used). The dotted
    line is the target; the setting the module uses is outlined: ``current`` = (warps, unroll), by default the
    one the module used when it was measured."""
    from minivllm.course.plots import provenance

    settings = result["settings"]
    names = [c["name"] for c in result["cases"]]
    if not settings or not names:
        raise ValueError("the result has no settings or no cases")
    keys = sorted(settings, key=lambda k: (settings[k]["warps"], settings[k]["unroll"]))
    warps, unroll = current or (result["defaults"]["warps"], result["defaults"]["unroll"])
    default = f"w{warps}_u{unroll}"
    width = 0.8 / len(keys)
    colors = _shades("Purples", len(keys))
    fig, ax = plt.subplots(figsize=(12, 4.6))
    for i, (key, color) in enumerate(zip(keys, colors)):
        s = settings[key]
        xs = [j - 0.4 + (i + 0.5) * width for j in range(len(names))]
        ax.bar(xs, [s["floor_fraction"][n] for n in names], width, color=color, gid=key,
               edgecolor="black" if key == default else color, linewidth=1.5 if key == default else 0.5,
               label=f"{s['warps']} warps, {s['unroll']} token{'s' if s['unroll'] > 1 else ''} per trip"
                     + ("  (the module's setting)" if key == default else ""))
    target = result.get("floor_target")
    if target:
        ax.axhline(target, color="gray", linestyle=":", label=f"target {target:.0%}")
    ax.set_xticks(range(len(names)), [n.replace("_", "\n") for n in names], fontsize=8)
    ax.set_ylabel("fraction of the bandwidth floor")
    ax.set_ylim(0, 1.05)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="upper right")
    ax.set_title("paged decode attention (bf16, 16-byte loads), one layer: launch settings against the floor\n"
                 f"measured on {provenance(result.get('meta', {}))}", fontsize=9)
    fig.tight_layout()
    plt.close(fig)
    return fig


def rounding_error(x, dtypes: Mapping[str, object], bins: int = 40) -> Figure:
    """How much a value loses when it is stored in each of ``dtypes`` (name -> torch dtype), by its size: the
    median relative error ``|stored - x| / |x|`` of the samples ``x`` (a 1-D float32 tensor) in each of ``bins``
    logarithmic bins of ``|x|``. e4m3 (fp8) is stored saturated at +-448, as the engine stores it."""
    import torch

    x = x[x != 0].float()
    edges = torch.logspace(float(x.abs().min().log10()), float(x.abs().max().log10()), bins + 1)
    which = torch.bucketize(x.abs(), edges).clamp(1, bins) - 1
    centres = (edges[:-1] * edges[1:]).sqrt()
    fig, ax = plt.subplots(figsize=(8, 3.8))
    for (name, dtype), color in zip(dtypes.items(), ("tab:blue", "tab:orange", "tab:green")):
        stored = x.clamp(-448.0, 448.0).to(dtype) if dtype == torch.float8_e4m3fn else x.to(dtype)
        rel = (stored.float() - x).abs() / x.abs()
        med = [float(rel[which == b].median()) if bool((which == b).any()) else float("nan") for b in range(bins)]
        ax.plot(centres, med, marker=".", color=color, label=name, gid=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("|value|")
    ax.set_ylabel("median relative error when stored")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("what a K or V value loses in the cache, by its size", fontsize=9)
    fig.tight_layout()
    plt.close(fig)
    return fig


FP8_VARIANTS = (("fp8_shift", "masks and shifts, fp32 math"), ("fp8_cvt", "hardware conversion, fp32 math"),
                ("fp8_h2", "masks and shifts, fp16 pairs"), ("fp8_cvth2", "hardware conversion, fp16 pairs"))


def fp8_variants(result: dict, gpu: str = "h100") -> Figure:
    """``bench/results/17_fp8_decode_variants_cuda.json`` drawn for one GPU (``gpu``: its key, "gpu_rows" in a
    fresh ``python -m bench.fp8_decode_variants`` run): per case, each build of the fp8 decode
    kernel's speed over the bf16 pool's (2x: every byte saved turned into time), with the fraction of the fp8
    floor the last build reaches written above its bar."""
    rows = result[gpu]
    names = list(rows)
    variants = [(key, label) for key, label in FP8_VARIANTS if key in rows[names[0]]]
    fig, ax = plt.subplots(figsize=(11, 4.4))
    width = 0.8 / len(variants)
    colors = ("#F2B880", "#E08A3C", "#9DC3E6", "#2E75B6")
    for i, (key, label) in enumerate(variants):
        xs = [j - 0.4 + width * (i + 0.5) for j in range(len(names))]
        bars = ax.bar(xs, [rows[n]["bf16"] / rows[n][key] for n in names], width, color=colors[i % 4], label=label,
                      gid=key)
        if i == len(variants) - 1:
            for bar, n in zip(bars, names):
                ax.annotate(f"{rows[n]['floor_fp8_us'] / rows[n][key]:.0%}",
                            (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                            fontsize=7)
    ax.axhline(2.0, color="0.3", ls="--", lw=1)
    ax.annotate("half the bytes: 2x", (len(names) - 0.5, 2.0), ha="right", va="bottom", fontsize=8, color="0.3")
    ax.axhline(1.0, color="0.6", lw=0.8)
    ax.set_xticks(range(len(names)), [n.replace("_", "\n") for n in names], fontsize=8)
    ax.set_ylabel("speed over the bf16 pool")
    ax.set_ylim(0, 2.4)
    ax.legend(fontsize=8, loc="lower left", ncols=2)
    meta = result.get("meta", {})  # the stored file names both GPUs; a run of bench.fp8_decode_variants its own
    gpu_name = meta.get("gpus", {}).get(gpu) or meta.get("gpu", gpu)
    ax.set_title("paged decode attention, one layer: four builds of the fp8 kernel against the bf16 pool (above the "
                 f"last: its fraction of the fp8 floor)\nmeasured on {gpu_name}", fontsize=9)
    fig.tight_layout()
    plt.close(fig)
    return fig
