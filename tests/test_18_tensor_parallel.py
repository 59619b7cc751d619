"""Tensor parallelism over gloo on the CPU: a model split over 2 ranks must decode exactly like the whole model.

Greedy decoding is deterministic, and splitting a matmul over ranks only changes the order of a few float sums, so
``LLM(..., tensor_parallel_size=2)`` must give ``transformers``' tokens (and TP=1's) token for token, with every
hard case of the scheduler on: several requests per step, prompts chunked over steps, prefix-cache hits, and a
KV pool so small that sequences are preempted and recomputed. The Qwen3 config splits evenly; the Llama one
does not (3 KV heads, an odd MLP width, an odd vocabulary: ranks get 2 + 1 KV heads and a padded vocab shard).
The embedded SmolLM2 (9 query heads, 3 KV heads) runs with the CPU's default linears (4-bit blocks): each rank
quantizes its own shard. Then the failure paths: a killed worker ends the engine with a clear error within seconds; bad sizes are
refused before any process starts. Worker processes are started once per engine, engines once per module.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import signal  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from minivllm.batch import ScheduledSequence, SchedulerOutput  # noqa: E402
from minivllm.config import EngineConfig  # noqa: E402
from minivllm.distributed.executor import TensorParallelError  # noqa: E402
from minivllm.distributed.sharding import Shard, shard_weights, split  # noqa: E402
from minivllm.distributed.worker import PlanMirror, PlanSender  # noqa: E402
from minivllm.llm import LLM  # noqa: E402
from minivllm.model.config import ModelConfig  # noqa: E402
from minivllm.runner import ModelRunner  # noqa: E402
from minivllm.sampling_params import SamplingParams  # noqa: E402
from minivllm.sequence import Sequence  # noqa: E402

transformers = pytest.importorskip("transformers")

COMMON = dict(num_hidden_layers=2, max_position_embeddings=256, rms_norm_eps=1e-6, initializer_range=0.1)
VARIANTS = {  # (config class, model class, sizes): Qwen3 splits evenly; Llama unevenly (3 KV heads, odd widths)
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
              dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=32)),
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
              dict(vocab_size=255, hidden_size=96, intermediate_size=129, num_attention_heads=6,
                   num_key_value_heads=3, tie_word_embeddings=True)),
}
# block_size 4, 24 blocks: 96 slots for 6 requests of up to 74 tokens, so preemption is certain; 16-token steps
# chunk every prompt longer than 16; 4 sequences at once
ENGINE = dict(device="cpu", dtype="float32", block_size=4, num_kv_blocks=24, max_num_seqs=4, max_num_batched_tokens=16)
GREEDY = dict(temperature=0, ignore_eos=True)


def prompts_for(vocab: int, seed: int = 1) -> list[list[int]]:
    """Six prompts of 3..62 tokens; three start with the same 20 tokens (prefix-cache hits)."""
    g = torch.Generator().manual_seed(seed)
    system = torch.randint(0, vocab, (20,), generator=g).tolist()
    out = []
    for i in range(6):
        tail = torch.randint(0, vocab, (int(torch.randint(3, 43, (1,), generator=g)),), generator=g).tolist()
        out.append(system + tail if i % 2 else tail)
    return out


@pytest.fixture(scope="module", params=list(VARIANTS))
def tiny(request, tmp_path_factory):
    """(transformers model, checkpoint directory, TP=2 LLM) of a tiny random model."""
    config_cls, model_cls, sizes = VARIANTS[request.param]
    torch.manual_seed(0)
    hf = model_cls(config_cls(**COMMON, **sizes)).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    directory = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(directory)
    with LLM(str(directory), tensor_parallel_size=2, **ENGINE) as llm:
        yield hf, directory, llm


def test_tp2_greedy_equals_tp1_and_transformers_with_batching_chunking_and_preemption(tiny):
    hf, directory, tp2 = tiny
    prompts = prompts_for(hf.config.vocab_size)
    params = [SamplingParams(max_tokens=6 + i, **GREEDY) for i in range(len(prompts))]
    tp1 = LLM(str(directory), **ENGINE)
    want, got = ([o.outputs[0].token_ids for o in llm.generate(prompts[1:2], params[1:2], use_tqdm=False)
                  + llm.generate(prompts, params, use_tqdm=False)[1:]]  # prompt 1 first: its prefix gets cached
                 for llm in (tp1, tp2))
    prompts, params = prompts[1:2] + prompts[1:], params[1:2] + params[1:]
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        ids = torch.tensor([prompt])  # an explicit mask: token 0, the pad id, may occur in a prompt
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=p.max_tokens, do_sample=False)
        ref = ref[0, len(prompt):]
        assert want[i] == ref.tolist(), f"TP=1 differs from transformers on prompt {i} ({len(prompt)} tokens)"
        assert got[i] == want[i], f"TP=2 differs from TP=1 on prompt {i} ({len(prompt)} tokens): {got[i]} vs {want[i]}"
    engine = tp2.engine
    assert engine.scheduler.num_preemptions > 0, "the 24-block pool should have forced preemptions"
    assert engine.stats["cached_prompt_tokens"] > 0, "the shared 20-token prefix should have hit the cache"
    assert max(r.num_decode_tokens for r in engine.step_log) > 1, "several sequences should decode in one step"
    assert max(len(p) for p in prompts) > ENGINE["max_num_batched_tokens"], "a prompt should be chunked"
    engine.check_no_leaks()


def test_each_rank_holds_only_its_shard(tiny):
    hf, _, tp2 = tiny
    model, mc = tp2.engine.model, hf.config
    shard = model.shard
    attn = model.model.layers[0].self_attn
    d = model.config.head_dim
    assert attn.qkv_proj.weight.shape == ((len(shard.q_heads) + 2 * len(shard.kv_heads)) * d, mc.hidden_size)
    assert attn.o_proj.linear.weight.shape == (mc.hidden_size, len(shard.q_heads) * d)
    assert model.model.embed_tokens.weight.shape == (-(-mc.vocab_size // 2), mc.hidden_size)
    assert tp2.engine.kv_cache.num_kv_heads == len(shard.kv_heads) < mc.num_key_value_heads
    assert model.config.vocab_size == mc.vocab_size  # the engine still checks ids against the whole vocabulary
    # rank 0's rows are the checkpoint's own: q_proj's first heads
    q = attn.qkv_proj.weight[: len(shard.q_heads) * d]
    assert torch.equal(q, hf.model.layers[0].self_attn.q_proj.weight[: len(shard.q_heads) * d])


def test_tp1_engine_has_no_tensor_parallel_parts(tiny):
    _, directory, _ = tiny
    engine = LLM(str(directory), **ENGINE).engine
    assert engine.tp is None and type(engine.runner) is ModelRunner
    assert type(engine.model).__name__ == "Qwen3ForCausalLM"
    assert not any("Parallel" in type(m).__name__ for m in engine.model.modules())


@pytest.fixture(scope="module")
def default_tp2():
    from minivllm.default_model import default_model_path

    default_model_path()  # installed by `make test`: a clear error, not a skip, when it is missing
    llm = LLM(device="cpu", tensor_parallel_size=2)  # the embedded GGUF, the CPU's default linears, per shard
    yield llm
    llm.close()


def test_default_model_tp2_generates_tp1s_greedy_tokens(default_tp2):
    prompt = "The capital of France is"
    p = SamplingParams(max_tokens=8, temperature=0)
    want = LLM(device="cpu").generate(prompt, p, use_tqdm=False)[0].outputs[0]
    got = default_tp2.generate(prompt, p, use_tqdm=False)[0].outputs[0]
    assert got.token_ids == want.token_ids, f"TP=2 {got.text!r} vs TP=1 {want.text!r}"
    assert default_tp2.engine.model.shard_config.num_attention_heads == 6  # 9 query heads split 6 + 3


def test_fp8_cache_over_tp2_gives_tp1s_tokens():
    """Each rank stores its own KV heads as e4m3 bytes (the workers allocate the engine's kv_cache_dtype)."""
    prompts, p = ["The capital of France is", "One, two, three,"], SamplingParams(max_tokens=12, temperature=0)
    outs = []
    for tp in (1, 2):
        with LLM(dtype="float32", num_kv_blocks=64, kv_cache_dtype="fp8", tensor_parallel_size=tp) as llm:
            assert llm.engine.kv_cache.dtype == torch.float8_e4m3fn
            outs.append([o.outputs[0].token_ids for o in llm.generate(prompts, p, use_tqdm=False)])
    assert outs[0] == outs[1]


def test_default_model_serves_with_tp2(default_tp2):
    """The OpenAI-compatible server over the TP=2 engine (its engine thread drives rank 0): the same completion."""
    httpx = pytest.importorskip("httpx")
    from minivllm.server import ServerThread, build_app

    prompt, p = "The capital of France is", SamplingParams(max_tokens=6, temperature=0)
    want = default_tp2.generate(prompt, p, use_tqdm=False)[0].outputs[0].text
    with ServerThread(build_app(default_tp2.engine, model_name="smollm2")) as server:
        r = httpx.post(server.url + "/v1/completions", timeout=60,
                       json={"model": "smollm2", "prompt": prompt, "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == want


def test_a_killed_worker_ends_the_engine_with_a_clear_error(default_tp2):
    engine = default_tp2.engine
    proc = engine.tp.procs[0]
    os.kill(proc.pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(TensorParallelError, match=r"rank 1 .*died \(killed by SIGKILL\)"):
        default_tp2.generate("Hello", SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)
    assert time.monotonic() - start < 5
    with pytest.raises(TensorParallelError):  # and it stays broken, without hanging
        default_tp2.generate("Hello", SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)


def test_a_worker_that_cannot_start_ends_the_start_with_a_clear_error(monkeypatch):
    model = ModelConfig("qwen3", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=2, head_dim=16, qk_norm=True)
    monkeypatch.setattr("sys.executable", "/bin/false")  # the worker's interpreter exits at once, with status 1
    start = time.monotonic()
    with pytest.raises(TensorParallelError, match=r"while starting.*worker rank 1 .*died \(exit code 1\)"):
        LLM(model, tensor_parallel_size=2, **ENGINE)
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("tp, message", [(0, "positive int"), (-1, "positive int"), (True, "positive int"),
                                         (1.5, "positive int"), (4, "at least one of its 3 KV heads")])
def test_bad_sizes_are_refused_when_configured(tp, message):
    model = ModelConfig("llama", vocab_size=100, hidden_size=96, intermediate_size=128, num_hidden_layers=1,
                        num_attention_heads=6, num_key_value_heads=3, head_dim=16)
    with pytest.raises(ValueError, match=message):
        EngineConfig(model=model, tensor_parallel_size=tp)


def test_bad_size_for_a_checkpoint_is_refused_before_any_process_starts(tiny):
    hf, directory, _ = tiny
    start = time.monotonic()
    with pytest.raises(ValueError, match="KV heads"):
        LLM(str(directory), tensor_parallel_size=hf.config.num_key_value_heads + 1, **ENGINE)
    assert time.monotonic() - start < 1.0


def test_shards_cover_every_head_column_and_token_exactly_once():
    config = ModelConfig("llama", vocab_size=255, hidden_size=96, intermediate_size=129, num_hidden_layers=1,
                         num_attention_heads=6, num_key_value_heads=3, head_dim=16)
    for tp in (1, 2, 3):
        shards = [Shard.of(config, r, tp) for r in range(tp)]
        for part, n in (("kv_heads", 3), ("q_heads", 6), ("intermediate", 129), ("vocab", 255)):
            assert [i for s in shards for i in getattr(s, part)] == list(range(n)), (tp, part)
        assert all(len(s.q_heads) == 2 * len(s.kv_heads) for s in shards)  # whole GQA groups
    assert [len(split(10, 4, i)) for i in range(4)] == [3, 3, 2, 2]
    # the slices put back together are the checkpoint's tensors
    g = torch.Generator().manual_seed(0)
    full = {"model.layers.0.self_attn.q_proj.weight": torch.randn(96, 96, generator=g),
            "model.layers.0.self_attn.o_proj.weight": torch.randn(96, 96, generator=g),
            "model.layers.0.mlp.down_proj.weight": torch.randn(96, 129, generator=g),
            "model.embed_tokens.weight": torch.randn(255, 96, generator=g),
            "model.norm.weight": torch.randn(96, generator=g)}
    parts = [dict(shard_weights(full.items(), Shard.of(config, r, 2))) for r in range(2)]
    assert torch.equal(torch.cat([p["model.layers.0.self_attn.q_proj.weight"] for p in parts]),
                       full["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(torch.cat([p["model.layers.0.self_attn.o_proj.weight"] for p in parts], dim=1),
                       full["model.layers.0.self_attn.o_proj.weight"])
    assert torch.equal(torch.cat([p["model.layers.0.mlp.down_proj.weight"] for p in parts], dim=1),
                       full["model.layers.0.mlp.down_proj.weight"])
    embed = torch.cat([p["model.embed_tokens.weight"] for p in parts])  # 128 + 128 rows, the last one padding
    assert embed.shape == (256, 96) and torch.equal(embed[:255], full["model.embed_tokens.weight"])
    assert not embed[255].any()
    assert all(p["model.norm.weight"] is full["model.norm.weight"] for p in parts)


def test_ranks_read_only_their_parts_of_a_checkpoint_and_get_its_slices(tiny):
    """``read_checkpoint(part=shard.part)`` (safetensors' lazy slices; a GGUF's blocks of those rows and columns,
    dequantized alone) gives exactly the slices of the whole tensors."""
    import itertools

    from minivllm.default_model import default_model_path
    from minivllm.gguf_file import GGUFFile
    from minivllm.model.loader import read_checkpoint

    _, directory, _ = tiny
    gguf = GGUFFile(default_model_path())
    for source, tp, rank, first in ((directory, 2, 1, None), (gguf, 3, 1, 16)):  # SmolLM2 over 3: 1 KV head each
        config, _, whole = read_checkpoint(source)
        shard = Shard.of(config, rank, tp)
        parts = read_checkpoint(source, part=shard.part)[2]
        for (name, full), (same, part) in itertools.islice(zip(whole, parts), first):
            assert name == same
            assert torch.equal(shard.fit(name, part), shard.slice_tensor(name, full)), (name, tp, rank)


def test_a_worker_rebuilds_the_plan_with_tables_that_grow_in_place():
    seq = Sequence(seq_id=7, prompt_token_ids=[1, 2, 3])
    table = [4, 5]
    plan = SchedulerOutput(step=0, scheduled=[ScheduledSequence(seq, 3, 0, True, True)], input_ids=[1, 2, 3],
                           positions=[0, 1, 2], slot_mapping=[16, 17, 18], cu_seqlens_q=[0, 3], seq_lens=[3],
                           block_tables=[table], sample_indices=[2])
    sender, mirror = PlanSender(), PlanMirror()
    first = mirror.rebuild(sender.message(plan))
    assert first.scheduled[0].seq == 7 and first.input_ids == [1, 2, 3] and first.block_tables == [[4, 5]]
    assert first.scheduled[0].num_new_tokens == 3 and first.scheduled[0].needs_sample
    table.append(9)  # the sequence's table grows: only the new block is sent, and the worker's list grows in place
    message = sender.message(plan)
    assert message["block_tables"] == [(2, [9])]
    second = mirror.rebuild(message)
    assert second.block_tables[0] is first.block_tables[0] and second.block_tables[0] == [4, 5, 9]
    plan.block_tables = [[8]]  # released and admitted again: a new list, sent whole
    third = mirror.rebuild(sender.message(plan))
    assert third.block_tables == [[8]] and third.block_tables[0] is not first.block_tables[0]


# ----------------------------------------------------------------------------- on GPUs (NCCL)
@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_on_two_gpus_tp2_greedy_equals_transformers(tiny):
    """fp32 on cuda:0 and cuda:1 through NCCL, the numba kernels on each rank's own device, against transformers."""
    hf, directory, _ = tiny
    prompts = prompts_for(hf.config.vocab_size, seed=3)
    with LLM(str(directory), tensor_parallel_size=2, **{**ENGINE, "device": "cuda", "block_size": 16,
                                                        "num_kv_blocks": 12}) as llm:
        assert llm.engine.model.device == torch.device("cuda", 0) and llm.engine.runner.graph_batch == 0
        outs = llm.generate(prompts, SamplingParams(max_tokens=10, **GREEDY), use_tqdm=False)
        for i, (prompt, out) in enumerate(zip(prompts, outs)):
            ids = torch.tensor([prompt])
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)
            assert out.outputs[0].token_ids == ref[0, len(prompt):].tolist(), f"prompt {i}"
        assert llm.engine.scheduler.num_preemptions > 0
