"""bench.paged_decode's bookkeeping, on a CPU: every setting checked against the reference and timed on every
case, the best setting the fastest over the batch >= 32 cases, the smallest split chunk swept on the small
batches, the largest on the large ones and the split rule on all, with the module's own values restored, the
defaults judged against the target, and the plot drawn. The times are a stand-in here (a CPU has no floor to
compare with); the figures come from a GPU. Also the split rule itself, and how the GPU's resident blocks are
found."""

import json

import pytest
import torch

import kernels.paged_attention_warp as w
from bench import paged_decode as pd
from minivllm.course import paged_plots


def test_the_sweep_picks_the_fastest_setting_and_split(monkeypatch, tmp_path):
    for name, value in (("Q_HEADS", 2), ("KV_HEADS", 1), ("DIM", 64), ("SETTINGS", [(2, 1), (4, 2)]),
                        ("MIN_SPLITS", (16, 64)), ("MAX_SPLITS", (None, 16)), ("SPLIT_RULES", ("waves", "fill")),
                        ("CHECK", (2, 12))):  # the check runs in the simulator
        monkeypatch.setattr(pd, name, value)
    monkeypatch.setattr(w, "WARPS", 4)
    monkeypatch.setattr(w, "UNROLL16", 2)  # the defaults (4 warps, 2 per trip) are the second setting
    cases = [pd.case("b32_ctx40", [40] * 32, device="cpu"),
             pd.case("graph_b1_ctx10", [10], graph_max=64, device="cpu")]
    # timed in this order: each setting on each case, then each smallest split chunk on the small case, then
    # each largest split chunk on the large case
    costs = iter([10.0, 5.0,  # 2 warps, 1 token per trip
                  7.0, 6.0,  # 4 warps, 2 tokens per trip: faster at batch 32 (the one that counts)
                  4.0, 3.0,  # smallest split chunks 16 and 64 on graph_b1
                  7.0, 5.0,  # largest split chunks: none (whole contexts), then 16 keys on b32
                  6.0, 2.0, 5.0, 4.0,  # split rules on both cases: "waves" 8 in all, "fill" 9
                  3.5, 2.5,  # the defaults on an fp8 copy of each case
                  1.5,  # the small case with split-K merged in the kernel
                  1.7])  # ... and merged by a second kernel
    ran = []

    def timer(fn):
        ran.append(fn)
        return next(costs)

    before = (w.MIN_SPLIT, w.MAX_SPLIT, w.SPLIT_RULE)
    data = pd.run(cases, timer)
    assert len(ran) == 16 and next(costs, None) is None and (w.MIN_SPLIT, w.MAX_SPLIT, w.SPLIT_RULE) == before
    assert data["best"] == {"warps": 4, "unroll": 2, "min_split": 64, "max_split": 16, "split_rule": "waves"}
    assert data["defaults"] == {"warps": 4, "unroll": 2, "min_split": before[0], "max_split": before[1],
                                "split_rule": before[2]}
    assert data["split_rule_us"] == {"waves": {"b32_ctx40": 6.0, "graph_b1_ctx10": 2.0},
                                     "fill": {"b32_ctx40": 5.0, "graph_b1_ctx10": 4.0}}
    assert data["max_split_us"] == {"none": {"b32_ctx40": 7.0}, "16": {"b32_ctx40": 5.0}}
    s = data["settings"]
    assert s["w2_u1"]["us"] == {"b32_ctx40": 10.0, "graph_b1_ctx10": 5.0} and s["w4_u2"]["total_us_batch_ge_32"] == 7
    assert all(row["max_abs_err"] < 1e-2 for row in s.values())
    floor = 2 * 32 * 40 * 1 * 64 * 2 / (pd.hbm_gbps() * 1e3)  # µs: K and V bf16 bytes at the HBM bandwidth
    assert s["w4_u2"]["floor_fraction"]["b32_ctx40"] == round(floor / 7.0, 3)
    assert data["best_floor_fraction_batch_ge_32_ctx_ge_2k"] == {"b32_ctx40": round(floor / 7.0, 3)}
    assert data["defaults_meet"] is False  # a stand-in 7 µs is far from a 0.08 µs floor
    assert data["min_split_us"] == {16: {"graph_b1_ctx10": 4.0}, 64: {"graph_b1_ctx10": 3.0}}
    assert data["max_split_floor_fraction"]["16"] == {"b32_ctx40": round(floor / 5.0, 3)}
    assert data["cases"][1]["max_context_len"] == 64 and "tensors" not in data["cases"][0]
    fp8 = data["fp8_cache"]  # its floor is half of bf16's; its times beside the bf16 defaults' (7.0 and 6.0)
    assert fp8["us"] == {"b32_ctx40": 3.5, "graph_b1_ctx10": 2.5} and fp8["max_abs_err_vs_fp8_reference"] < 2e-2
    assert fp8["floor_fraction"]["b32_ctx40"] == round(floor / 2 / 3.5, 3)
    assert fp8["speedup_vs_bf16_defaults"] == {"b32_ctx40": 2.0, "graph_b1_ctx10": 2.4}
    assert data["fused_merge_us"] == {"graph_b1_ctx10": 1.5} and data["two_kernel_merge_us"] == {"graph_b1_ctx10": 1.7}
    json.dumps(data)  # what save() writes
    fig = paged_plots.decode_settings(data)
    bars = [b for b in fig.axes[0].patches if b.get_gid() == "w4_u2"]
    assert [round(b.get_height(), 3) for b in bars] == [round(floor / 7.0, 3), round(pd.case(
        "x", [10], device="cpu")["floor_us"] / 6.0, 3)]


