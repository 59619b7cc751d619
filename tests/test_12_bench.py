"""Phase 12's benchmarks, dry-run on a tiny random Qwen3 on the CPU: the GPU code path, seconds long.

The numbers are not checked (timings), the bookkeeping is: every request ran to its max_tokens, the
engine's greedy tokens equal ``transformers``' on the same weights, prefix caching computed exactly the
tokens the cache could not serve, and the JSON files carry where and how they were measured.
"""

import json

import pytest

pytest.importorskip("transformers")

from bench import latency, prefix, throughput  # noqa: E402


def _load(path) -> dict:
    data = json.loads(path.read_text())
    assert {"date", "command", "host", "versions"} <= set(data["meta"])
    return data


def test_throughput_dry_run_matches_transformers(tmp_path):
    assert throughput.main(["--config", "tiny", "--device", "cpu", "--num-requests", "6", "--peer-requests", "3",
                            "--out", str(tmp_path)]) == 0
    data = _load(tmp_path / "12_throughput_tiny.json")
    w, e = data["workload"], data["minivllm"]
    assert w["requests"] == 6 and e["output_tokens"] == w["output_tokens"]
    assert 4 <= w["prompt_len_range"][0] <= w["prompt_len_range"][1] <= 24
    assert data["transformers"]["requests"] == 3 and data["transformers"]["batch"] == 3
    # same random weights, greedy, fp32: left-padded batched transformers and the engine agree token for token
    assert data["parity_vs_transformers"] == {"requests": 3, "same_first_8_tokens": 3, "same_all_tokens": 3}
    assert e["steps"] >= max(3, w["max_tokens_range"][1]) and e["preemptions"] == 0


def test_throughput_without_a_peer(tmp_path):
    """--peer-requests 0: the engine alone (GPU sessions short of time), no ratio and no parity claimed."""
    assert throughput.main(["--config", "tiny", "--device", "cpu", "--num-requests", "4", "--peer-requests", "0",
                            "--out", str(tmp_path)]) == 0
    data = _load(tmp_path / "12_throughput_tiny.json")
    assert data["transformers"] == {"skipped": "--peer-requests 0"}
    assert "speedup_vs_transformers" not in data and "parity_vs_transformers" not in data
    assert data["minivllm"]["output_tokens"] == data["workload"]["output_tokens"]


def test_throughput_runs_each_cache_dtype_again_with_the_other_loop(tmp_path):
    """--both-loops: on a CPU (plain loop by default) the overlapped loop after the plain runs, each named by how it
    differs from the first; the overlapped loop changes no token, the fp8 cache only what its rounding changes."""
    assert throughput.main(["--config", "tiny", "--device", "cpu", "--num-requests", "4", "--peer-requests", "0",
                            "--kv-cache-dtype", "auto", "fp8", "--both-loops", "--out", str(tmp_path)]) == 0
    data = _load(tmp_path / "12_throughput_tiny.json")
    runs = [k for k in data if k.startswith("minivllm") and isinstance(data[k], dict)]
    assert runs == ["minivllm", "minivllm_kv_fp8", "minivllm_async", "minivllm_kv_fp8_async"]
    assert data["engine_async_scheduling"] is False
    assert [data[k]["async_scheduling"] for k in runs] == [False, False, True, True]
    assert [data[k].get("kv_cache_dtype", "auto") for k in runs] == ["auto", "fp8", "auto", "fp8"]
    assert data["minivllm_async"]["same_all_tokens_as_minivllm"] == 4
    for k in runs:
        assert data[k]["output_tokens"] == data["workload"]["output_tokens"]
    assert data["minivllm_kv_fp8_async_vs_minivllm"] > 0


def test_throughput_names_the_plain_runs_where_the_default_overlaps():
    """On a GPU the engine overlaps by default: the first runs use the overlapped loop and --both-loops adds the plain
    one (minivllm_no_async); --no-async-scheduling makes the plain loop the first."""
    args = throughput.parser().parse_args(["--kv-cache-dtype", "auto", "fp8", "--both-loops"])
    runs = throughput.engine_runs(args, default_async=True)
    assert runs == [("auto", True), ("fp8", True), ("auto", False), ("fp8", False)]
    keys = [throughput.run_key(i, kv, overlap, runs[0][1]) for i, (kv, overlap) in enumerate(runs)]
    assert keys == ["minivllm", "minivllm_kv_fp8", "minivllm_no_async", "minivllm_kv_fp8_no_async"]
    args = throughput.parser().parse_args(["--no-async-scheduling", "--also-async"])  # the old flag's name still works
    assert throughput.engine_runs(args, default_async=True) == [("auto", False), ("auto", True)]


def test_prefix_dry_run_computes_only_what_the_cache_cannot_serve(tmp_path):
    n, shared, own = 5, 48, 7
    assert prefix.main(["--config", "tiny", "--device", "cpu", "--num-requests", str(n), "--shared-len", str(shared),
                        "--suffix-len", str(own), "--max-tokens", "3", "--out", str(tmp_path)]) == 0
    data = _load(tmp_path / "12_prefix_tiny.json")
    off, on = data["cache_off"], data["cache_on"]
    assert off["prefill_tokens_computed"] == n * (shared + own) and off["cached_prompt_tokens"] == 0
    assert on["prefill_tokens_computed"] == n * own and on["cached_prompt_tokens"] == n * shared  # 48 = 3 blocks
    assert data["prefill_tokens_saved"] == round(1 - own / (shared + own), 4)
    assert data["same_outputs"] == n


def test_latency_dry_run_reports_medians_of_the_runs(tmp_path):
    assert latency.main(["--config", "tiny", "--device", "cpu", "--repeats", "2", "--output-len", "6",
                         "--ttft-len", "40", "--out", str(tmp_path)]) == 0
    data = _load(tmp_path / "12_latency_tiny.json")
    assert "cuda_graphs" not in data and data["targets"] is None
    runs = data["eager"]["runs"]
    assert len(runs["decode_ms_per_token"]) == len(runs["ttft_ms"]) == 2
    assert min(runs["ttft_ms"]) <= data["eager"]["ttft_ms"] <= max(runs["ttft_ms"])
