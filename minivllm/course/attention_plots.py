"""Notebook 07's plots: what naive attention moves through memory against a tiled kernel, the masks of a
packed variable-length batch, how the kernel's blocks walk the key tiles of one sequence (:func:`kernel_tiles`),
the measured prefill speed (:func:`prefill_speed`, from ``bench/results/07_attention.json``) and the tensor-core
kernel's launch settings (:func:`prefill_variants`, from ``17_flash_mma_sweep_cuda.json``). Each plotting
function returns a matplotlib ``Figure`` and shows nothing.

The byte counts are a model, not a measurement: they count HBM traffic with no cache reuse between blocks.
"""

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from minivllm.utils import cdiv

_SEQ_COLORS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860")


def attention_bytes(n: int, *, n_heads: int = 16, head_dim: int = 128, dtype_bytes: int = 2,
                    rows: int = 64) -> dict[str, int]:
    """HBM bytes of one sequence of ``n`` tokens' attention (no mask), three ways.

    ``naive``: read Q, K, V; write the fp32 scores S (n x n per head), read S back for the softmax, write P
    in the dtype, read P for P @ V, write O. ``tiled``: read Q and write O once, read K and V once per tile
    of ``rows`` queries from HBM (no cache at all); S and P never leave the chip. ``tiled_l2``: the same
    kernel when the re-reads of K and V hit the L2 cache (one head's K and V, 8 MB at 16k tokens in bf16,
    fit in an H200's 50 MB L2): every tensor crosses HBM once.
    """
    if n < 1 or rows < 1:
        raise ValueError(f"n and rows must be >= 1, got n={n}, rows={rows}")
    vec = n * head_dim * dtype_bytes  # one (n, head_dim) tensor of one head
    naive = 4 * vec + n * n * (4 + 4 + 2 * dtype_bytes)
    tiled = 2 * vec + 2 * cdiv(n, rows) * vec
    return {"naive": naive * n_heads, "tiled": tiled * n_heads, "tiled_l2": 4 * vec * n_heads}


def attention_traffic(seq_lens: tuple[int, ...] = (512, 1024, 2048, 4096, 8192, 16384), *, n_heads: int = 16,
                      head_dim: int = 128, dtype_bytes: int = 2, rows: int = 64) -> Figure:
    """Bytes moved vs sequence length (log-log): naive, tiled without and with L2 reuse (:func:`attention_bytes`)."""
    data = [attention_bytes(n, n_heads=n_heads, head_dim=head_dim, dtype_bytes=dtype_bytes, rows=rows)
            for n in seq_lens]
    fig, ax = plt.subplots(figsize=(7.5, 4))
    for name, label, color in [("naive", "naive: S and P written to HBM", "#C44E52"),
                               ("tiled", f"tiled, K and V re-read from HBM per {rows} queries", "#DD8452"),
                               ("tiled_l2", "tiled, re-reads hit L2: each tensor once", "#4C72B0")]:
        ys = [d[name] / 1e9 for d in data]
        ax.plot(seq_lens, ys, "o-", color=color, label=label)
        ax.annotate(f"{ys[-1]:,.3g} GB", (seq_lens[-1], ys[-1]), textcoords="offset points", xytext=(-10, 6),
                    ha="right", fontsize=8, color=color)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("GB moved through HBM")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ratio = data[-1]["naive"] / data[-1]["tiled_l2"]
    ax.set_title(f"one layer's attention, {n_heads} heads x {head_dim}, {dtype_bytes} B values: "
                 f"{ratio:.0f}x less traffic tiled (L2 reuse) at {seq_lens[-1]:,}", fontsize=10)
    fig.tight_layout()
    return fig


def mask_matrix(q_lens: list[int], k_lens: list[int], causal: bool = True) -> np.ndarray:
    """(total_q, total_k) int array: 0 where masked, b + 1 where a query of sequence b sees the key."""
    if len(q_lens) != len(k_lens):
        raise ValueError(f"q_lens and k_lens must have one entry per sequence, got {len(q_lens)} and {len(k_lens)}")
    m = np.zeros((sum(q_lens), sum(k_lens)), dtype=np.int64)
    qo = ko = 0
    for b, (ql, kl) in enumerate(zip(q_lens, k_lens)):
        i = np.arange(ql)[:, None]
        j = np.arange(kl)[None, :]
        allowed = j <= i + (kl - ql) if causal else np.ones((ql, kl), dtype=bool)
        m[qo:qo + ql, ko:ko + kl] = np.where(allowed, b + 1, 0)
        qo, ko = qo + ql, ko + kl
    return m


