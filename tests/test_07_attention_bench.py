"""bench/attention.py on a CPU (--smoke: tiny shapes, numba's CUDA simulator): it runs end to end, writes the
schema notebooks 07 and 08 read, its kernels' outputs agree with SDPA's, and its caps skip what they should.
The GPU figures themselves can only come from the H200 run (``python -m bench.run attention paged_attention``)."""

import dataclasses
import importlib
import json

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

from bench import attention, run  # noqa: E402
from bench._harness import hbm_gbps  # noqa: E402
from minivllm.course import attention_plots, paged_plots  # noqa: E402

SMOKE = attention.SMOKE
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the smoke run is for machines without a GPU")


@cpu_only
def test_smoke_prefill_writes_the_notebook_07_schema(tmp_path):
    assert attention.main(["prefill", "--smoke", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "07_attention.json").read_text())
    assert result["meta"]["name"] == "07_attention" and not (tmp_path / "08_paged_attention.json").exists()
    rows = result["prefill"]
    assert [r["tokens"] for r in rows] == list(SMOKE.prefill_tokens)
    h, d = SMOKE.q_heads, SMOKE.head_dim
    for r in rows:
        n = r["tokens"]
        assert r["flops"] == 2 * h * d * n * (n + 1)  # QK^T and PV over the n(n+1)/2 causal pairs
        assert r["numba_error"] is None and r["numba_rel_err"] < 1e-5  # float32 in the simulator against SDPA
        assert r["numba_tflops"] == pytest.approx(r["flops"] / (r["numba_ms"] * 1e-3) / 1e12)
        assert r["ratio"] == pytest.approx(r["numba_ms"] / r["sdpa_ms"])
        paged = n in SMOKE.paged_prefill_tokens
        assert (r["numba_paged_ms"] is not None) == paged
        if paged:
            assert r["numba_paged_rel_err"] < 1e-5
    attention_plots.prefill_speed(result)


@cpu_only
def test_smoke_decode_writes_the_notebook_08_schema(tmp_path):
    assert attention.main(["decode", "--smoke", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "08_paged_attention.json").read_text())
    rows = result["decode"]
    assert {(r["batch"], r["context"]) for r in rows} == {(b, c) for b in SMOKE.decode_batches
                                                         for c in SMOKE.decode_contexts}
    assert "paged" in result["kernels"] and result["errors"] == [] and result["skipped_over_max_kv_bytes"] == []
    for r in rows:
        want_bytes = 2 * r["batch"] * r["context"] * SMOKE.kv_heads * SMOKE.head_dim * 4  # K and V, float32
        assert r["kv_bytes"] == want_bytes
        assert r["floor_us"] == pytest.approx(want_bytes / (hbm_gbps() * 1e9) * 1e6)
        for k in result["kernels"]:
            assert r[f"{k}_rel_err"] < 1e-5
            assert r[f"{k}_floor_frac"] == pytest.approx(r["floor_us"] / r[f"{k}_us"])
    assert [s["tokens"] for s in result["store_kv"]] == list(SMOKE.store_tokens)
    assert all(s["correct"] for s in result["store_kv"])
    paged_plots.decode_vs_floor(result, batch=SMOKE.decode_batches[-1])


@cpu_only
def test_prefill_skips_our_kernel_once_a_call_would_be_too_long():
    shapes = dataclasses.replace(SMOKE, max_call_s=0.0, paged_prefill_tokens=())
    first, second = attention.run_prefill(shapes)["prefill"]
    assert first["numba_ms"] is not None  # nothing to extrapolate from yet
    assert second["numba_ms"] is None and second["numba_tflops"] is None and second["ratio"] is None
    assert second["sdpa_ms"] is not None


@cpu_only
def test_decode_skips_cases_over_the_kv_limit():
    limit = 2 * 1 * 12 * SMOKE.kv_heads * SMOKE.head_dim * 4  # exactly batch 1 x context 12, float32
    shapes = dataclasses.replace(SMOKE, max_kv_bytes=limit, decode_batches=(1, 2), decode_contexts=(12,),
                                 store_tokens=())
    result = attention.run_decode(shapes)
    assert [(r["batch"], r["context"]) for r in result["decode"]] == [(1, 12)]
    assert result["skipped_over_max_kv_bytes"] == [[2, 12]]


@cpu_only
def test_a_failing_decode_case_is_recorded_and_the_run_goes_on(monkeypatch):
    from kernels.paged_attention import paged_attention

    real_row = attention._decode_row

    def failing_row(batch, ctx, *args):
        if batch == 2:
            raise RuntimeError("CUDA out of memory (pretend)")
        return real_row(batch, ctx, *args)

    monkeypatch.setattr(attention, "_decode_row", failing_row)
    monkeypatch.setattr(attention, "_decode_kernels", lambda: {"paged": paged_attention})  # v1 only: faster
    result = attention.run_decode(dataclasses.replace(SMOKE, store_tokens=()))
    assert [r["batch"] for r in result["decode"]] == [1] and result["kernels"] == ["paged"]
    assert [(e["batch"], e["context"]) for e in result["errors"]] == [(2, 12)]
    assert "out of memory" in result["errors"][0]["error"]
    assert result["decode"][0]["warp_us"] is None


@cpu_only
def test_without_a_gpu_only_the_smoke_run_starts():
    assert attention.main(["prefill"]) == 2
    with pytest.raises(SystemExit):
        attention.main(["everything", "--smoke"])


def test_bench_run_registers_both_results():
    for name, file in [("attention", "07_attention"), ("paged_attention", "08_paged_attention")]:
        target, saved = run.BENCHMARKS[name]
        module, _, function = target.partition(":")
        assert saved == file and callable(getattr(importlib.import_module(module), function))
