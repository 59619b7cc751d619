"""``bench.profile_run``'s arithmetic, checked without a GPU: the floors a whole run is held to, against a count of
every decode step's reads one by one (and against the engine's own step log on a tiny model), the union of kernel
intervals against a brute-force timeline, and the kernel categories of the names the profiler reports."""

import random

import pytest
import torch

from bench.models import QWEN3_06B, TINY
from bench.profile_run import category, floors, kv_bytes_per_token, union_seconds


def _params(mc) -> int:  # every weight a decode step reads, counted from the model the engine builds
    from minivllm.model.qwen3 import Qwen3ForCausalLM

    with torch.device("meta"):
        model = Qwen3ForCausalLM(mc)
    seen, total = set(), 0
    for name, p in model.named_parameters():
        if "norm" in name or "embed_tokens" in name or id(p) in seen:
            continue  # norm weights are a rounding error; the embedding is read a row per token (the head is not)
        seen.add(id(p))
        total += p.numel()
    return total + (mc.vocab_size * mc.hidden_size if mc.tie_word_embeddings else 0)


def test_floors_count_every_decode_steps_reads():
    rng = random.Random(0)
    prompts = [[1] * rng.randint(1, 40) for _ in range(17)]
    max_tokens = [rng.randint(1, 30) for _ in prompts]
    got = floors(QWEN3_06B, prompts, max_tokens, decode_steps=29, gbps=1000.0)
    context = 0
    for p, n in zip(prompts, max_tokens):
        for j in range(1, n):  # decode step j: the prompt and the j tokens generated so far
            context += len(p) + j
    assert got["decode_context_tokens"] == context
    # Qwen3-0.6B: 28 layers x 8 KV heads x 128 x (K, V) x 2 bytes
    assert kv_bytes_per_token(QWEN3_06B) == 28 * 8 * 128 * 2 * 2
    assert got["kv_bytes"] == context * kv_bytes_per_token(QWEN3_06B)
    assert got["weight_bytes_per_step"] == 2 * _params(QWEN3_06B)
    assert got["kv_floor_s"] == pytest.approx(got["kv_bytes"] / 1e12, abs=1e-3)
    assert got["weights_floor_s"] == pytest.approx(29 * got["weight_bytes_per_step"] / 1e12, abs=1e-3)


def test_the_context_count_is_what_the_engines_decode_steps_attend_over():
    from bench.throughput import run_engine
    from minivllm.llm import LLM

    rng = random.Random(1)
    prompts = [[rng.randrange(3, TINY.vocab_size) for _ in range(rng.randint(2, 12))] for _ in range(5)]
    max_tokens = [rng.randint(1, 9) for _ in prompts]
    llm = LLM(TINY, device="cpu", dtype="float32", max_model_len=64, enable_prefix_caching=False)
    runner, seen = llm.engine.runner, {"steps": 0, "context": 0}
    execute = runner.execute

    def spy(out, *args, **kwargs):  # a decode-only step: every row attends over its context (seq_lens)
        if out.num_prefill_tokens == 0:
            seen["steps"] += 1
            seen["context"] += int(sum(out.seq_lens))
        return execute(out, *args, **kwargs)

    runner.execute = spy
    run_engine(llm, prompts, max_tokens, torch.device("cpu"))
    got = floors(TINY, prompts, max_tokens, decode_steps=seen["steps"], gbps=1.0)
    assert seen["steps"] > 0 and got["decode_context_tokens"] == seen["context"]


def test_union_of_intervals_against_a_timeline():
    rng = random.Random(2)
    for _ in range(50):
        intervals = []
        for _ in range(rng.randint(1, 30)):
            s = rng.randint(0, 200)
            intervals.append((float(s), float(s + rng.randint(1, 40))))
        covered = set()
        for s, e in intervals:
            covered.update(range(int(s), int(e)))
        assert union_seconds(intervals) * 1e6 == pytest.approx(len(covered))
    assert union_seconds([]) == 0.0


@pytest.mark.parametrize("kernel, want", [
    ("kernels::paged_attention_warp::paged_decode16_fused_g2_d128_w8_u4[abi:v164]", "decode attention"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4>>", "prefill attention"),
    ("kernels::qkv_prep::qkv_prep_warp_p2_kernel[abi:v153]", "qk-norm+rope+kv store"),
    ("kernels::_rmsnorm_vec::fused_add_rms_norm_bf16_kernel[abi:v84]", "norms"),
    ("nvjet_sm90_tst_64x32_64x16_4x2_h_bz_TNT", "matmul (cuBLAS)"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::ArgMaxOps<float>>>", "sampling"),
    ("Memcpy HtoD (Pinned -> Device)", "copies"),
    ("void at::native::index_elementwise_kernel<128, 4>", "other torch ops"),
])
def test_kernel_categories(kernel, want):
    assert category(kernel) == want