def test_split_size_keeps_a_small_grid_within_one_wave_and_cuts_a_full_one_into_even_chunks(monkeypatch):
    monkeypatch.setattr(w, "MIN_SPLIT", 64)
    monkeypatch.setattr(w, "MAX_SPLIT", None)
    monkeypatch.setattr(w, "SPLIT_RULE", "waves")
    slots = 4 * 132  # an H200 running 4 blocks per SM
    assert w.split_size(8, 300, slots) == 64  # batch 1 x 8 heads: chunks as small as allowed (66 per block wanted)
    assert w.split_size(256, 2048, slots) == 1024  # batch 32: 2 splits = 512 blocks, one wave
    assert w.split_size(512, 2048, slots) is None  # batch 64: 512 blocks fill one wave already
    assert w.split_size(8, 50, slots) is None  # nothing longer than the smallest chunk: no split
    assert w.split_size(256, 2048, 3 * 132) is None  # 3 blocks per SM: a second split would make 1.3 waves
    monkeypatch.setattr(w, "SPLIT_RULE", "fill")  # the earlier rule: at least one wave
    assert w.split_size(256, 2048, slots) == 683  # 3 splits = 768 blocks: 1.45 waves
    assert w.split_size(512, 2048, slots) == 1024  # 2 splits = 1,024 blocks
    assert w.split_size(1112, 850, slots) is None  # batch 139: a full grid keeps whole contexts...
    monkeypatch.setattr(w, "MAX_SPLIT", 256)
    assert w.split_size(1112, 850, slots) == 256  # ...unless MAX_SPLIT cuts them into even chunks
    assert w.split_size(1112, 200, slots) is None  # a context shorter than a chunk stays whole


def test_resident_blocks_asks_the_compiled_kernel_and_guesses_before_it_exists(monkeypatch):
    import types

    import kernels._launch as kl

    monkeypatch.setattr(kl, "_resident", {})
    monkeypatch.setattr(kl.torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(
        multi_processor_count=132))
    asked = []

    class Compiled:
        def max_cooperative_grid_blocks(self, threads):
            asked.append(threads)
            return 3 * 132  # the driver's answer: 3 blocks per SM

    class Kernel:  # a numba dispatcher's part that is read: its compiled overloads
        def __init__(self, overloads):
            self.overloads = overloads

    kernel = Kernel({})
    device = torch.device("cuda", 0)
    assert kl.resident_blocks(kernel, 128, device) == 4 * 132 and asked == []  # not compiled: the guess...
    kernel.overloads["sig"] = Compiled()
    assert kl.resident_blocks(kernel, 128, device) == 3 * 132 and asked == [128]  # ...not kept
    assert kl.resident_blocks(kernel, 128, device) == 3 * 132 and asked == [128]  # the answer is kept

    class Broken:
        def max_cooperative_grid_blocks(self, threads):
            raise RuntimeError("no occupancy API")

    other = Kernel({"sig": Broken()})
    assert kl.resident_blocks(other, 256, device) == 4 * 132  # a failing query falls back to the guess


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal on a machine without a GPU")
def test_the_fp8_variants_benchmark_needs_a_gpu(tmp_path):
    from bench import fp8_decode_variants

    assert fp8_decode_variants.main(["--out", str(tmp_path)]) == 2 and not list(tmp_path.iterdir())
    assert set(fp8_decode_variants.VARIANTS) == {key for key, _ in paged_plots.FP8_VARIANTS}  # what the plot draws
