"""bench.paged_decode's bookkeeping, on a CPU: every setting checked against the reference and timed on every
case, the best setting the fastest over the batch >= 32 cases, the smallest split chunk swept on the small
batches with the module's own value restored, the defaults judged against the target, and the plot drawn.
The times are a stand-in here (a CPU has no floor to compare with); the figures come from a GPU."""

import json

import kernels.paged_attention_warp as w
from bench import paged_decode as pd
from minivllm.course import paged_plots


def test_the_sweep_picks_the_fastest_setting_and_split(monkeypatch, tmp_path):
    for name, value in (("Q_HEADS", 2), ("KV_HEADS", 1), ("DIM", 64), ("SETTINGS", [(2, 1), (4, 2)]),
                        ("MIN_SPLITS", (16, 64)), ("CHECK", (2, 12))):  # the check runs in the simulator
        monkeypatch.setattr(pd, name, value)
    monkeypatch.setattr(w, "UNROLL16", 2)  # the defaults (4 warps, 2 per trip) are the second setting
    cases = [pd.case("b32_ctx40", [40] * 32, device="cpu"),
             pd.case("graph_b1_ctx10", [10], graph_max=64, device="cpu")]
    # timed in this order: each setting on each case, then each split chunk on the small case
    costs = iter([10.0, 5.0,  # 2 warps, 1 token per trip
                  7.0, 6.0,  # 4 warps, 2 tokens per trip: faster at batch 32 (the one that counts)
                  4.0, 3.0])  # split chunks 16 and 64 on graph_b1
    ran = []

    def timer(fn):
        ran.append(fn)
        return next(costs)

    split_before = w.MIN_SPLIT
    data = pd.run(cases, timer)
    assert len(ran) == 6 and next(costs, None) is None and w.MIN_SPLIT == split_before
    assert data["best"] == {"warps": 4, "unroll": 2, "min_split": 64}
    assert data["defaults"] == {"warps": 4, "unroll": 2, "min_split": split_before}
    s = data["settings"]
    assert s["w2_u1"]["us"] == {"b32_ctx40": 10.0, "graph_b1_ctx10": 5.0} and s["w4_u2"]["total_us_batch_ge_32"] == 7
    assert all(row["max_abs_err"] < 1e-2 for row in s.values())
    floor = 2 * 32 * 40 * 1 * 64 * 2 / (pd.HBM_PEAK_GBPS * 1e3)  # µs: K and V bf16 bytes at the HBM bandwidth
    assert s["w4_u2"]["floor_fraction"]["b32_ctx40"] == round(floor / 7.0, 3)
    assert data["best_floor_fraction_batch_ge_32_ctx_ge_2k"] == {"b32_ctx40": round(floor / 7.0, 3)}
    assert data["defaults_meet"] is False  # a stand-in 7 µs is far from a 0.08 µs floor
    assert data["min_split_us"] == {16: {"graph_b1_ctx10": 4.0}, 64: {"graph_b1_ctx10": 3.0}}
    assert data["cases"][1]["max_context_len"] == 64 and "tensors" not in data["cases"][0]
    json.dumps(data)  # what save() writes
    fig = paged_plots.decode_settings(data)
    bars = [b for b in fig.axes[0].patches if b.get_gid() == "w4_u2"]
    assert [round(b.get_height(), 3) for b in bars] == [round(floor / 7.0, 3), round(pd.case(
        "x", [10], device="cpu")["floor_us"] / 6.0, 3)]
