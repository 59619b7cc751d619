"""Phase 12: the engine against ``transformers.generate``, with everything that makes batching hard.

Greedy decoding is deterministic, so the engine's tokens must equal ``transformers``' token for token,
whatever the engine does to get them: several requests per step (continuous batching), long prompts
split across steps (chunked prefill), prompts that share a prefix (radix-cache hits, not recomputed),
and a KV pool so small that running sequences are preempted and recomputed. After each test every KV
block is free or held by the radix cache. Tiny random checkpoints (``save_pretrained``) and the embedded
SmolLM2 model, fp32 on the CPU; nothing is downloaded.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from minivllm.config import EngineConfig  # noqa: E402
from minivllm.engine import LLMEngine  # noqa: E402
from minivllm.llm import LLM  # noqa: E402
from minivllm.sampling_params import SamplingParams  # noqa: E402

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, initializer_range=0.1)
VARIANTS = {
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(head_dim=32)),
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(tie_word_embeddings=True)),
}
GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module", params=list(VARIANTS))
def tiny(request, tmp_path_factory):
    """(transformers model, checkpoint directory) of a tiny random model."""
    config_cls, model_cls, extra = VARIANTS[request.param]
    torch.manual_seed(0)
    hf = model_cls(config_cls(**TINY, **extra)).eval()
    hf.generation_config.eos_token_id = None  # never stop early: compare every token
    hf.generation_config.pad_token_id = 0
    directory = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(directory)
    return hf, directory


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


def random_prompts(seed: int) -> list[list[int]]:
    """Ten prompts of 3..70 tokens; five start with the same 40-token "system prompt" (prefix-cache hits)."""
    g = torch.Generator().manual_seed(seed)
    system = torch.randint(0, 256, (40,), generator=g).tolist()
    prompts = []
    for i in range(10):
        n = int(torch.randint(3, 31, (1,), generator=g))
        tail = torch.randint(0, 256, (n,), generator=g).tolist()
        prompts.append(system + tail if i % 2 else tail)
    return prompts


def test_engine_greedy_equals_transformers_with_batching_chunking_prefix_hits_and_preemption(tiny):
    hf, directory = tiny
    # 14 blocks of 16 slots for 10 requests of up to 94 tokens: preemption is certain; 24-token steps chunk prompts
    llm = LLM(str(directory), dtype="float32", num_kv_blocks=14, max_num_seqs=6, max_num_batched_tokens=24)
    prompts = random_prompts(seed=1)
    lengths = [5 + 2 * i for i in range(len(prompts))]
    params = [SamplingParams(max_tokens=n, **GREEDY) for n in lengths]
    first = llm.generate(prompts[:1], params[:1], use_tqdm=False)  # caches the system prompt's blocks first
    outs = first + llm.generate(prompts[1:], params[1:], use_tqdm=False)
    for prompt, n, out in zip(prompts, lengths, outs):
        assert out.finished and out.outputs[0].finish_reason == "length"
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, n), f"prompt of {len(prompt)} tokens"
    engine = llm.engine
    log = list(engine.step_log)
    assert engine.scheduler.num_preemptions > 0, "the tiny pool should have forced preemptions"
    assert engine.stats["cached_prompt_tokens"] >= 32, "the shared prefix should have come from the cache"
    assert any(r.num_decode_tokens and r.num_prefill_tokens for r in log), "decodes and prefills should mix"
    assert max(r.num_decode_tokens for r in log) > 1, "several sequences should decode in one step"
    chunks = {}
    for r in log:
        for seq_id, _, is_prefill in r.seqs:
            chunks[seq_id] = chunks.get(seq_id, 0) + is_prefill
    assert max(chunks.values()) > 1, "some prompt should have been prefilled in several chunks"
    engine.check_no_leaks()


def test_abort_mid_generation_frees_every_block(tiny):
    _, directory = tiny
    engine = LLMEngine(model=str(directory), num_kv_blocks=32, max_num_batched_tokens=64)
    ids = [engine.add_request(p, SamplingParams(max_tokens=50, **GREEDY)) for p in random_prompts(seed=2)[:6]]
    for _ in range(6):
        engine.step()
    assert engine.allocator.num_free < engine.allocator.num_blocks
    outs = [engine.abort(rid) for rid in ids[::2]]
    assert all(o.outputs[0].finish_reason == "abort" for o in outs)
    assert engine.abort("no such request") is None
    while engine.has_unfinished_requests():
        engine.step()
    engine.check_no_leaks()


def test_each_steps_output_keeps_that_steps_tokens_as_the_answer_grows(tiny):
    """Outputs read the sequence's growing lists lazily (no copy per step): an output kept from an early step must
    still say what it said then. The reference: copies made the moment each output arrived."""
    _, directory = tiny
    engine = LLMEngine(model=str(directory), num_kv_blocks=32)
    rid = engine.add_request(random_prompts(seed=6)[0], SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=9,
                                                                     logprobs=1, ignore_eos=True))
    kept, copies = [], []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == rid:
                kept.append(out)
                copies.append([(list(o.token_ids), list(o.logprobs), list(o.delta_token_ids)) for o in out.outputs])
    assert len(kept) >= 9 and kept[-1].finished
    for out, then in zip(kept, copies):  # read again after the request has finished
        assert [(o.token_ids, o.logprobs, o.delta_token_ids) for o in out.outputs] == then
        assert [o.num_tokens for o in out.outputs] == [len(ids) for ids, _, _ in then]
        assert [o.since(1) for o in out.outputs] == [(ids[1:], lps[1:]) for ids, lps, _ in then]
    assert [len(ids) for ids, _, _ in copies[0]] == [1, 1] and [len(ids) for ids, _, _ in copies[-1]] == [9, 9]
    assert kept[-1].num_generated_tokens == 18


def test_seeded_sampling_does_not_depend_on_the_batch(tiny):
    _, directory = tiny
    llm = LLM(str(directory), num_kv_blocks=64)
    prompt = random_prompts(seed=3)[0]
    p = SamplingParams(temperature=0.9, top_p=0.9, seed=1234, max_tokens=12, ignore_eos=True)
    alone = llm.generate([prompt], p, use_tqdm=False)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)] * 4
    crowd = llm.generate([prompt] + random_prompts(seed=4)[:4], [p] + others, use_tqdm=False)[0].outputs[0].token_ids
    assert alone == crowd
    different = llm.generate([prompt], SamplingParams(temperature=0.9, top_p=0.9, seed=99, max_tokens=12,
                                                      ignore_eos=True), use_tqdm=False)[0].outputs[0].token_ids
    assert different != alone


def test_n_samples_logprobs_and_bad_requests(tiny):
    _, directory = tiny
    llm = LLM(str(directory), num_kv_blocks=64)
    prompt = random_prompts(seed=5)[1]
    out = llm.generate([prompt], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=6, logprobs=2,
                                                ignore_eos=True), use_tqdm=False)[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1, "three seeded samples should differ"
    for o in out.outputs:
        assert len(o.logprobs) == 6
        for token, step in zip(o.token_ids, o.logprobs):
            assert token in step and 2 <= len(step) <= 3 and all(v <= 0 for v in step.values())
    engine = llm.engine
    with pytest.raises(ValueError, match="context"):
        engine.add_request(list(range(256)), SamplingParams())
    with pytest.raises(ValueError, match="max_tokens"):
        engine.add_request([1, 2, 3], SamplingParams(max_tokens=300))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([], SamplingParams())
    with pytest.raises(ValueError, match="0..255"):
        engine.add_request([1, 999], SamplingParams())
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request("text needs a tokenizer", SamplingParams())
    with pytest.raises(TypeError, match="unknown engine option"):
        EngineConfig.from_kwargs(None, max_num_seq=3)
    with pytest.raises(ValueError, match="attention_backend"):
        EngineConfig(attention_backend="cudnn")
    assert not engine.has_unfinished_requests()
    engine.check_no_leaks()


# ----------------------------------------------------------------------------- the default model
@pytest.fixture(scope="module")
def default_pair(hf_default_model):  # transformers' model from the same GGUF file (conftest.py)
    return LLM(dtype="float32", num_kv_blocks=96, max_num_batched_tokens=64), hf_default_model


QUESTIONS = ["What is the capital of France?", "Name three primary colours.", "What is 12 times 12?",
             "Write one sentence about the Moon."]


def test_default_model_chat_equals_transformers_and_reuses_the_cached_prompt(default_pair):
    llm, hf = default_pair
    tok = llm.tokenizer
    convs = [[{"role": "user", "content": q}] for q in QUESTIONS]
    params = SamplingParams(temperature=0, max_tokens=24)
    outs = llm.chat(convs, params, use_tqdm=False)
    for conv, out in zip(convs, outs):
        ids = tok.apply_chat_template(conv, tokenize=True)
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
        got = out.outputs[0].token_ids
        assert got == ref[: len(got)] and (len(got) == len(ref) or got[-1] in llm.engine.eos_token_ids)
        assert out.outputs[0].text == tok.decode(got, skip_special_tokens=True)
    assert "Paris" in outs[0].outputs[0].text
    before = llm.engine.stats["cached_prompt_tokens"]
    again = llm.chat(convs[:1], params, use_tqdm=False)[0]
    assert again.outputs[0].token_ids == outs[0].outputs[0].token_ids
    assert llm.engine.stats["cached_prompt_tokens"] - before >= 16, "the repeated prompt should hit the cache"
    llm.engine.check_no_leaks()


def test_default_model_stop_strings_are_trimmed_and_streamed(default_pair):
    llm, _ = default_pair
    prompt = "The capital of France is"
    full = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)[0].outputs[0].text
    cut = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=20, stop=["."]), use_tqdm=False)[0].outputs[0]
    assert "." in full and cut.text == full[: full.index(".")] and cut.stop_reason == "."
    assert cut.finish_reason == "stop"
    assert "".join(llm.stream(prompt, SamplingParams(temperature=0, max_tokens=20, stop=["."]))) == cut.text
    llm.engine.check_no_leaks()


# ----------------------------------------------------------------------------- on a GPU
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "numba"])
def test_gpu_engine_with_cuda_graphs_equals_transformers(tiny, backend):
    """fp32 on the GPU: the numba kernels (store_kv, paged decode attention, norms, RoPE, SwiGLU) in captured
    CUDA graphs, and prefill through SDPA ("auto") or our flash kernel ("numba"), against transformers on the CPU."""
    hf, directory = tiny
    llm = LLM(str(directory), device="cuda", dtype="float32", num_kv_blocks=24, max_num_seqs=8,
              max_num_batched_tokens=48, attention_backend=backend, max_model_len=256)
    assert llm.engine.runner.graph_batch == 8
    prompts = random_prompts(seed=6)
    lengths = [8 + 3 * i for i in range(len(prompts))]
    outs = llm.generate(prompts, [SamplingParams(max_tokens=n, **GREEDY) for n in lengths], use_tqdm=False)
    for prompt, n, out in zip(prompts, lengths, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, n)
    assert any(r.graph for r in llm.engine.step_log), "decode steps should have replayed a CUDA graph"
    assert llm.engine.scheduler.num_preemptions > 0
    llm.engine.check_no_leaks()