def attention_mask(q_lens: list[int], k_lens: list[int] | None = None, causal: bool = True) -> Figure:
    """The mask of a packed batch: one block per sequence on the diagonal, causal (end-aligned) inside it.

    With ``k_lens`` longer than ``q_lens`` the queries are the last tokens of their sequence (earlier
    context in the cache): their triangle is shifted right by ``k_len - q_len`` columns.
    """
    k_lens = list(q_lens) if k_lens is None else list(k_lens)
    m = mask_matrix(list(q_lens), k_lens, causal)
    colors = ["#EEEEEE"] + [_SEQ_COLORS[b % len(_SEQ_COLORS)] for b in range(len(q_lens))]
    fig, ax = plt.subplots(figsize=(min(10, 3.5 + 0.35 * m.shape[1]), min(7, 2.0 + 0.35 * m.shape[0])))
    ax.imshow(m, cmap=ListedColormap(colors), vmin=-0.5, vmax=len(q_lens) + 0.5, interpolation="nearest")
    qo = ko = 0
    for b, (ql, kl) in enumerate(zip(q_lens, k_lens)):
        ax.add_patch(plt.Rectangle((ko - 0.5, qo - 0.5), kl, ql, fill=False, edgecolor="black", linewidth=1))
        ax.text(m.shape[1] - 0.2, qo + ql / 2 - 0.5, f"seq {b}: {ql} q x {kl} k", fontsize=8, va="center",
                color=colors[b + 1])
        qo, ko = qo + ql, ko + kl
    ax.set_xlabel("key (packed: cu_seqlens_k)")
    ax.set_ylabel("query (packed: cu_seqlens_q)")
    ax.set_xlim(-0.5, m.shape[1] + 3.5)
    ax.set_xticks(range(0, m.shape[1], max(1, m.shape[1] // 10)))
    ax.set_title(f"{'causal' if causal else 'full'} attention of a packed batch:\n"
                 f"{int((m > 0).sum())} of {m.size} scores computed", fontsize=10)
    fig.tight_layout()
    return fig


def online_softmax_trace(scores: np.ndarray, tile: int) -> Figure:
    """The running max ``m`` and normalizer ``l`` of one row's online softmax after each tile of keys."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1 or scores.size == 0 or tile < 1:
        raise ValueError("scores must be a non-empty 1-D array and tile >= 1")
    ms, ls, edges, m, l = [], [], [], -np.inf, 0.0
    for start in range(0, scores.size, tile):
        s = scores[start:start + tile]
        m_new = max(m, s.max())
        l = l * np.exp(m - m_new) + np.exp(s - m_new).sum()
        m = m_new
        edges.append(start - 0.5)
        ms.append(m)
        ls.append(l)
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(9, 3))
    ax0.bar(range(scores.size), scores, color="#BBBBBB")
    ax0.step(edges + [scores.size - 0.5], ms + ms[-1:], where="post", color="#C44E52",
             label="running max m after each tile")
    ax0.set_xlabel("key")
    ax0.set_ylabel("score")
    ax0.legend(fontsize=8)
    ax1.plot(range(1, len(ls) + 1), ls, "o-", color="#4C72B0", label="l = sum of exp(s - m), rescaled as m grows")
    ax1.axhline(np.exp(scores - scores.max()).sum(), color="gray", linestyle=":", label="exact, all keys at once")
    ax1.set_xlabel(f"after tile (of {tile} keys)")
    ax1.legend(fontsize=8)
    fig.suptitle("online softmax: one pass, the state rescaled whenever the max grows", fontsize=10)
    fig.tight_layout()
    return fig


SKIPPED, DIAGONAL, FULL = 0, 1, 2  # what a block does with a key tile (tile_plan)


def tile_plan(q_len: int, k_len: int, rows: int, tile: int) -> np.ndarray:
    """(query blocks, key tiles) of one sequence: what the kernel's block does with each tile of keys.

    Block ``b`` holds query rows ``b * rows ..`` (end-aligned causal: row ``i`` sees keys ``j < i + k_len - q_len
    + 1``). Its tile loop stops after the last key its last row sees, so a tile is ``SKIPPED`` (never loaded),
    ``DIAGONAL`` (loaded; some rows of the block see only part of it, or none of it) or ``FULL`` (every row of
    the block sees every key of it).
    """
    if q_len < 1 or k_len < q_len or rows < 1 or tile < 1:
        raise ValueError(f"need 1 <= q_len <= k_len and rows, tile >= 1; got q_len={q_len}, k_len={k_len}, "
                         f"rows={rows}, tile={tile}")
    offset = k_len - q_len
    plan = np.zeros((cdiv(q_len, rows), cdiv(k_len, tile)), dtype=np.int64)
    for b in range(plan.shape[0]):
        first, last = b * rows, min((b + 1) * rows, q_len) - 1
        block_limit = min(k_len, last + offset + 1)  # keys < this: the loop's bound, the same for every thread
        for t in range(plan.shape[1]):
            start, end = t * tile, min((t + 1) * tile, k_len)
            if start >= block_limit:
                plan[b, t] = SKIPPED
            elif end <= first + offset + 1:  # even the block's first row sees the whole tile
                plan[b, t] = FULL
            else:
                plan[b, t] = DIAGONAL
    return plan


def kernel_tiles(q_len: int, k_len: int, rows: int, tile: int) -> Figure:
    """One sequence's (query x key) mask with the kernel's blocks of ``rows`` queries and tiles of ``tile`` keys
    drawn over it, each (block, tile) coloured by :func:`tile_plan`."""
    plan = tile_plan(q_len, k_len, rows, tile)
    seen = mask_matrix([q_len], [k_len])  # 1 where the query sees the key
    fig, ax = plt.subplots(figsize=(min(11, 3.0 + 0.3 * k_len), min(7, 1.8 + 0.3 * q_len)))
    ax.imshow(seen, cmap=ListedColormap(["#FFFFFF", "#9DB4D6"]), vmin=0, vmax=1, interpolation="nearest")
    style = {FULL: ("#55A868", "full: every row sees every key"),
             DIAGONAL: ("#DD8452", "diagonal: rows see part of it (or none)"),
             SKIPPED: ("#BBBBBB", "skipped: past the block's last key")}
    for (b, t), kind in np.ndenumerate(plan):
        color, _ = style[kind]
        x0, y0 = t * tile - 0.5 + 0.15, b * rows - 0.5 + 0.15  # inset, so neighbours' edges stay apart
        w, h = min(tile, k_len - t * tile) - 0.3, min(rows, q_len - b * rows) - 0.3
        ax.add_patch(plt.Rectangle((x0, y0), w, h, facecolor=color if kind == SKIPPED else "none",
                                   alpha=0.35 if kind == SKIPPED else 1.0, edgecolor=color,
                                   linewidth=0.8 if kind == SKIPPED else 2.0, hatch="//" if kind == SKIPPED else None))
    for b in range(plan.shape[0]):
        ax.text(k_len - 0.2, b * rows + min(rows, q_len - b * rows) / 2 - 0.5, f" block {b}", fontsize=8,
                va="center")
    handles = [plt.Rectangle((0, 0), 1, 1, facecolor="none" if k != SKIPPED else c, edgecolor=c, linewidth=2,
                             alpha=0.6 if k == SKIPPED else 1.0, label=f"{label} ({int((plan == k).sum())})")
               for k, (c, label) in style.items()]
    ax.legend(handles=handles, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, frameon=False)
    ax.set_xlim(-0.5, k_len + 2.5)
    ax.set_xticks(range(0, k_len, tile))
    ax.set_yticks(range(0, q_len, rows))
    ax.set_xlabel(f"key (tiles of {tile}, loaded into shared memory)")
    ax.set_ylabel(f"query row (blocks of {rows} threads)")
    ax.set_title(f"one sequence, {q_len} queries over {k_len} keys (blue: scores the rows compute):\n"
                 f"{int((plan != SKIPPED).sum())} of {plan.size} (block, tile) pairs loaded", fontsize=10)
    fig.tight_layout()
    return fig


def prefill_speed(result: dict) -> Figure:
    """``bench/results/07_attention.json`` drawn: time per call (left) and TFLOP/s (right) against prompt length,
    our numba kernels (scalar: dense and paged; tensor cores, both layouts) and SDPA's flash backend; the right
    panel marks the spec-sheet peaks of scalar fp32 FMAs and of bf16 tensor cores. A series is drawn at the sizes
    where it was measured."""
    from minivllm.course.plots import provenance

    rows = sorted(result["prefill"], key=lambda r: r["tokens"])
    if not rows:
        raise ValueError("the result has no prefill rows")
    peaks = result.get("peaks", {})
    fig, (ax_ms, ax_tf) = plt.subplots(1, 2, figsize=(11, 4))
    series = [("numba", "ours (numba, scalar FMAs)", "#C44E52", "o-"),
              ("numba_paged", "ours, K/V from the paged pool", "#DD8452", "s--"),
              ("mma", "ours on tensor cores (numba + mma.sync)", "#55A868", "^-"),
              ("mma_async", "ours on tensor cores, FlashAttention-2 layout", "#8172B3", "v-"),
              ("sdpa", "SDPA flash backend (tensor cores)", "#4C72B0", "o-")]
    for key, label, color, style in series:
        pts = [(r["tokens"], r[f"{key}_ms"], r[f"{key}_tflops"]) for r in rows if r.get(f"{key}_ms") is not None]
        if not pts:
            continue
        n, ms, tf = zip(*pts)
        ax_ms.plot(n, ms, style, color=color, label=label)
        ax_tf.plot(n, tf, style, color=color, label=label)
    for name, label, color in [("fp32_fma_tflops", "fp32 FMA peak", "#C44E52"),
                               ("bf16_tensor_tflops", "bf16 tensor-core peak", "#4C72B0")]:
        if peaks.get(name):
            ax_tf.axhline(peaks[name], linestyle=":", color=color, label=f"{label} ({peaks[name]:,.0f})")
    tokens = [r["tokens"] for r in rows]
    for ax in (ax_ms, ax_tf):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(tokens, [f"{t:,}" for t in tokens])
        ax.set_xlabel("prompt length (tokens, one causal sequence)")
        ax.grid(True, which="both", alpha=0.3)
    ax_ms.set_ylabel("ms per call")
    ax_tf.set_ylabel("TFLOP/s (useful causal flops)")
    ax_ms.legend(fontsize=8)
    ax_tf.legend(fontsize=8, loc="center right")  # between the two families of curves
    fig.suptitle(f"prefill attention, one layer\nmeasured on {provenance(result.get('meta', {}))}", fontsize=9)
    fig.tight_layout()
    return fig


def prefill_variants(result: dict) -> Figure:
    """``17_flash_mma_sweep_cuda.json`` (``python -m bench.prefill_sweep``) drawn: for each prompt length, one bar
    per build of the tensor-core kernel (warps per block, query tiles in order or heaviest first), its speed as a
    fraction of SDPA's flash backend in the same run; the dotted line at 1 is SDPA's own speed."""
    from minivllm.course.plots import provenance

    rows = sorted(result["rows"], key=lambda r: r["tokens"])
    if not rows:
        raise ValueError("the result has no rows")
    names = list(rows[0]["variants"])
    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        v = rows[0]["variants"][name]
        label = f"{v['warps']} warps ({16 * v['warps']} query rows), " + ("heaviest tiles first" if v["heavy_first"]
                                                                           else "tiles in order")
        x = np.arange(len(rows)) + (i - (len(names) - 1) / 2) * width
        bars = ax.bar(x, [r["variants"][name]["vs_sdpa"] for r in rows], width, label=label,
                      color=_SEQ_COLORS[i % len(_SEQ_COLORS)])
        for bar in bars:
            bar.set_gid(name)
    ax.axhline(1.0, linestyle=":", color="#4C72B0", label="SDPA flash backend")
    ax.set_xticks(np.arange(len(rows)), [f"{r['tokens']:,}" for r in rows])
    ax.set_xlabel("prompt length (tokens, one causal sequence)")
    ax.set_ylabel("speed / SDPA's")
    ax.set_ylim(0, 1.1)
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_title(f"the tensor-core kernel's launch settings\nmeasured on {provenance(result.get('meta', {}))}",
                 fontsize=9)
    fig.tight_layout()
    return fig
