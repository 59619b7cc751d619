"""Phase 08's kernel exercises: the cases notebook 08 checks ``store_kv`` and paged decode attention on,
the PyTorch answer key of the split-K partial results, and a picture of the decode kernel's grid.

* :func:`store_kv_cases` -- K/V rows into a pool at shuffled slots, padding rows (slot -1), more elements
  than the simulator's grid has threads (a grid-stride loop is needed), fp32 and bf16;
* :func:`decode_cases` -- decode attention over shuffled blocks: a context that ends mid-block, a context
  of one token, a split with no keys, a ``max_context_len`` past the longest context (as the engine's CUDA
  graphs pass it), GQA groups of 2 to 4, fp32 and bf16; :func:`describe_decode_case` says which is which;
* :func:`split_partials` -- what each split-K block must write (its normalised output, max logit and
  exp-sum), computed with PyTorch per sequence and split, independently of any kernel;
  :func:`merge_cases` -- such partial results, the input of the merge;
* :func:`decode_batch` -- a uniform decode batch at full size, for timing on a GPU;
* :func:`draw_decode_grid` -- sequences' keys cut into splits (one CUDA block each) and tiles, over
  their physical KV blocks.

Tiny shapes on a CPU (numba's CUDA simulator runs every thread in Python: at most 4 blocks of at most 32
threads per launch), full size on a GPU. Left out: timing (``bench/attention.py``).
"""

import math
from collections.abc import Sequence

import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from minivllm.utils import cdiv

SPLIT_COLORS = ("#4C72B0", "#DD8452", "#55A868", "#8172B3", "#937860", "#DA8BC3")

# (q, kv_cache, block_tables, context_lens, max_context_len, tokens_per_split): the arguments of
# my_paged_attention, positionally
DecodeCase = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int | None, int]


