"""Phase 10's pictures: what each sampling knob does to a next-token distribution, and stop strings.

:func:`filter_panels` draws a distribution before and after each knob (one panel per knob),
:func:`kept_tokens` how many tokens each filter keeps on several distributions, :func:`observed_vs_expected`
sampled frequencies against the exact distribution, :func:`token_boundaries` a stop string that spans
tokens. Each returns a matplotlib ``Figure`` already closed in pyplot, so it shows once: as a cell's last expression.
:func:`chi_square` is the goodness-of-fit test the notebook runs on sampled tokens (no scipy needed).
"""

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

BEFORE, AFTER, DROPPED, STOP = "#BBBBBB", "#4C72B0", "#C44E52", "#C44E52"


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, float]:
    """Pearson's chi-square statistic of ``counts`` against ``probs`` (tokens of probability 0 left out; a
    count there is an error) and its p-value, ``P(X >= statistic)``: the regularized upper incomplete gamma
    function ``Q(df / 2, statistic / 2)``, ``df`` = tokens of nonzero probability - 1."""
    counts, probs = counts.double(), probs.double()
    if bool((counts[probs == 0] > 0).any()):
        raise ValueError("a token of probability 0 was drawn")
    expected = probs / probs.sum() * counts.sum()
    on = expected > 0
    stat = float(((counts[on] - expected[on]) ** 2 / expected[on]).sum())
    df = int(on.sum()) - 1
    a, x = torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)
    return stat, float(torch.special.gammaincc(a, x))


def _label(text: str) -> str:
    return repr(text)[1:-1] if text.strip() else repr(text)  # show spaces and newlines


def filter_panels(probs: torch.Tensor, after: Mapping[str, torch.Tensor], labels: Sequence[str],
                  top: int = 30) -> Figure:
    """The ``top`` most likely tokens of ``probs`` (V,), in grey, and in each panel the distribution ``after``
    one knob (a name -> (V,) probabilities, zeros where a filter dropped the token) in blue. A dropped
    token's grey bar gets a red edge; the title says how many tokens are left and their mass before."""
    order = torch.argsort(probs, descending=True)[:top]
    fig, axes = plt.subplots(len(after), 1, figsize=(11, 1.9 * len(after) + 0.8), sharex=True, squeeze=False)
    x = range(len(order))
    for ax, (name, q) in zip(axes[:, 0], after.items()):
        dropped = q[order] == 0
        ax.bar(x, probs[order].tolist(), width=0.8, color=BEFORE, label="before",
               edgecolor=[DROPPED if d else BEFORE for d in dropped.tolist()], linewidth=1.2)
        ax.bar(x, q[order].tolist(), width=0.45, color=AFTER, label="after")
        kept = int((q > 0).sum())
        ax.set_title(f"{name}: {kept:,} of {len(q):,} tokens left, holding {float(probs[q > 0].sum()):.0%} "
                     "of the probability before", fontsize=9, loc="left")
        ax.set_ylabel("probability", fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0, 0].legend(loc="upper right", fontsize=8)
    axes[-1, 0].set_xticks(list(x), [_label(labels[int(i)]) for i in order], rotation=60, fontsize=8)
    fig.tight_layout()
    plt.close(fig)
    return fig


def kept_tokens(table: Mapping[str, Mapping[str, int]], vocab_size: int | None = None) -> Figure:
    """Grouped bars, log scale: ``table[distribution][filter]`` = tokens the filter keeps on that distribution."""
    dists = list(table)
    filters = list(next(iter(table.values())))
    width = 0.8 / len(dists)
    colors = ("#4C72B0", "#DD8452", "#55A868", "#8172B3")
    fig, ax = plt.subplots(figsize=(9, 3.8))
    for j, dist in enumerate(dists):
        xs = [i + (j - (len(dists) - 1) / 2) * width for i in range(len(filters))]
        bars = ax.bar(xs, [table[dist][f] for f in filters], width, label=dist, color=colors[j % len(colors)])
        ax.bar_label(bars, labels=[f"{table[dist][f]:,}" for f in filters], fontsize=8, padding=2)
    if vocab_size:
        ax.axhline(vocab_size, color="gray", ls="--", lw=1, label=f"vocabulary ({vocab_size:,})")
    ax.set_yscale("log")
    ax.set_xticks(range(len(filters)), filters)
    ax.set_ylabel("tokens left (log scale)")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_title("how many tokens each filter keeps: top-k is blind to the shape, top-p and min-p follow it",
                 fontsize=9)
    fig.tight_layout()
    plt.close(fig)
    return fig


def observed_vs_expected(counts: torch.Tensor, probs: torch.Tensor, labels: Sequence[str],
                         title: str = "") -> Figure:
    """Sampled frequencies (bars) against the exact probabilities (black ticks), most likely first."""
    order = torch.argsort(probs, descending=True)
    order = order[probs[order] > 0]
    n = float(counts.sum())
    fig, ax = plt.subplots(figsize=(11, 3.4))
    x = list(range(len(order)))
    ax.bar(x, (counts[order] / n).tolist(), color=AFTER, label=f"sampled ({int(n):,} draws)")
    ax.scatter(x, probs[order].tolist(), marker="_", s=180, color="black", label="exact", zorder=3)
    ax.set_xticks(x, [_label(labels[int(i)]) for i in order], rotation=60, fontsize=8)
    ax.set_ylabel("probability")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    plt.close(fig)
    return fig


def token_boundaries(pieces: Sequence[str], stop: str | None = None, title: str = "") -> Figure:
    """The text as its tokens produced it, one box per token, and where ``stop`` occurs in the joined text:
    a red bracket over the characters it spans, across however many tokens."""
    text = "".join(pieces)
    fig, ax = plt.subplots(figsize=(min(16, 1.0 + 0.16 * len(text) + 0.2 * len(pieces)), 1.9))
    x = 0.0
    starts = []
    for i, piece in enumerate(pieces):
        shown = _label(piece) or "∅"
        w = max(len(shown), 1) * 0.16 + 0.1
        starts.append((x, w, len(piece)))
        ax.add_patch(Rectangle((x, 0), w, 1, facecolor="#4C72B0" if i % 2 else "#6C8EBF", alpha=0.9))
        ax.text(x + w / 2, 0.5, shown, ha="center", va="center", color="white", fontsize=8, family="monospace")
        x += w + 0.05
    at = text.find(stop) if stop else -1
    if at >= 0:
        xs = []  # the x of each character boundary, spread evenly inside its token's box
        for x0, w, n in starts:
            xs += [x0 + w * k / max(n, 1) for k in range(n)]
        xs.append(starts[-1][0] + starts[-1][1])
        a, b = xs[at], xs[at + len(stop)] if at + len(stop) < len(xs) else xs[-1]
        ax.plot([a, a, b, b], [1.1, 1.25, 1.25, 1.1], color=STOP, lw=2)
        ax.text((a + b) / 2, 1.32, f"stop string {stop!r}", ha="center", va="bottom", color=STOP, fontsize=8)
    ax.set_xlim(-0.1, x + 0.1)
    ax.set_ylim(-0.1, 1.7)
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    plt.close(fig)
    return fig
