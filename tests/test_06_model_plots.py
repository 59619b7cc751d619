"""Phase 06's pictures (minivllm.course.model_plots): each draws what its data says."""

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from minivllm.course import model_plots  # noqa: E402
from minivllm.model import ModelConfig, Qwen3ForCausalLM  # noqa: E402
from minivllm.model.gguf_loader import unpermute_qk  # noqa: E402

SMOLLM2 = ModelConfig("llama", 49152, 576, 1536, 30, 9, 3, 64, 1e-5, 1e5, 8192, True, False)
QWEN3 = ModelConfig("qwen3", 151936, 1024, 3072, 28, 16, 8, 128, 1e-6, 1e6, 40960, True, True)


def _steps(fig, kind: str) -> int:
    return sum(1 for p in fig.axes[0].patches if p.get_gid() == f"step:{kind}")


def _texts(fig) -> list[str]:
    return [t.get_text() for ax in fig.axes for t in ax.texts]


@pytest.mark.parametrize("config, norms", [(SMOLLM2, 3), (QWEN3, 4)])
def test_decoder_block_draws_qk_norm_only_for_qwen3_and_the_config_sizes(config, norms):
    fig = model_plots.decoder_block(config, title="t")
    assert _steps(fig, "norm") == norms  # input, post-attention, final (+ QK-norm for Qwen3)
    assert _steps(fig, "matmul") == 6 and _steps(fig, "rope") == 1 and _steps(fig, "act") == 1
    assert _steps(fig, "add") == 2
    texts = _texts(fig)
    assert ("q_norm, k_norm" in texts) == config.qk_norm
    assert f"{config.hidden_size} → {config.q_size} + 2×{config.kv_size}" in texts
    assert f"decoder layer  × {config.num_hidden_layers}" in texts
    assert f"{config.num_attention_heads} q heads share {config.num_key_value_heads} kv heads" in texts
    assert sum(1 for ln in fig.axes[0].get_lines() if ln.get_gid() == "residual") == 2
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "RMSNorm · 03 · kernels.rmsnorm" in legend and "RoPE · 04 · kernels.rope" in legend


def test_parameter_counts_draws_one_bar_per_component_in_millions():
    counts = {name: Qwen3ForCausalLM(c, device="meta").parameter_counts() for name, c in
              (("SmolLM2-135M", SMOLLM2), ("Qwen3-0.6B", QWEN3))}
    fig = model_plots.parameter_counts(counts)
    assert len(fig.axes) == 2
    for ax, (name, c) in zip(fig.axes, counts.items()):
        widths = [p.get_width() for p in ax.patches]
        assert widths == pytest.approx([n / 1e6 for n in list(c.values())[::-1]])
        assert [t.get_text() for t in ax.get_yticklabels()] == list(c)[::-1]
        assert ax.get_title() == f"{name}: {sum(c.values()) / 1e6:,.1f} M parameters"
    assert "28.3 M (21.0%)" in _texts(fig)  # SmolLM2's embedding: 49152 x 576
    with pytest.raises(ValueError):
        model_plots.parameter_counts({})


def test_qk_permutation_arrows_follow_the_loader():
    d = 8
    fig = model_plots.qk_permutation(d)
    ax = fig.axes[0]
    rows = [p for p in ax.patches if p.get_gid() == "row"]
    assert len(rows) == 2 * d
    labels = [t.get_text() for t in ax.texts if t.get_text()[:1] in "xy" and len(t.get_text()) == 2]
    gguf_order, hf_order = labels[:d], labels[d:]
    assert hf_order == [f"x{i}" for i in range(4)] + [f"y{i}" for i in range(4)]
    # the loader turns the GGUF order back into the Hugging Face order
    index = torch.tensor([float(hf_order.index(n)) for n in gguf_order])[:, None]  # (d, 1): rows of one head
    assert unpermute_qk(index, 1)[:, 0].tolist() == list(range(d))
    arrows = [p for p in ax.patches if p.get_gid() == "move"]
    assert len(arrows) == d
    ends = [(round(a._posA_posB[0][0] - 0.5), round(a._posA_posB[1][0] - 0.5)) for a in arrows]
    assert all(hf_order[j] == gguf_order[k] for j, k in ends)
    with pytest.raises(ValueError):
        model_plots.qk_permutation(7)
    assert np.isfinite(fig.get_size_inches()).all()


def test_generation_speed_draws_both_generators_from_a_result():
    result = {"meta": {"host": "x86_64, CPython 3.11", "date": "2026-11-28T20:00:00+00:00"}, "model": "m.gguf",
              "prompt_tokens": 46, "max_tokens": 128, "threads": 2,
              "generate": {"minivllm": {"decode_tokens_per_s": 20.5, "prefill_s": 0.1},
                           "transformers": {"decode_tokens_per_s": 12.0, "prefill_s": 0.25}}}
    fig = model_plots.generation_speed(result)
    decode, prefill = fig.axes
    assert [p.get_width() for p in decode.patches] == [12.0, 20.5]  # transformers drawn below minivllm
    assert [p.get_width() for p in prefill.patches] == pytest.approx([250.0, 100.0])
    assert [t.get_text() for t in decode.get_yticklabels()] == ["transformers", "minivllm"]
    assert "tokens / s" in decode.get_xlabel() and "ms" in prefill.get_xlabel()
    title = fig._suptitle.get_text()
    assert "46-token prompt" in title and "2026-11-28" in title and "2 threads" in title
