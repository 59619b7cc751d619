"""Phase 06: the Qwen3/Llama model against ``transformers`` on tiny random checkpoints, and the loader's errors.

The answer key is ``transformers``' own ``Qwen3ForCausalLM`` / ``LlamaForCausalLM``: a random model is
saved with ``save_pretrained`` and loaded by both, so the checkpoint format, the name mapping and the
math are all checked. Nothing is downloaded.
"""

import dataclasses
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from minivllm.generate import generate, sample  # noqa: E402
from minivllm.model import (AttentionMetadata, KVCache, ModelConfig, Qwen3ForCausalLM,  # noqa: E402
                            UnsupportedModelError, WeightLoadError, checkpoint_to_param, load_config, load_model)

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, initializer_range=0.1)
VARIANTS = {
    # Qwen3's head_dim need not be hidden / heads: 32 here, not 16
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(head_dim=32, rope_theta=1e6)),
    "qwen3-tied": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
                   dict(head_dim=32, tie_word_embeddings=True)),
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(rope_theta=1e5, tie_word_embeddings=True)),
}


def _save_tiny(directory, variant: str, seed: int = 0, **save_kwargs):
    config_cls, model_cls, extra = VARIANTS[variant]
    torch.manual_seed(seed)
    config = config_cls(**TINY, **extra)
    if "rope_theta" in extra:  # transformers 5 reads RoPE settings from rope_parameters
        config.rope_parameters = {"rope_type": "default", "rope_theta": extra["rope_theta"]}
    hf = model_cls(config).eval()
    hf.save_pretrained(directory, **save_kwargs)
    return hf


@pytest.fixture(scope="module", params=list(VARIANTS))
def tiny(request, tmp_path_factory):
    """(variant, transformers model, directory of its checkpoint)."""
    directory = tmp_path_factory.mktemp(request.param)
    return request.param, _save_tiny(directory, request.param), directory


def _ids(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (n,), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- parity with transformers
def test_logits_match_transformers(tiny):
    variant, hf, directory = tiny
    model = load_model(directory, device="cpu", progress=False)
    assert model.config.qk_norm == variant.startswith("qwen3")
    assert model.config.tie_word_embeddings == (model.lm_head is None)
    ids = _ids(24)
    with torch.no_grad():
        want = hf(ids[None]).logits[0]
        got = model.compute_logits(model(ids, torch.arange(len(ids))))
    assert got.dtype == torch.float32 and got.shape == want.shape == (24, TINY["vocab_size"])
    assert (got - want).abs().max().item() <= 1e-4


def test_greedy_continuation_matches_transformers(tiny):
    _, hf, directory = tiny
    model = load_model(directory, device="cpu", progress=False)
    prompt = _ids(7, seed=2)
    with torch.no_grad():
        want = hf.generate(prompt[None], max_new_tokens=32, min_new_tokens=32, do_sample=False,
                           pad_token_id=0)[0, len(prompt):].tolist()
    out = generate(model, prompt.tolist(), max_tokens=32)
    assert out.token_ids == want and out.finish_reason == "length"


def test_cached_decoding_equals_one_full_forward(tiny):
    """Prefill 5 tokens, then a chunk of 3 (attending to the cache through a mask), then 1 at a time."""
    _, _, directory = tiny
    model = load_model(directory, device="cpu", progress=False)
    ids = _ids(12, seed=3)
    with torch.no_grad():
        full = model.compute_logits(model(ids, torch.arange(12)))
        cache = KVCache.allocate(model.config, 16, device="cpu", dtype=torch.float32)
        pieces, start = [], 0
        for end in (5, 8, 9, 10, 11, 12):
            hidden = model(ids[start:end], torch.arange(start, end), AttentionMetadata(cache, end))
            pieces.append(model.compute_logits(hidden))
            start = end
    assert torch.allclose(torch.cat(pieces), full, atol=1e-5, rtol=0)


def test_parameter_counts_add_up_to_transformers_count(tiny):
    variant, hf, directory = tiny
    counts = Qwen3ForCausalLM(load_config(directory), device="meta").parameter_counts()
    assert sum(counts.values()) == sum(p.numel() for p in hf.parameters())  # a tied weight counts once
    assert ("lm_head" in counts) == (variant == "qwen3")
    c = load_config(directory)
    assert counts["k_proj + v_proj"] == 2 * c.num_hidden_layers * c.hidden_size * c.num_key_value_heads * c.head_dim


def test_bf16_weights_give_close_logits(tiny):
    _, hf, directory = tiny
    model = load_model(directory, device="cpu", dtype=torch.bfloat16, progress=False)
    assert model.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in model.parameters())
    ids = _ids(16)
    with torch.no_grad():
        want = hf(ids[None]).logits[0]
        got = model.compute_logits(model(ids, torch.arange(16))).float()
    assert (got - want).abs().max().item() < 0.05 * want.abs().max().item()


