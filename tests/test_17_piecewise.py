"""Piecewise CUDA graphs (issue 17): prefill and mixed steps as graphs cut at every attention call.

* the token buckets cover every step size up to the cap, with bounded padding;
* on a CPU the pieces run eagerly (``PiecewiseGraphs(capture=False)``): the same static buffers, padding rows and
  cut at attention as the graphs, checked against the plain forward pass -- the same tokens, text and logprobs,
  through chunked prefill, prefix hits, mixed steps, preemption, the overlapped loop and aborts;
* on a GPU (marked ``gpu``): the replayed pieces against the eager engine, and the steps that take them.
"""

import random

import pytest
import torch

from bench.models import TINY
from minivllm.engine import LLMEngine
from minivllm.piecewise import PiecewiseGraphs, token_buckets
from minivllm.sampling_params import SamplingParams


@pytest.mark.parametrize("cap", [1, 16, 17, 100, 512, 513, 2048, 2100])
def test_token_buckets_cover_every_size_with_bounded_padding(cap):
    buckets = token_buckets(cap)
    assert buckets == sorted(set(buckets)) and buckets[-1] == cap
    for tokens in range(1, cap + 1):
        b = next(b for b in buckets if b >= tokens)
        assert b <= max(16, 2 * tokens - 1)  # padding: less than the step itself (doubling up to 512) ...
        assert tokens <= 512 or b - tokens < 256  # ... then less than 256 rows


def build(device: str = "cpu", pieces: bool = False, max_tokens: int = 64, **kwargs) -> LLMEngine:
    e = LLMEngine(model=TINY, device=device, max_model_len=256,
                  **{"dtype": "float32", "max_num_seqs": 6, "max_num_batched_tokens": max_tokens, "enable_prefix_caching": True,
                     "cuda_graph_max_tokens": 0, **kwargs})
    # NOTE: weights ~N(0, 0.3): every token depends on its inputs (the default init makes the model repeat itself)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in e.model.named_parameters():
            if not name.endswith("norm.weight"):
                p.copy_(torch.randn(p.shape, generator=g).mul_(0.3))
    if pieces and e.runner.pieces is None:  # a CPU: the pieces without graphs
        e.runner.pieces = PiecewiseGraphs(e.model, e.kv_cache, max_tokens, capture=False)
    return e


def requests(seed: int, n: int = 12):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = [rng.randrange(1, TINY.vocab_size) for _ in range(rng.randint(3, 90))]
        if i % 4 == 1 and out:
            prompt = out[0][0][:40] + prompt[:7]  # a shared prefix: a radix-cache hit (cached context)
        kw = dict(max_tokens=rng.randint(1, 30), logprobs=2)
        if i % 3 == 1:
            kw |= dict(temperature=0.8, seed=100 + i)
        else:
            kw |= dict(temperature=0)
        out.append((prompt, SamplingParams(**kw)))
    return out


def drive(e: LLMEngine, reqs, abort_at: dict[int, int] | None = None) -> dict:
    ids = [e.add_request(p, params) for p, params in reqs]
    final, step = {}, 0
    while e.has_unfinished_requests():
        for i, at in (abort_at or {}).items():
            if at == step:
                e.abort(ids[i])
        for out in e.step():
            if out.finished:
                final[out.request_id] = [(c.token_ids, c.finish_reason, c.logprobs) for c in out.outputs]
        step += 1
    e.check_no_leaks()
    return final


def assert_same(got: dict, want: dict, atol: float) -> None:
    """The same requests, tokens and finish reasons; logprobs within ``atol`` (a padded step's matmuls have more
    rows, and a BLAS may sum them in another order)."""
    assert got.keys() == want.keys()
    for rid, outs in want.items():
        assert len(got[rid]) == len(outs)
        for (tokens, finish, logprobs), (tokens2, finish2, logprobs2) in zip(outs, got[rid]):
            assert (tokens2, finish2) == (tokens, finish), rid
            for a, b in zip(logprobs, logprobs2, strict=True):
                assert a.keys() == b.keys()
                assert all(abs(a[t] - b[t]) < atol for t in a)


def count_calls(e: LLMEngine) -> list[tuple[int, int]]:
    """Record (tokens, bucket) of every step that takes the pieces."""
    calls, forward = [], e.runner.pieces.forward
    e.runner.pieces.forward = lambda tokens, meta: calls.append((tokens, e.runner.pieces.bucket(tokens))) or \
        forward(tokens, meta)
    return calls


