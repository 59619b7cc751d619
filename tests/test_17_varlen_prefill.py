"""Prefill in one attention call per layer: every prefill sequence of a step packed (``cu_seqlens``).

On a GPU in bf16/fp16 the paged-attention prefill is one FlashAttention-2 varlen call per layer; the keys of
contexts computed in earlier steps (chunked prefill, prefix-cache hits) are read back from the paged cache in
one gather laid out by :func:`minivllm.model.paged_attention._varlen_layout`. Checked here against the
per-sequence path (``backend="torch"``: one SDPA call per sequence with an end-aligned causal mask) and
against a dense softmax written out in torch ops.
"""

import math
from types import SimpleNamespace

import pytest
import torch

from minivllm.model import paged_attention as pa


def _step(seed, prefills, *, decodes=0, q_heads=4, kv_heads=2, dim=32, block_size=16, dtype=torch.float32,
          device="cpu"):
    """A paged cache and one step's metadata: ``prefills`` = [(new tokens, context length)], after ``decodes``."""
    g = torch.Generator().manual_seed(seed)
    seqs = [(1, 1 + int(torch.randint(1, 40, (1,), generator=g))) for _ in range(decodes)] + list(prefills)
    need = sum(-(-ctx // block_size) for _, ctx in seqs)
    num_blocks = need + 3
    kv = torch.randn(num_blocks, 2, block_size, kv_heads, dim, generator=g).to(dtype).to(device)
    order = torch.randperm(num_blocks, generator=g).tolist()  # each sequence's blocks scattered through the pool
    width = max(-(-ctx // block_size) for _, ctx in seqs)
    tables = torch.full((len(seqs), width), -1, dtype=torch.int32)
    slots = []
    for i, (new, ctx) in enumerate(seqs):
        mine = [order.pop() for _ in range(-(-ctx // block_size))]
        tables[i, :len(mine)] = torch.tensor(mine)
        slots += [mine[p // block_size] * block_size + p % block_size for p in range(ctx - new, ctx)]
    tokens = sum(new for new, _ in seqs)
    q = torch.randn(tokens, q_heads, dim, generator=g).to(dtype).to(device)
    k = torch.randn(tokens, kv_heads, dim, generator=g).to(dtype).to(device)
    v = torch.randn(tokens, kv_heads, dim, generator=g).to(dtype).to(device)
    meta = pa.PagedAttentionMetadata(
        kv_cache=SimpleNamespace(kv=[kv]), slot_mapping=torch.tensor(slots, device=device),
        block_tables=tables.to(device),
        context_lens=torch.tensor([c for _, c in seqs], dtype=torch.int32, device=device),
        num_decodes=decodes, max_context_len=max(c for _, c in seqs),
        query_lens=[n for n, _ in prefills], prefill_context_lens=[c for _, c in prefills])
    return q, k, v, meta


def _dense_prefill(q, kv, meta):
    """Each prefill sequence's queries over its whole context read position by position, softmax in fp64."""
    n, row, outs = meta.num_decodes, 0, []
    block_size = kv.shape[2]
    for i, (new, ctx) in enumerate(zip(meta.query_lens, meta.prefill_context_lens)):
        table = meta.block_tables[n + i].tolist()
        keys = torch.stack([kv[table[p // block_size], 0, p % block_size] for p in range(ctx)]).double()
        vals = torch.stack([kv[table[p // block_size], 1, p % block_size] for p in range(ctx)]).double()
        qi = q[row: row + new].double()  # (new, q_heads, d)
        group = q.shape[1] // kv.shape[3]
        keys, vals = keys.repeat_interleave(group, 1), vals.repeat_interleave(group, 1)  # (ctx, q_heads, d)
        scores = torch.einsum("thd,chd->htc", qi, keys) / math.sqrt(q.shape[2])
        visible = torch.arange(ctx)[None, :] <= torch.arange(ctx - new, ctx)[:, None]  # (new, ctx)
        scores = scores.masked_fill(~visible.to(scores.device), float("-inf"))
        outs.append(torch.einsum("htc,chd->thd", scores.softmax(-1), vals))
        row += new
    return torch.cat(outs)


@pytest.mark.parametrize("prefills", [[(7, 7), (20, 20)], [(5, 37), (16, 16), (1, 50)], [(33, 33), (8, 70)]])
def test_layout_reads_each_context_key_from_its_block(prefills):
    """The packed keys (one gather) equal each sequence's keys read position by position through its table."""
    q, k, v, meta = _step(1, prefills, decodes=2)
    kv = meta.kv_cache.kv[0]
    pa.store(k, v, 0, meta)
    lay = pa._varlen_layout(meta, kv.shape[2], q.device)
    assert lay.cu_q.tolist() == [0, *torch.tensor(meta.query_lens).cumsum(0).tolist()]
    assert lay.cu_k.tolist() == [0, *torch.tensor(meta.prefill_context_lens).cumsum(0).tolist()]
    assert (lay.max_q, lay.max_k) == (max(meta.query_lens), max(meta.prefill_context_lens))
    if all(n == c for n, c in prefills):
        assert lay.blocks is None  # nothing cached: this step's k and v are every key
        return
    packed = kv[lay.blocks, 0, lay.offsets]
    n, rows = meta.num_decodes, [0, *torch.tensor(meta.query_lens).cumsum(0).tolist()]
    want = torch.cat([pa._context_kv(i, rows[i], k[n:], v[n:], kv, meta)[0] for i in range(len(prefills))])
    assert torch.equal(packed, want)
    assert pa._varlen_layout(meta, kv.shape[2], q.device) is lay  # built once per step, shared by every layer


def test_cpu_and_fp32_keep_the_per_sequence_path():
    q, k, v, meta = _step(2, [(5, 37), (16, 16)])
    assert not pa._flash_ok(q, meta)
    pa.store(k, v, 0, meta)
    got = pa.prefill(q, k, v, 0, meta)
    torch.testing.assert_close(got.double(), _dense_prefill(q, meta.kv_cache.kv[0], meta), atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("prefills,decodes", [([(7, 7), (20, 20), (300, 300)], 0),
                                              ([(5, 37), (16, 16), (1, 50), (128, 1000)], 3),
                                              ([(512, 2048), (64, 64)], 5)])
@pytest.mark.parametrize("heads", [(16, 8, 128), (9, 3, 64)])
def test_gpu_varlen_prefill_matches_per_sequence_sdpa_and_dense(dtype, prefills, decodes, heads):
    q_heads, kv_heads, dim = heads
    q, k, v, meta = _step(3, prefills, decodes=decodes, q_heads=q_heads, kv_heads=kv_heads, dim=dim, dtype=dtype,
                          device="cuda")
    pa.store(k, v, 0, meta)
    n = meta.num_decodes
    assert pa._flash_ok(q, meta)
    got = pa.prefill(q[n:], k[n:], v[n:], 0, meta)
    per_seq = pa.prefill(q[n:], k[n:], v[n:], 0, pa.PagedAttentionMetadata(**{
        f: getattr(meta, f) for f in ("kv_cache", "slot_mapping", "block_tables", "context_lens", "num_decodes",
                                      "max_context_len", "query_lens", "prefill_context_lens")}, backend="torch"))
    dense = _dense_prefill(q[n:].cpu(), meta.kv_cache.kv[0].cpu(), SimpleNamespace(
        num_decodes=n, query_lens=meta.query_lens, prefill_context_lens=meta.prefill_context_lens,
        block_tables=meta.block_tables.cpu()))
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=4e-3, rtol=4e-3)
    torch.testing.assert_close(got.double().cpu(), dense, **tol)
    torch.testing.assert_close(got, per_seq, **tol)
