"""Phase 06: GGUF loading, and the default model (SmolLM2-135M-Instruct, Q4_1 GGUF) against ``transformers``.

Answer keys: ``transformers`` loading the same GGUF file (its own dequantization and its own undoing of
llama.cpp's Q/K permutation), and tiny GGUF files written here with
``gguf.GGUFWriter`` from random ``transformers`` models, Q/K permuted the way llama.cpp's converter does.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gguf  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from minivllm import cli  # noqa: E402
from minivllm.default_model import default_model_path  # noqa: E402
from minivllm.generate import generate  # noqa: E402
from minivllm.model import GGUFFile, GGUFFormatError, UnsupportedModelError, load_model  # noqa: E402
from minivllm.tokenizer import Tokenizer  # noqa: E402

transformers = pytest.importorskip("transformers")

# Hugging Face name (inside model.layers.N.) -> llama.cpp's (inside blk.N.), as llama.cpp's converter names them
HF_TO_GGUF = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
              "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: half-split rows -> interleaved pairs, per head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, hf, arch: str, extra_tensors: dict | None = None) -> None:
    """A float32 GGUF of a transformers model, with the metadata and names llama.cpp's converter writes."""
    c = hf.config
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_key_length(c.head_dim)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    for name, t in hf.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        w = t.numpy()
        if name.startswith("model.layers."):
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            part, kind = rest.rsplit(".", 1)
            gname = f"blk.{layer}.{HF_TO_GGUF[part]}.{kind}"
            if arch == "llama" and part in ("self_attn.q_proj", "self_attn.k_proj"):
                w = llama_cpp_permute(w, c.num_attention_heads if "q_proj" in part else c.num_key_value_heads)
        else:
            gname = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                     "lm_head.weight": "output.weight"}[name]
        writer.add_tensor(gname, np.ascontiguousarray(w))
    for name, array in (extra_tensors or {}).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.1)


def tiny_hf(arch: str):
    torch.manual_seed(0)
    if arch == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, tie_word_embeddings=True)).eval()
    return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**TINY, head_dim=32)).eval()


