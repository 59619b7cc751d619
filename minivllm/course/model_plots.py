"""Pictures for notebook 06 (the Qwen3 model). Each returns a ``Figure`` already closed in pyplot.

* :func:`decoder_block` -- the model from token ids to logits, one decoder layer drawn out, each step
  coloured by what computes it (which kernel phase, cuBLAS matmul, attention), with the config's sizes.
* :func:`parameter_counts` -- where the parameters are, per component, for one or more models.
* :func:`qk_permutation` -- the row order of one Q head in a Hugging Face checkpoint and in a GGUF file.
* :func:`generation_speed` -- decode speed and time to first token from ``bench/results/06_generate_cpu.json``.
"""

from collections.abc import Mapping

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle

from minivllm.model.config import ModelConfig

KINDS = {  # what computes a step -> (colour, legend label)
    "io": ("#4C72B0", "tensors in / out"),
    "matmul": ("#8C8C8C", "matmul: F.linear (cuBLAS)"),
    "norm": ("#55A868", "RMSNorm · 03 · kernels.rmsnorm"),
    "rope": ("#DD8452", "RoPE · 04 · kernels.rope"),
    "act": ("#C44E52", "SiLU·mul · 05 · kernels.activation"),
    "attn": ("#8172B3", "attention · SDPA now, 07–08 kernels later"),
    "add": ("#FFFFFF", "residual add (fused into the next RMSNorm)"),
}


def _figure(width: float, height: float) -> Figure:
    fig = plt.figure(figsize=(width, height))
    plt.close(fig)  # shown once, as the value a notebook cell returns
    return fig


def _steps(c: ModelConfig) -> list[tuple[str, str, str]]:
    """(label, sizes, kind) from input ids to logits; the layer's steps are those between the markers."""
    qkv = f"{c.hidden_size} → {c.q_size} + 2×{c.kv_size}"
    steps = [
        ("input_ids, positions", "(tokens,)", "io"),
        ("embed_tokens", f"{c.vocab_size} × {c.hidden_size}", "matmul"),
        ("input_layernorm", f"RMSNorm over {c.hidden_size}", "norm"),
        ("qkv_proj", qkv, "matmul"),
    ]
    if c.qk_norm:
        steps.append(("q_norm, k_norm", f"RMSNorm over head_dim = {c.head_dim}", "norm"))
    steps += [
        ("RoPE on q, k", f"θ = {c.rope_theta:g}, half-split pairs", "rope"),
        ("attention (GQA)", f"{c.num_attention_heads} q heads share {c.num_key_value_heads} kv heads", "attn"),
        ("o_proj", f"{c.q_size} → {c.hidden_size}", "matmul"),
        ("+ residual", "", "add"),
        ("post_attention_layernorm", f"RMSNorm over {c.hidden_size}", "norm"),
        ("gate_up_proj", f"{c.hidden_size} → 2×{c.intermediate_size}", "matmul"),
        ("SiLU(gate) · up", f"2×{c.intermediate_size} → {c.intermediate_size}", "act"),
        ("down_proj", f"{c.intermediate_size} → {c.hidden_size}", "matmul"),
        ("+ residual", "", "add"),
        ("norm", f"RMSNorm over {c.hidden_size}", "norm"),
        ("lm_head" + (" = embed_tokens (tied)" if c.tie_word_embeddings else ""),
         f"{c.hidden_size} → {c.vocab_size}", "matmul"),
        ("logits", f"(tokens, {c.vocab_size})", "io"),
    ]
    return steps