@pytest.mark.parametrize("overlap", [False, True])
def test_pieces_give_the_plain_forward_passes_outputs(overlap):
    reqs = requests(0)
    plain = drive(build(async_scheduling=overlap), reqs)
    e = build(pieces=True, async_scheduling=overlap)
    calls = count_calls(e)
    assert_same(drive(e, reqs), plain, 1e-4)
    assert len(calls) == len(e.step_log)  # every step took the pieces (each fits 64 tokens)
    assert any(t < b for t, b in calls)  # padded steps
    assert any(rec.num_decode_tokens and rec.num_prefill_tokens for rec in e.step_log)  # mixed steps
    assert any(rec.num_prefill_tokens == 64 for rec in e.step_log)  # chunked prompts: cached context read back


def test_pieces_under_preemption_and_aborts():
    reqs = requests(3, 10)
    kw = dict(num_kv_blocks=14, block_size=8)
    plain = drive(build(**kw), reqs, {2: 3, 5: 1})
    e = build(pieces=True, **kw)
    calls = count_calls(e)
    assert_same(drive(e, reqs, {2: 3, 5: 1}), plain, 1e-4)
    assert calls and e.scheduler.num_preemptions > 0  # recomputed prompts went through the pieces too


def test_steps_larger_than_the_cap_run_eagerly():
    e = build(pieces=True, max_tokens=64)
    e.runner.pieces = PiecewiseGraphs(e.model, e.kv_cache, 32, capture=False)  # a cap below the token budget
    calls = count_calls(e)
    reqs = requests(5, 6)
    assert_same(drive(e, reqs), drive(build(), reqs), 1e-4)
    assert calls and all(t <= 32 for t, _ in calls)
    assert any(rec.num_prefill_tokens + rec.num_decode_tokens > 32 for rec in e.step_log)  # those ran eagerly


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU")])])
def test_padding_rows_store_nothing(device):
    """A step of 5 tokens in the 16-token bucket: the 11 padding rows have slot -1 and leave every KV row as it
    was (on a GPU the captured pieces store K and V for all 16 rows; on a CPU attention stores the real rows)."""
    e = build(device, pieces=True, num_kv_blocks=32, cuda_graph_max_tokens=64)
    for kv in e.kv_cache.kv:  # per layer: (blocks, 2, block_size, kv_heads, d)
        kv.normal_()
    before = [kv.clone() for kv in e.kv_cache.kv]
    calls = count_calls(e)
    e.add_request([3, 1, 4, 1, 5], SamplingParams(temperature=0, max_tokens=1))
    e.step()
    assert calls == [(5, 16)]
    assert e.runner.pieces.split.slot_mapping[5:16].tolist() == [-1] * 11
    for kv, old in zip(e.kv_cache.kv, before):
        rows = (kv != old).flatten(3).any(-1)  # (blocks, 2, block_size): which token rows of K or V changed
        changed = rows.nonzero().tolist()
        assert sorted({(b, r) for b, _, r in changed}) == [(changed[0][0], r) for r in range(5)]  # 5 rows, 1 block


def test_the_config_knob_is_checked():
    with pytest.raises(ValueError, match="cuda_graph_max_tokens"):
        LLMEngine(model=TINY, device="cpu", cuda_graph_max_tokens=-1)


# ----------------------------------------------------------------------------- on a GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("overlap", [False, True])
def test_replayed_pieces_give_the_eager_engines_outputs(overlap):
    """fp32 (bf16 matmuls may round a padded batch's rows differently): the tokens of the eager engine, logprobs
    within rounding; prefill and mixed steps replayed the pieces."""
    reqs = requests(1)
    eager = drive(build("cuda", enforce_eager=True, num_kv_blocks=256), reqs)
    e = build("cuda", cuda_graph_max_tokens=64, num_kv_blocks=256, async_scheduling=overlap)
    assert e.runner.pieces is not None and e.runner.pieces.graphs
    calls = count_calls(e)
    assert_same(drive(e, reqs), eager, 1e-3)
    assert len(calls) == sum(rec.num_prefill_tokens > 0 for rec in e.step_log)  # every prefill step replayed
    assert any(t < b for t, b in calls)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_replayed_pieces_match_the_eager_forward_in_bf16():
    """The default model dtype: one prompt step's logits through the pieces against the eager engine's."""
    prompt = list(range(1, 200))
    logits = []
    for max_tokens in (0, 256):
        e = build("cuda", cuda_graph_max_tokens=max_tokens, max_tokens=256, dtype="bfloat16", num_kv_blocks=64)
        seen = []
        compute = e.model.compute_logits
        e.model.compute_logits = lambda h: seen.append(compute(h).float()) or seen[-1]
        e.add_request(prompt, SamplingParams(temperature=0, max_tokens=1))
        e.step()
        logits.append(seen[0])
        assert (e.runner.pieces is not None) == bool(max_tokens)
    torch.testing.assert_close(logits[1], logits[0], atol=0.1, rtol=0.02)