# ----------------------------------------------------------------------------- tiny GGUF files
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_gguf_file_loads_to_the_same_model(tmp_path, arch):
    hf = tiny_hf(arch)
    write_gguf(tmp_path / "tiny.gguf", hf, arch)
    model = load_model(tmp_path / "tiny.gguf", device="cpu", progress=False)
    assert model.config.qk_norm == (arch == "qwen3") and model.config.tie_word_embeddings == (arch == "llama")
    ids = torch.randint(0, TINY["vocab_size"], (20,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = model.compute_logits(model(ids, torch.arange(20))) - hf(ids[None]).logits[0]
    assert diff.abs().max().item() <= 1e-4


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0", "Q4_0"])
def test_our_dequantization_gives_gguf_packages_bits(kind):
    """``gguf_loader.dequantize`` (vectorized PyTorch for Q4_1 and Q8_0, the gguf package for the rest) against
    ``gguf.quants.dequantize``, bit for bit: random blocks with finite fp16 scales, then row and whole-block
    column cuts (a tensor-parallel rank's part), then every quantized tensor of the default model."""
    from minivllm.model.gguf_loader import dequantize

    qt = gguf.GGMLQuantizationType[kind]
    block, nbytes = gguf.GGML_QUANT_SIZES[qt]
    rng = np.random.default_rng(0)
    rows, blocks = 7, 5
    raw = rng.integers(0, 256, (rows, blocks, nbytes), dtype=np.uint8)
    scales = 2 if qt == gguf.GGMLQuantizationType.Q4_1 else 1  # d (and m): finite fp16 values
    raw[:, :, : 2 * scales] = rng.normal(0, 0.05, (rows, blocks, scales)).astype(np.float16).view(np.uint8)
    raw = raw.reshape(rows, blocks * nbytes)
    for part in (raw, raw[2:5], raw[:, nbytes: 3 * nbytes]):
        want = gguf.quants.dequantize(part, qt)
        got = dequantize(part, qt)
        assert got.dtype == np.float32 and got.shape == want.shape == (part.shape[0], part.shape[1] // nbytes * block)
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    file = GGUFFile(default_model_path())
    for name, info in file.tensors.items():
        if info.type == qt:
            assert np.array_equal(dequantize(file.raw(name), qt).view(np.uint32),
                                  gguf.quants.dequantize(file.raw(name), qt).view(np.uint32)), name


def test_gguf_errors_name_the_problem(tmp_path):
    hf = tiny_hf("llama")
    write_gguf(tmp_path / "gpt2.gguf", hf, "gpt2")
    with pytest.raises(UnsupportedModelError, match="unsupported GGUF architecture 'gpt2'"):
        load_model(tmp_path / "gpt2.gguf", progress=False)
    write_gguf(tmp_path / "int.gguf", hf, "llama", extra_tensors={"blk.0.extra.weight": np.zeros((4, 8), np.int32)})
    with pytest.raises(UnsupportedModelError, match="tensor blk.0.extra.weight is stored as I32"):
        load_model(tmp_path / "int.gguf", progress=False)
    (tmp_path / "junk.gguf").write_bytes(b"PK\x03\x04 not a gguf file")
    with pytest.raises(GGUFFormatError, match="not a GGUF file"):
        load_model(tmp_path / "junk.gguf", progress=False)
    (tmp_path / "model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="a checkpoint directory or a .gguf file"):
        load_model(tmp_path / "model.bin", progress=False)


# ----------------------------------------------------------------------------- the default model
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "In 1969, 3 astronauts flew to the Moon and",
           "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n"]


@pytest.fixture(scope="module")
def default(hf_default_model):
    """(our model, transformers' model, our tokenizer), all from the embedded GGUF file, fp32 on the CPU
    (transformers' through its own GGUF loader: ``hf_default_model`` in conftest.py)."""
    file = GGUFFile(default_model_path())  # parsed once, for the model and the tokenizer
    ours = load_model(file, device="cpu", progress=False)
    return ours, hf_default_model, Tokenizer.from_gguf(file)


def test_default_model_config_is_smollm2_135m(default):
    c = default[0].config
    assert (c.architecture, c.num_hidden_layers, c.hidden_size, c.intermediate_size) == ("llama", 30, 576, 1536)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.vocab_size) == (9, 3, 64, 49152)
    assert (c.rope_theta, c.tie_word_embeddings, c.qk_norm) == (100000.0, True, False)
    assert sum(default[0].parameter_counts().values()) == sum(p.numel() for p in default[1].parameters())


def test_default_model_logits_match_transformers(default):
    ours, theirs, tok = default
    for prompt in PROMPTS:
        ids = torch.tensor(tok.encode(prompt))
        with torch.no_grad():
            got = ours.compute_logits(ours(ids, torch.arange(len(ids))))
            want = theirs(ids[None]).logits[0]
        assert (got - want).abs().max().item() <= 1e-3, prompt


def test_default_model_greedy_text_matches_transformers(default):
    ours, theirs, tok = default
    ids = tok.apply_chat_template([{"role": "user", "content": "Write a haiku about the sea."}], tokenize=True)
    with torch.no_grad():
        want = theirs.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False)[0, len(ids):]
    got = generate(ours, ids, max_tokens=32).token_ids
    assert got == want.tolist()
    assert tok.decode(got) == tok.decode(want.tolist())


def test_default_model_answers_the_capital_of_france(default):
    ours, _, tok = default
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], tokenize=True)
    out = generate(ours, ids, max_tokens=24, eos_token_ids=tok.eos_token_ids)
    assert out.finish_reason == "stop" and "Paris" in tok.decode(out.token_ids)


def test_cli_generate_prints_the_answer(default, monkeypatch, capsys):
    import minivllm.model

    monkeypatch.setattr(minivllm.model, "load_model", lambda path, device=None: default[0])  # skip a 2nd load
    assert cli.main(["generate", "What is the capital of France?", "--max-tokens", "24", "--stats",
                     "--quantization", "none"]) == 0
    out, err = capsys.readouterr()
    assert "Paris" in out and out.endswith("\n") and "<|im_end|>" not in out
    assert "tokens/s" in err
    assert cli.main(["generate", "hi", "--model", "/no/such/model"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.gpu
def test_default_model_on_a_gpu_in_bf16_answers_the_capital_of_france():
    path = default_model_path()
    model = load_model(path, progress=False)  # defaults: CUDA, bf16
    assert model.device.type == "cuda" and model.dtype == torch.bfloat16
    tok = Tokenizer.from_gguf(path)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], tokenize=True)
    out = generate(model, ids, max_tokens=24, eos_token_ids=tok.eos_token_ids)
    assert "Paris" in tok.decode(out.token_ids)