# ----------------------------------------------------------------------------- store_kv
def store_kv_cases(device: str | torch.device = "cpu", on_gpu: bool = False,
                   seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(key, value, kv_cache, slot_mapping)`` cases: slots in random order, every third one -1 (padding).

    The pools start random, so a write to a wrong slot, or to the slot ``-1`` wraps to, changes a value that
    the reference leaves alone."""
    g = torch.Generator(device=device).manual_seed(seed)
    on = dict(device=device, generator=g)
    #          dtype           tokens heads dim blocks block_size
    shapes = [(torch.float32, 10, 2, 16, 8, 4), (torch.bfloat16, 5, 1, 16, 2, 16)]
    if on_gpu:
        shapes = [(torch.bfloat16, 4096, 8, 128, 4096, 16), (torch.float32, 7, 3, 64, 4, 16)]
    cases = []
    for dtype, tokens, heads, dim, blocks, block_size in shapes:
        key, value = (torch.randn(tokens, heads, dim, **on).to(dtype) for _ in range(2))
        cache = torch.randn(blocks, 2, block_size, heads, dim, **on).to(dtype)
        slots = torch.randperm(blocks * block_size, **on)[:tokens]
        slots[::3] = -1
        cases.append((key, value, cache, slots))
    return cases


# ----------------------------------------------------------------------------- decode attention
def _decode_case(g: torch.Generator, dtype: torch.dtype, q_heads: int, kv_heads: int, dim: int, block_size: int,
                 lens: Sequence[int], max_context_len: int | None, tokens_per_split: int,
                 sharper_from: int | None = None) -> DecodeCase:
    """A pool with the sequences' blocks scattered at random, tables padded with -1 past each context; made on
    the generator's device. ``sharper_from``: keys from that position on are 3x longer, so the largest scores
    come late (a running max that grows from tile to tile)."""
    on = dict(device=g.device, generator=g)
    width = cdiv(max_context_len or max(lens), block_size)
    blocks = len(lens) * width
    pool = torch.randn(blocks, 2, block_size, kv_heads, dim, **on).to(dtype)
    tables = torch.randperm(blocks, **on).to(torch.int32).view(len(lens), width)
    for s, n in enumerate(lens):
        tables[s, cdiv(n, block_size):] = -1
        for j in range(sharper_from or n, n):
            pool[tables[s, j // block_size], 0, j % block_size] *= 3
    q = torch.randn(len(lens), q_heads, dim, **on).to(dtype)
    context_lens = torch.tensor(lens, dtype=torch.int32, device=g.device)
    return q, pool, tables, context_lens, max_context_len, tokens_per_split


def decode_cases(device: str | torch.device = "cpu", on_gpu: bool = False, seed: int = 0) -> list[DecodeCase]:
    """Cases for ``my_paged_attention(q, kv_cache, block_tables, context_lens, max_context_len, tokens_per_split)``."""
    g = torch.Generator(device=device).manual_seed(seed)
    if not on_gpu:  # split kernel grid (seqs, kv_heads, splits) and merge grid (seqs, q_heads): <= 8 blocks
        specs = [(torch.float32, 2, 1, 16, 4, [13, 1], None, 8),  # mid-block, context 1, an empty split
                 (torch.bfloat16, 4, 1, 16, 4, [9], 24, 12),  # GQA 4, max_context_len past it: split 2 empty
                 (torch.float32, 4, 2, 16, 16, [40, 3], None, 64, 32)]  # two tiles of 32 keys in one split,
        #                                                                   the largest scores in the second
    else:  # Qwen3-0.6B's heads (16 over 8 of 128) and SmolLM2's (9 over 3 of 64)
        lens = torch.randint(1, 4097, (32,), generator=torch.Generator().manual_seed(seed))
        lens[:3] = torch.tensor([1, 4096, 1000])
        specs = [(torch.bfloat16, 16, 8, 128, 16, lens.tolist(), 4096, 512),
                 (torch.float32, 16, 8, 128, 16, [1, 17, 700, 2049], 4096, 256),
                 (torch.bfloat16, 9, 3, 64, 16, [5, 300, 1025, 3000, 77, 1, 2048, 16], 8192, 1024)]
    return [_decode_case(g, *spec) for spec in specs]


def decode_batch(seqs: int, context: int, *, q_heads: int = 16, kv_heads: int = 8, dim: int = 128,
                 dtype: torch.dtype = torch.bfloat16, block_size: int = 16, device: str | torch.device = "cpu",
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q, kv_cache, block_tables, context_lens)`` of a decode batch: ``seqs`` sequences of ``context`` keys in
    shuffled blocks (default: Qwen3-0.6B's heads in bf16), for timing."""
    case = _decode_case(torch.Generator(device=device).manual_seed(seed), dtype, q_heads, kv_heads, dim, block_size,
                        [context] * seqs, None, context)
    return case[:4]


def describe_decode_case(case: DecodeCase) -> str:
    """One line: what a case holds, and what it tests."""
    q, pool, tables, lens, max_len, per_split = case
    longest = max_len or int(lens.max())
    splits = cdiv(longest, per_split)
    empty = sum(max(splits - cdiv(int(n), per_split), 0) for n in lens)
    mid = sum(int(n) % pool.shape[2] != 0 for n in lens)
    ctx = lens.tolist() if len(lens) <= 4 else f"{len(lens)} contexts of {int(lens.min())}..{int(lens.max())}"
    tests = [f"GQA {q.shape[1] // pool.shape[3]}", f"{mid} context(s) ending mid-block"]
    tests += ["a context of 1"] * bool((lens == 1).any()) + [f"{empty} empty split(s)"] * bool(empty)
    tests += [f"max_context_len {max_len} past the longest"] * bool(max_len and max_len > int(lens.max()))
    return (f"{str(q.dtype)[6:]}, {q.shape[1]}/{pool.shape[3]} heads x {q.shape[2]}, blocks of {pool.shape[2]} "
            f"(shuffled), contexts {ctx}, {per_split} keys per split -> {splits} split(s): " + ", ".join(tests))


def split_partials(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                   tokens_per_split: int, splits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What split ``s`` of each (sequence, query head) must write, in fp32, over keys
    ``s * tokens_per_split .. min(context_len, (s + 1) * tokens_per_split) - 1``:

    partial_out (seqs, q_heads, splits, d): ``softmax(scores) @ V`` over those keys (0 for an empty split);
    max_logits (seqs, q_heads, splits): the largest score ``q . k / sqrt(d)`` (-inf for an empty split);
    exp_sums (seqs, q_heads, splits): ``sum exp(score - max)`` (0 for an empty split)."""
    seqs, q_heads, dim = q.shape
    block_size, kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group = q_heads // kv_heads
    out = torch.zeros(seqs, q_heads, splits, dim, dtype=torch.float32, device=q.device)
    max_logits = torch.full((seqs, q_heads, splits), -math.inf, dtype=torch.float32, device=q.device)
    exp_sums = torch.zeros(seqs, q_heads, splits, dtype=torch.float32, device=q.device)
    for s in range(seqs):
        n = int(context_lens[s])
        blocks = block_tables[s, :cdiv(n, block_size)].long()
        k = kv_cache[blocks, 0].flatten(0, 1)[:n].float()  # (n, kv_heads, d): token order
        v = kv_cache[blocks, 1].flatten(0, 1)[:n].float()
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (n, q_heads, d)
        scores = torch.einsum("hd,nhd->hn", q[s].float(), k) / math.sqrt(dim)  # (q_heads, n)
        for split in range(splits):
            lo, hi = split * tokens_per_split, min(n, (split + 1) * tokens_per_split)
            if lo >= hi:
                continue
            part = scores[:, lo:hi]
            m = part.max(dim=1).values  # (q_heads,)
            p = torch.exp(part - m[:, None])
            max_logits[s, :, split] = m
            exp_sums[s, :, split] = p.sum(1)
            out[s, :, split] = torch.einsum("hn,nhd->hd", p, v[lo:hi]) / p.sum(1)[:, None]
    return out, max_logits, exp_sums


def seen_only(partials: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor,
                                                                                  torch.Tensor]:
    """Partial results with the entries of empty splits (exp_sum 0) set to 0, where nothing is defined but
    ``exp_sum = 0``: comparable without -inf."""
    out, m, l = partials
    seen = l > 0
    return out * seen[..., None], torch.where(seen, m, torch.zeros_like(m)), l


def merge_cases(device: str | torch.device = "cpu", seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    """``(partial_out, max_logits, exp_sums)`` cases for the merge, made by :func:`split_partials`: one with an
    empty split, one whose splits' max logits are far apart (scores x 8), one with a single split."""
    g = torch.Generator().manual_seed(seed)
    cases = []
    for q_heads, lens, per_split, splits, sharp in (((2, [20], 8, 4, 1.0)), (2, [16, 11], 6, 3, 8.0),
                                                    (1, [7], 8, 1, 1.0)):
        q, pool, tables, context_lens, _, _ = _decode_case(g, torch.float32, q_heads, 1, 16, 4, lens,
                                                           splits * per_split, per_split)
        partials = split_partials(q * sharp, pool, tables, context_lens, per_split, splits)
        cases.append(tuple(t.to(device) for t in partials))
    return cases


# ----------------------------------------------------------------------------- the picture
def draw_decode_grid(context_lens: Sequence[int], block_tables: Sequence[Sequence[int]], block_size: int,
                     tokens_per_split: int, tile: int, max_context_len: int | None = None,
                     names: Sequence[str] | None = None) -> Figure:
    """Each sequence's keys as a row of cells: coloured by the split (CUDA block ``blockIdx.z``) that reads them,
    thin lines between tiles, thick lines and the physical block id at every KV block; keys past the context
    are blank, and a split with no key at all is marked ``l = 0``."""
    longest = max_context_len or max(context_lens)
    splits = cdiv(longest, tokens_per_split)
    names = names or [f"seq {s}" for s in range(len(context_lens))]
    fig, ax = plt.subplots(figsize=(min(14.0, 2.5 + 0.16 * longest), 1.2 + 0.8 * len(context_lens)))
    for row, (n, table) in enumerate(zip(context_lens, block_tables)):
        y = -1.4 * row
        ax.text(-0.8, y + 0.3, f"{names[row]} ({n} keys)", ha="right", va="center", fontsize=9)
        for split in range(splits):
            lo, hi = split * tokens_per_split, min(longest, (split + 1) * tokens_per_split)
            color = SPLIT_COLORS[split % len(SPLIT_COLORS)]
            if lo >= n:
                ax.text((lo + hi) / 2, y + 0.3, f"split {split}: no key, l = 0", ha="center", va="center",
                        fontsize=7, color=color)
            for j in range(lo, min(hi, n)):
                ax.add_patch(Rectangle((j, y), 1, 0.6, facecolor=color, alpha=0.55, edgecolor="white", lw=0.3))
            for t in range(lo + tile, min(hi, n), tile):  # tile boundaries inside the split
                ax.plot([t, t], [y - 0.05, y + 0.65], color="black", lw=0.6, ls=":")
        for b in range(cdiv(n, block_size)):  # KV blocks: physical id above
            x = b * block_size
            ax.plot([x, x], [y - 0.1, y + 0.7], color="black", lw=1.2)
            ax.text(x + min(block_size, n - x) / 2, y + 0.8, f"block {table[b]}", ha="center", va="bottom",
                    fontsize=7)
        ax.plot([n, n], [y - 0.1, y + 0.7], color="black", lw=1.2)
    for split in range(splits):
        color = SPLIT_COLORS[split % len(SPLIT_COLORS)]
        ax.add_patch(Rectangle((0, 0), 0, 0, facecolor=color, alpha=0.55, label=f"split {split} (blockIdx.z = {split})"))
    ax.set_xlim(-0.5, longest + 0.5)
    ax.set_ylim(-1.4 * (len(context_lens) - 1) - 0.3, 1.3)
    ax.set_xlabel("key position in the sequence")
    ax.set_yticks([])
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=min(splits, 4), frameon=False, fontsize=8)
    ax.set_title(f"One CUDA block per (sequence, KV head, split): {tokens_per_split} keys per split, "
                 f"tiles of {tile} keys (dotted), KV blocks of {block_size} (solid)", fontsize=10)
    fig.tight_layout()
    plt.close(fig)
    return fig
