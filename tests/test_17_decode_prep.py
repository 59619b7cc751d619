"""kernels.paged_decode_prep: QK-norm, RoPE, the KV store and decode attention in one kernel.

Checked in the simulator against the two steps it replaces, each with its own reference (``qkv_prep_ref``, then
``paged_attention_ref`` over the cache it stored into) and against the two kernels: contexts whose new token falls
in different split-K chunks, padding rows (slot -1) that store nothing, Llama's heads without QK-norm, a position
past the RoPE table. On a GPU: Qwen3-0.6B's heads in bf16 against the two kernels, eagerly and in a CUDA graph.
"""

import pytest
import torch

from kernels.paged_attention import paged_attention_ref
from kernels.paged_attention_warp import paged_attention_warp
from kernels.paged_decode_prep import DIM, paged_decode_prep, paged_decode_prep_ref
from kernels.qkv_prep import qkv_prep, qkv_prep_ref
from kernels.rope import rope_cache


def _case(lens, q_heads=4, kv_heads=2, block_size=16, device="cpu", seed=0, pad=()):
    """A decode step: sequence i has ``lens[i]`` keys, the last one this step's token (slot -1 for rows in
    ``pad``); the cache holds random earlier keys and values."""
    g = torch.Generator().manual_seed(seed)
    seqs = len(lens)
    width = -(-max(lens) // block_size)
    blocks = seqs * width + 2
    tables = torch.randperm(blocks, generator=g)[: seqs * width].view(seqs, width).to(torch.int32)
    cache = torch.randn(blocks, 2, block_size, kv_heads, DIM, generator=g).to(torch.bfloat16)
    qkv = (3 * torch.randn(seqs, (q_heads + 2 * kv_heads) * DIM, generator=g)).to(torch.bfloat16)
    weights = [(1 + 0.2 * torch.randn(DIM, generator=g)).to(torch.bfloat16) for _ in range(2)]
    context = torch.tensor(lens, dtype=torch.int32)
    positions = (context - 1).long()
    slots = torch.tensor([-1 if i in pad else int(tables[i, (n - 1) // block_size]) * block_size + (n - 1) % block_size
                          for i, n in enumerate(lens)])
    tensors = [x.to(device) for x in (qkv, positions, cache, slots, tables, context, *weights)]
    return dict(zip(("qkv", "positions", "kv_cache", "slot_mapping", "block_tables", "context_lens", "q_weight",
                     "k_weight"), tensors)) | dict(q_heads=q_heads, kv_heads=kv_heads)


def _run(fn, case, cos_sin, norm=True, **kw):
    c = dict(case, kv_cache=case["kv_cache"].clone())
    args = (c["qkv"], c["q_heads"], c["kv_heads"], c["positions"], cos_sin, c["kv_cache"], c["slot_mapping"],
            c["block_tables"], c["context_lens"])
    weights = (c["q_weight"], c["k_weight"]) if norm else (None, None)
    return fn(*args, *weights, **kw), c["kv_cache"]


def _close(got, want):
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize(("lens", "split", "warps", "early"), [
    ((21, 5), None, 2, False), ((21, 5), None, 2, True), ((40, 17, 33), 16, 1, True), ((48, 1), 16, 2, False),
    ((50, 3), 32, 1, True)])
def test_kernel_matches_the_two_references_in_the_simulator(lens, split, warps, early):
    """The new token's key is read by the split that holds it (each case puts it in a different chunk), every
    split merged by the last block to finish; one warp a block, or two (whose lane groups read the new key the
    other warp's lanes stored). ``early``: the first trip's keys read before the new one is stored, its own from
    registers (50 keys in chunks of 32 on one warp: the new key in its block's third trip of 8)."""
    cos_sin = rope_cache(DIM, 128, 1e6, device="cpu")
    case = _case(lens, seed=len(lens))
    want, want_cache = _run(paged_decode_prep_ref, case, cos_sin)
    got, got_cache = _run(paged_decode_prep, case, cos_sin, warps=warps, tokens_per_split=split, early=early)
    _close(got, want)
    _close(got_cache, want_cache)  # the new keys (QK-norm + RoPE) and values, where the slots say
    assert not torch.equal(want_cache, case["kv_cache"])  # ... which the reference did store


def test_kernel_matches_qkv_prep_then_paged_attention_in_the_simulator():
    """Against the two kernels it replaces, run one after the other on the same step."""
    cos_sin = rope_cache(DIM, 64, 1e6, device="cpu")
    case = _case((19, 34), seed=3)
    got, got_cache = _run(paged_decode_prep, case, cos_sin, warps=1, tokens_per_split=16)
    cache = case["kv_cache"].clone()
    q, _, _ = qkv_prep(case["qkv"], 4, 2, case["positions"], cos_sin, cache, case["slot_mapping"], case["q_weight"],
                       case["k_weight"])
    want = paged_attention_warp(q, cache, case["block_tables"], case["context_lens"], warps=1, tokens_per_split=16)
    _close(got, want)
    _close(got_cache, cache)


def test_padding_rows_store_nothing_and_llama_heads_skip_the_norm_in_the_simulator():
    cos_sin = rope_cache(DIM, 64, 1e6, device="cpu")
    case = _case((9, 26), seed=5, pad=(1,))
    got, got_cache = _run(paged_decode_prep, case, cos_sin, norm=False, warps=1)
    q, _, _ = qkv_prep_ref(case["qkv"], 4, 2, case["positions"], cos_sin, case["kv_cache"].clone(),
                           case["slot_mapping"])  # no weights: RoPE only
    _close(got[0], paged_attention_ref(q.contiguous(), got_cache, case["block_tables"], case["context_lens"])[0])
    untouched = case["kv_cache"].clone()
    table = case["block_tables"][1]
    assert torch.equal(got_cache[table.long()], untouched[table.long()])  # row 1's slot is -1: its blocks unchanged


def test_position_past_the_rope_table_gives_nan_in_the_simulator():
    """No read out of bounds: the key stored is NaN (as ``kernels.qkv_prep`` stores), its value as given."""
    cos_sin = rope_cache(DIM, 8, 1e6, device="cpu")  # positions up to 7
    case = _case((12,), seed=7)
    _, cache = _run(paged_decode_prep, case, cos_sin, warps=1)
    slot = int(case["slot_mapping"][0])
    assert torch.isnan(cache[slot // 16, 0, slot % 16].float()).all()
    v = case["qkv"][0].view(-1, DIM)[-2:]  # the value heads, as projected
    assert torch.equal(cache[slot // 16, 1, slot % 16], v)


def test_launcher_refuses_what_the_kernel_does_not_take():
    cos_sin = rope_cache(DIM, 64, 1e6, device="cpu")
    case = _case((5,))
    with pytest.raises(ValueError, match="qkv must be"):
        paged_decode_prep(case["qkv"][:, :-DIM], 4, 2, case["positions"], cos_sin, case["kv_cache"],
                          case["slot_mapping"], case["block_tables"], case["context_lens"])
    with pytest.raises(ValueError, match="both q_weight and k_weight"):
        paged_decode_prep(case["qkv"], 4, 2, case["positions"], cos_sin, case["kv_cache"], case["slot_mapping"],
                          case["block_tables"], case["context_lens"], q_weight=case["q_weight"])


@pytest.mark.gpu
@pytest.mark.parametrize("lens", [(300,), (845, 2048, 17, 1000, 5, 64, 128, 129)])
def test_kernel_on_gpu_matches_the_two_kernels_eager_and_graphed(lens):
    cos_sin = rope_cache(DIM, 4096, 1e6, device="cuda")
    case = _case(lens, q_heads=16, kv_heads=8, device="cuda", seed=len(lens))
    cache = case["kv_cache"].clone()
    q, _, _ = qkv_prep(case["qkv"], 16, 8, case["positions"], cos_sin, cache, case["slot_mapping"], case["q_weight"],
                       case["k_weight"])
    want = paged_attention_warp(q, cache, case["block_tables"], case["context_lens"])
    got, got_cache = _run(paged_decode_prep, case, cos_sin)
    _close(got, want)
    _close(got_cache, cache)
    graphed, _ = _run(paged_decode_prep, case, cos_sin, max_context_len=4096)  # a CUDA graph's fixed longest
    _close(graphed, want)


@pytest.mark.parametrize("kernel", ["prep", "attention"])
def test_each_sequence_cuts_its_own_context_into_the_splits_in_the_simulator(kernel, monkeypatch):
    """``dynamic_split``: a grid sized for a longer context (here 2 splits of 32 keys, as a CUDA graph's
    ``max_context_len`` fixes it) cuts a 21-key context into 11 + 10 keys and a 5-key one into 4 + 1 (chunks of at
    least 4), where the static chunks give each one block; the fused merge puts them together."""
    import kernels.paged_attention_warp as paw
    import kernels.paged_decode_prep as pdp

    module = pdp if kernel == "prep" else paw
    launched = []
    monkeypatch.setattr(module, "launch", lambda k, grid, *a, launch=module.launch, **kw: (
        launched.append((grid, a)), launch(k, grid, *a, **kw))[1])
    cos_sin = rope_cache(DIM, 64, 1e6, device="cpu")
    case = _case((21, 5), seed=11)
    want, want_cache = _run(paged_decode_prep_ref, case, cos_sin)
    if kernel == "prep":
        got, got_cache = _run(paged_decode_prep, case, cos_sin, warps=1, tokens_per_split=32, max_context_len=64,
                              dynamic_split=4, early=True)
    else:
        got_cache = want_cache
        q, _, _ = qkv_prep_ref(case["qkv"], 4, 2, case["positions"], cos_sin, case["kv_cache"].clone(),
                               case["slot_mapping"], case["q_weight"], case["k_weight"])
        got = paged_attention_warp(q.contiguous(), want_cache, case["block_tables"], case["context_lens"], warps=1,
                                   tokens_per_split=32, max_context_len=64, dynamic_split=4)
    _close(got, want)
    _close(got_cache, want_cache)
    (grid, args), = launched
    assert grid[-1] == 2 and -4 in [a for a in args if isinstance(a, int)]  # 2 splits, each sequence's own chunks