def test_sharded_checkpoint_loads_like_a_single_file(tmp_path):
    hf = _save_tiny(tmp_path, "qwen3", max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(list(tmp_path.glob("*.safetensors"))) > 1
    model = load_model(tmp_path, device="cpu", progress=False)
    ids = _ids(10)
    with torch.no_grad():
        diff = model.compute_logits(model(ids, torch.arange(10))) - hf(ids[None]).logits[0]
    assert diff.abs().max().item() <= 1e-4


# ----------------------------------------------------------------------------- names, config, errors
def test_checkpoint_names_map_onto_fused_parameters():
    attn = "model.layers.3.self_attn"
    assert checkpoint_to_param(f"{attn}.q_proj.weight") == (f"{attn}.qkv_proj.weight", "q")
    assert checkpoint_to_param(f"{attn}.v_proj.weight") == (f"{attn}.qkv_proj.weight", "v")
    assert checkpoint_to_param("model.layers.1.mlp.up_proj.weight") == ("model.layers.1.mlp.gate_up_proj.weight", "up")
    assert checkpoint_to_param("model.layers.1.mlp.down_proj.weight") == ("model.layers.1.mlp.down_proj.weight", None)
    assert checkpoint_to_param("model.norm.weight") == ("model.norm.weight", None)


def _hf_config(**changes) -> dict:
    config = dict(model_type="qwen3", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=256, head_dim=16)
    return {**config, **changes}


def test_config_reads_both_rope_spellings_and_validates():
    assert ModelConfig.from_hf(_hf_config(rope_theta=5e5)).rope_theta == 5e5  # transformers 4.x
    rope = {"rope_type": "default", "rope_theta": 7.0}  # transformers 5.x
    assert ModelConfig.from_hf(_hf_config(rope_parameters=rope)).rope_theta == 7.0
    assert ModelConfig.from_hf(_hf_config(model_type="llama", head_dim=None)).head_dim == 16
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        ModelConfig.from_hf(_hf_config(num_key_value_heads=3))
    with pytest.raises(dataclasses.FrozenInstanceError):
        ModelConfig.from_hf(_hf_config()).hidden_size = 3


@pytest.mark.parametrize("changes, message", [
    (dict(model_type="mistral"), "unsupported architecture 'mistral'"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}), "RoPE scaling 'yarn'"),
    (dict(rope_scaling={"type": "llama3", "factor": 8.0}), "RoPE scaling 'llama3'"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
])
def test_config_refuses_what_the_engine_does_not_implement(changes, message):
    with pytest.raises(UnsupportedModelError, match=message):
        ModelConfig.from_hf(_hf_config(**changes))


