"""bench.prefill_sweep: the tensor-core prefill kernel built four ways (warps per block x the order of the query
tiles), each checked against ``flash_attention_ref`` and timed against SDPA. Here in numba's CUDA simulator, on
shapes small enough for it (two query tiles of one warp, so taking them heaviest first really reorders them), with a
stand-in timer: what is checked is that every variant computes the right answer, the bookkeeping of the result
(speeds relative to SDPA, the fastest correct variant) and that the module's state is restored."""

import pytest
import torch

import kernels.flash_attention_mma as fm
from bench import prefill_sweep as ps
from kernels._env import simulator_enabled

pytestmark = pytest.mark.skipif(not simulator_enabled(), reason="the CUDA simulator's check (a machine without a GPU)")


def test_every_variant_is_checked_and_the_fastest_correct_one_is_named(monkeypatch):
    for name, value in (("HEADS", 1), ("KV_HEADS", 1), ("DIM", 64)):  # one head: the simulator runs every thread
        monkeypatch.setattr(ps, name, value)
    before = (fm.WARPS, dict(fm.KERNELS))
    costs = iter([10.0,  # SDPA at 24 tokens
                  40.0, 25.0, 20.0])  # 1 warp in order, 1 warp heavy first, 2 warps heavy first
    data = ps.run(tokens=(24,), variants=((1, False), (1, True), (2, True)), device="cpu",
                  timer=lambda fn: next(costs))
    assert next(costs, None) is None and (fm.WARPS, fm.KERNELS) == before
    (row,) = data["rows"]
    assert row["tokens"] == 24 and row["sdpa_flash_us"] == 10.0
    assert list(row["variants"]) == ["w1_in_order", "w1_heavy_first", "w2_heavy_first"]
    # 24 queries: two tiles of 16 at 1 warp (taken 1, 0 heaviest first), one of 32 at 2 warps
    assert all(v["max_abs_err"] < 2e-2 for v in row["variants"].values())
    assert [v["vs_sdpa"] for v in row["variants"].values()] == [0.25, 0.4, 0.5]
    assert data["best"] == "w2_heavy_first" and data["best_vs_sdpa"] == {24: 0.5}
    assert data["default_warps"] == fm.WARPS


def test_a_wrong_variant_is_never_named_best(monkeypatch):
    for name, value in (("HEADS", 1), ("KV_HEADS", 1), ("DIM", 64)):  # one head: the simulator runs every thread
        monkeypatch.setattr(ps, name, value)
    real = fm._build_pipelined

    def build(mma, pack, head_dim, name, warps=4, heavy_first=True):
        # the in-order variant multiplies its bf16 inputs as if they were fp16: a wrong answer
        return real(fm.mma_f16 if not heavy_first else mma, pack, head_dim, name, warps, heavy_first)

    monkeypatch.setattr(fm, "_build_pipelined", build)
    costs = iter([10.0, 1.0, 30.0])  # SDPA; the wrong variant timed fastest; the right one
    data = ps.run(tokens=(24,), variants=((1, False), (1, True)), device="cpu", timer=lambda fn: next(costs))
    row = data["rows"][0]["variants"]
    assert not row["w1_in_order"]["max_abs_err"] < 5e-2 and row["w1_heavy_first"]["max_abs_err"] < 2e-2
    assert data["best"] == "w1_heavy_first"