def decoder_block(config: ModelConfig, title: str | None = None) -> Figure:
    """The model as a column of steps; the decoder layer (repeated ``num_hidden_layers`` times) framed.

    Residual connections are drawn as arrows around the attention and MLP halves. Boxes carry the
    sizes of ``config`` (e.g. ``qkv_proj 576 → 576 + 2×192`` for SmolLM2-135M).
    """
    steps = _steps(config)
    fig = _figure(9.5, 0.52 * len(steps) + 1.2)
    ax = fig.add_axes((0, 0, 1, 0.94 if title else 1))
    n = len(steps)
    ax.set(xlim=(-4.6, 6.2), ylim=(-0.8, n - 0.2))
    ax.axis("off")
    ys = {}
    for i, (label, sizes, kind) in enumerate(steps):
        y = n - 1 - i
        ys.setdefault(label, []).append(y)
        color = KINDS[kind][0]
        add = kind == "add"
        w = 0.9 if add else 3.2
        ax.add_patch(FancyBboxPatch((-w / 2, y - 0.19), w, 0.38, boxstyle="round,pad=0.02,rounding_size=0.1",
                                    facecolor=color, edgecolor="#333333" if add else color, gid=f"step:{kind}"))
        ax.text(0, y, "+" if add else label, ha="center", va="center", fontsize=10 if add else 9,
                color="#333333" if add else "white", fontweight="bold")
        if sizes:
            ax.text(1.75, y, sizes, ha="left", va="center", fontsize=8, color="#333333", family="monospace")
        if i:
            ax.add_patch(FancyArrowPatch((0, y + 0.81), (0, y + 0.2), arrowstyle="-|>", mutation_scale=10,
                                         color="#333333", lw=1))
    first, last = ys["input_layernorm"][0], ys["+ residual"][1]  # the layer: from its first norm to 2nd add
    ax.add_patch(Rectangle((-2.6, last - 0.35), 8.6, first - last + 0.95, facecolor="none", edgecolor="#8172B3",
                           linestyle="--", lw=1.2, gid="layer"))
    ax.text(5.85, first + 0.6, f"decoder layer  × {config.num_hidden_layers}", fontsize=9, color="#8172B3",
            fontweight="bold", ha="right", va="top")
    # the residual stream: branches off before each norm, rejoins at the next "+"
    for norm, end in zip(("input_layernorm", "post_attention_layernorm"), ys["+ residual"]):
        start = ys[norm][0] + 0.5
        ax.plot([0, -2.0, -2.0], [start, start, end], color="#55A868", lw=1.4, gid="residual")
        ax.plot([0], [start], "o", color="#55A868", ms=4)
        ax.add_patch(FancyArrowPatch((-2.0, end), (-0.47, end), arrowstyle="-|>", mutation_scale=10,
                                     color="#55A868", lw=1.4))
    ax.text(-2.15, (ys["input_layernorm"][0] + ys["+ residual"][0]) / 2, "residual\nstream", fontsize=8,
            color="#55A868", va="center", ha="right")
    used = {kind for _, _, kind in steps}
    handles = [Rectangle((0, 0), 1, 1, facecolor=KINDS[k][0], edgecolor="#333333") for k in KINDS if k in used]
    ax.legend(handles, [KINDS[k][1] for k in KINDS if k in used], loc="lower right", fontsize=7.5, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11, fontweight="bold")
    return fig


def parameter_counts(models: Mapping[str, Mapping[str, int]]) -> Figure:
    """One horizontal bar chart per model: millions of parameters per component, with shares of the total.

    ``models`` maps a model's name to ``Qwen3ForCausalLM.parameter_counts()``.
    """
    if not models:
        raise ValueError("give at least one model's counts")
    fig = _figure(6.2 * len(models), 0.45 * max(len(c) for c in models.values()) + 1.6)
    axes = fig.subplots(1, len(models), squeeze=False)[0]
    for ax, (name, counts) in zip(axes, models.items()):
        total = sum(counts.values())
        labels = list(counts)[::-1]  # first component on top
        millions = [counts[k] / 1e6 for k in labels]
        bars = ax.barh(labels, millions, color=["#4C72B0" if "embed" in k or "lm_head" in k else "#8172B3"
                                                for k in labels])
        ax.bar_label(bars, labels=[f"{_amount(counts[k])} ({counts[k] / total:.1%})" for k in labels],
                     fontsize=8, padding=2)
        ax.set_xlim(0, max(millions) * 1.45)
        ax.set_xlabel("parameters (millions)")
        ax.set_title(f"{name}: {total / 1e6:,.1f} M parameters", fontsize=10)
        ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return fig


