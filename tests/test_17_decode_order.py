"""bench.decode_order's bookkeeping, on a CPU: each case run in both row orders on both grids, every output mapped back
to arrival order and compared (a wrong mapping fails ``same_output``), the kernel's grid setting restored, and the
totals and fastest combination taken from the timings. The kernel is stood in for by the PyTorch reference (the
simulator takes ~30 s a launch of its 256-thread blocks; both grids are checked against the reference in
tests/test_08_paged_attention_warp.py), and the times are a stand-in; the figures come from a GPU."""

import pytest
import torch

import kernels.paged_attention_warp as w
from bench import decode_order as do
from bench import paged_decode as pd
from bench import run
from kernels.paged_attention import paged_attention_ref


def _small(monkeypatch):
    for name, value in (("Q_HEADS", 2), ("KV_HEADS", 1), ("DIM", 64)):
        monkeypatch.setattr(pd, name, value)
    grids = []

    def kernel(q, cache, tables, lens, *, out, max_context_len):  # the reference, in the kernel's place
        assert max_context_len == 16 and tables.shape[1] == 1  # the engine's graph width: 16 keys, one block each
        grids.append(w.HEADS_FIRST)
        return out.copy_(paged_attention_ref(q, cache, tables, lens))

    monkeypatch.setattr(w, "paged_attention_warp", kernel)
    return [pd.case("b3_mixed", [9, 2, 5], graph_max=16, device="cpu")], grids


def test_every_order_and_grid_is_timed_and_gives_the_same_rows(monkeypatch):
    cases, grids = _small(monkeypatch)
    costs = iter([8.0, 9.0,  # arrival: heads first, sequences first
                  6.0, 7.0])  # longest first: heads first, sequences first
    before = w.HEADS_FIRST
    data = do.run(cases, timer=lambda fn: next(costs))
    assert next(costs, None) is None and w.HEADS_FIRST == before and grids == [True, False, True, False]
    (row,) = data["cases"]
    assert row["us"] == {"arrival/heads_first": 8.0, "arrival/seqs_first": 9.0, "longest_first/heads_first": 6.0,
                         "longest_first/seqs_first": 7.0}
    assert row["same_output"] and data["all_outputs_equal"]
    assert row["fastest"] == data["fastest_overall"] == "longest_first/heads_first"
    assert row["floor_fraction"]["arrival/seqs_first"] == round(row["floor_us"] / 9.0, 3)
    assert data["default"] == "longest_first/heads_first" and data["shapes"]["head_dim"] == 64


def test_a_mapping_that_loses_the_row_order_is_caught(monkeypatch):
    cases, _ = _small(monkeypatch)
    real = torch.argsort

    def no_way_back(t, *args, **kwargs):  # the inverse permutation taken as the identity: rows stay permuted
        return torch.arange(len(t)) if not kwargs.get("descending") else real(t, *args, **kwargs)

    monkeypatch.setattr(do.torch, "argsort", no_way_back)
    data = do.run(cases, timer=lambda fn: 1.0)
    assert not data["cases"][0]["same_output"] and not data["all_outputs_equal"]


def test_it_is_registered_and_refuses_to_time_without_a_gpu(tmp_path):
    assert run.BENCHMARKS["decode_order"] == ("bench.decode_order", "17_decode_order_cuda")
    if not torch.cuda.is_available():
        assert do.main(["--out", str(tmp_path)]) == 2 and not list(tmp_path.iterdir())