def test_loader_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path)
    _save_tiny(tmp_path, "llama")
    weights = load_file(tmp_path / "model.safetensors")

    def resave(tensors: dict) -> None:
        save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})

    resave({k: v for k, v in weights.items() if k != "model.layers.1.mlp.up_proj.weight"})
    with pytest.raises(WeightLoadError, match=r"lacks 1 tensor.*layers\.1\.mlp\.gate_up_proj\.weight\[up\] \(128, 64"):
        load_model(tmp_path, progress=False)
    resave({**weights, "model.layers.0.self_attn.k_proj.weight": torch.zeros(16, 64)})
    with pytest.raises(WeightLoadError, match=r"k_proj\.weight has shape \(16, 64\), but .*qkv_proj\.weight\[k\] "
                                              r"expects \(32, 64\)"):
        load_model(tmp_path, progress=False)
    resave({**weights, "model.layers.0.self_attn.q_norm.weight": torch.ones(16)})  # Llama has no QK-norm
    with pytest.raises(WeightLoadError, match=r"unexpected checkpoint tensor model\.layers\.0\.self_attn\.q_norm"):
        load_model(tmp_path, progress=False)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        load_model(tmp_path, progress=False)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        load_model(tmp_path, progress=False)


def test_meta_device_builds_a_model_without_memory():
    config = ModelConfig("qwen3", 151936, 1024, 3072, 28, 16, 8, 128, 1e-6, 1e6, 40960, True, True)  # Qwen3-0.6B
    model = Qwen3ForCausalLM(config, device="meta")
    assert model.device.type == "meta"
    assert sum(model.parameter_counts().values()) == 596_049_920  # Qwen3-0.6B: 0.6 B parameters, tied


# ----------------------------------------------------------------------------- generation
def test_generation_stops_at_eos_and_sampling_is_reproducible(tmp_path):
    _save_tiny(tmp_path, "qwen3")
    model = load_model(tmp_path, device="cpu", progress=False)
    prompt = _ids(5).tolist()
    greedy = generate(model, prompt, max_tokens=8).token_ids
    stopped = generate(model, prompt, max_tokens=8, eos_token_ids={greedy[2]})
    assert stopped.token_ids == greedy[:3] and stopped.finish_reason == "stop"
    a = generate(model, prompt, max_tokens=8, temperature=1.0, seed=7).token_ids
    assert a == generate(model, prompt, max_tokens=8, temperature=1.0, seed=7).token_ids
    assert generate(model, prompt, max_tokens=8, temperature=1e-4, seed=7).token_ids == greedy
    with pytest.raises(ValueError, match="exceeds the model's 128 positions"):
        generate(model, prompt, max_tokens=124)


def test_sample_follows_the_softmax_distribution():
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0])
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([sample(logits, 0.5, gen) for _ in range(4000)])
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    assert torch.allclose(freq, torch.softmax(logits / 0.5, dim=0), atol=0.03)
    assert sample(logits, 0.0).item() == 2


# ----------------------------------------------------------------------------- GPU: the numba kernels inside
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_on_a_gpu_the_model_runs_the_numba_kernels_and_matches_transformers(tiny, dtype):
    from minivllm.model import layers

    variant, hf, directory = tiny
    model = load_model(directory, device="cuda", dtype=dtype, progress=False)
    assert model.device.type == "cuda" and model.dtype == dtype
    ids = _ids(24)
    with torch.no_grad():
        want = hf(ids[None]).logits[0]  # fp32 on the CPU
        got = model.compute_logits(model(ids.cuda(), torch.arange(24, device="cuda"))).float().cpu()
    for module, name in (("rmsnorm", "rms_norm"), ("rope", "apply_rope"), ("activation", "silu_and_mul")):
        assert layers.launcher(module, name) is not None, f"kernels.{module} is missing"
    tol = 1e-4 if dtype == torch.float32 else 0.05 * want.abs().max().item()
    assert (got - want).abs().max().item() <= tol
    if dtype == torch.float32:
        out = generate(model, ids[:7].tolist(), max_tokens=32)
        cpu = generate(load_model(directory, device="cpu", progress=False), ids[:7].tolist(), max_tokens=32)
        assert out.token_ids == cpu.token_ids