def _amount(n: int) -> str:
    return f"{n / 1e6:,.1f} M" if n >= 100_000 else f"{n / 1e3:,.1f} k"


def qk_permutation(head_dim: int = 8) -> Figure:
    """The rows of one Q head: Hugging Face's half-split order, and the interleaved order GGUF stores.

    RoPE rotates the pair (x_i, y_i) = (row i, row i + d/2). llama.cpp's converter moves every pair next
    to each other, so that llama.cpp can rotate adjacent rows; a loader must move them back.
    """
    if head_dim < 2 or head_dim % 2:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    half = head_dim // 2
    hf = [f"x{i}" for i in range(half)] + [f"y{i}" for i in range(half)]
    gguf = [name for i in range(half) for name in (f"x{i}", f"y{i}")]
    fig = _figure(0.75 * head_dim + 2.8, 2.6)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set(xlim=(-2.6, head_dim + 0.2), ylim=(-0.4, 2.6))
    ax.axis("off")
    for row, (title, names) in enumerate((("GGUF file", gguf), ("Hugging Face", hf))):
        y = row * 1.7
        ax.text(-0.2, y + 0.3, title, ha="right", va="center", fontsize=9, fontweight="bold")
        for j, name in enumerate(names):
            color = "#4C72B0" if name[0] == "x" else "#DD8452"
            ax.add_patch(Rectangle((j + 0.05, y), 0.9, 0.6, facecolor=color, gid="row"))
            ax.text(j + 0.5, y + 0.3, name, ha="center", va="center", color="white", fontsize=9)
    for j, name in enumerate(hf):
        k = gguf.index(name)
        ax.add_patch(FancyArrowPatch((j + 0.5, 1.7), (k + 0.5, 0.62), arrowstyle="-|>", mutation_scale=9,
                                     color="gray", lw=0.8, gid="move"))
    ax.text(-2.5, 1.15, "rotated pairs:\n(x_i, y_i)", fontsize=8, color="gray", va="center")
    return fig


def generation_speed(result: dict) -> Figure:
    """Decode speed and time to the first token of each generator in a ``bench.generate_cpu`` result.

    ``result``: ``{"meta": {...}, "generate": {name: {"decode_tokens_per_s", "prefill_s"}}, ...}``.
    """
    runs = result["generate"]
    names = list(runs)
    fig = _figure(10, 3.0)
    left, right = fig.subplots(1, 2)
    colors = ["#8172B3" if n == "minivllm" else "#8C8C8C" for n in names]
    for ax, key, label, fmt in ((left, "decode_tokens_per_s", "decode: tokens / s (higher is better)", "{:.1f}"),
                                (right, "prefill_s", "prefill: ms to the first token (lower is better)", "{:.0f}")):
        values = [runs[n][key] * (1e3 if key == "prefill_s" else 1) for n in names]
        bars = ax.barh(names[::-1], values[::-1], color=colors[::-1])
        ax.bar_label(bars, labels=[fmt.format(v) for v in values[::-1]], fontsize=9, padding=2)
        ax.set_xlim(0, max(values) * 1.3)
        ax.set_xlabel(label)
        ax.spines[["top", "right"]].set_visible(False)
    meta = result.get("meta", {})
    fig.suptitle(f"{result.get('model', '')}: {result.get('prompt_tokens')}-token prompt, "
                 f"{result.get('max_tokens')} tokens, batch 1, fp32  ·  CPU ({meta.get('host', '?')}, "
                 f"{result.get('threads')} threads), {str(meta.get('date', ''))[:10]}", fontsize=9)
    fig.tight_layout()
    return fig
