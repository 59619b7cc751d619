"""Phase 02's pictures: BPE merging a word step by step, a vocabulary's token lengths, text cut into tokens.

Each function returns a matplotlib ``Figure`` and shows nothing. Tokens are drawn from their bytes with
:func:`label`: a space is ``␣``, a newline ``↵``, and bytes that are not (yet) whole UTF-8 characters
are written in hex, as they really are.
"""

from collections.abc import Iterable, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from minivllm.utils import cdiv

_COLORS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C")


def label(token: bytes) -> str:
    """A token's bytes as readable text: ``b" the"`` -> ``"␣the"``, ``b" \\xf0\\x9f"`` -> ``"␣\\xf0\\x9f"``."""
    text = token.decode("utf-8", errors="backslashreplace")
    return text.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥")


def merge_steps(steps: Sequence[Sequence[bytes]], ranks: Mapping[bytes, int] | None = None) -> Figure:
    """One row per BPE step, from single bytes (top) to the final tokens (bottom).

    Boxes are as wide as their bytes; the token created at each step is highlighted, with its rank
    (when ``ranks`` is given): the lowest-ranked adjacent pair is always the one merged.
    """
    width = sum(len(p) for p in steps[0])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * width + 2.5), 0.45 * len(steps) + 0.9))
    for row, parts in enumerate(steps):
        y = len(steps) - 1 - row
        new = _merged_index(steps[row - 1], parts) if row else None
        x = 0
        for i, part in enumerate(parts):
            color = "#C44E52" if i == new else "#4C72B0"
            ax.add_patch(Rectangle((x + 0.04, y + 0.08), len(part) - 0.08, 0.84, facecolor=color, alpha=0.85))
            ax.text(x + len(part) / 2, y + 0.5, label(part), ha="center", va="center", color="white", fontsize=8)
            x += len(part)
        note = "bytes" if row == 0 else f"merge → {label(parts[new])!r}"
        if row and ranks is not None:
            note += f"  (rank {ranks[parts[new]]})"
        ax.text(width + 0.3, y + 0.5, f"{row:>2}: {note}", va="center", fontsize=8, family="monospace")
    ax.set_xlim(0, width + 7)
    ax.set_ylim(0, len(steps))
    ax.axis("off")
    ax.set_title(f"BPE on {label(b''.join(steps[0]))!r}: {len(steps[0])} bytes → {len(steps[-1])} tokens "
                 f"in {len(steps) - 1} merges", fontsize=10)
    fig.tight_layout()
    return fig


def _merged_index(before: Sequence[bytes], after: Sequence[bytes]) -> int:
    """Where two neighbours of ``before`` became one token of ``after``."""
    return next(i for i, (a, b) in enumerate(zip(before, after)) if a != b) if len(after) < len(before) else -1


def token_length_histogram(vocabularies: Mapping[str, Iterable[bytes]], max_len: int = 16) -> Figure:
    """How many bytes each vocabulary's tokens hold: bars of the share of tokens per length, side by side;
    lengths above ``max_len`` are counted in the last bar."""
    fig, ax = plt.subplots(figsize=(9, 4))
    n = len(vocabularies)
    lengths = np.arange(1, max_len + 1)
    for k, (name, tokens) in enumerate(vocabularies.items()):
        full = np.array([len(t) for t in tokens])
        sizes = np.minimum(full, max_len)
        counts = np.bincount(sizes, minlength=max_len + 1)[1:]
        share = counts / counts.sum()
        ax.bar(lengths + (k - (n - 1) / 2) * 0.8 / n, share, width=0.8 / n, color=_COLORS[k % len(_COLORS)],
               label=f"{name}: {len(sizes):,} tokens, mean {np.mean(full):.1f} B")
    ax.set_xticks(lengths, [str(i) for i in lengths[:-1]] + [f"≥{max_len}"])
    ax.set_xlabel("token length (bytes)")
    ax.set_ylabel("share of the vocabulary")
    ax.set_title("How long are the tokens of a BPE vocabulary?", fontsize=10)
    ax.legend()
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def token_strip(tokens: Sequence[bytes], ids: Sequence[int], special_ids: Iterable[int] = (),
                per_row: int = 12) -> Figure:
    """Text cut into its tokens: one coloured box per token with its id underneath, ``per_row`` a row.
    Special tokens are drawn dark with white text."""
    special = set(special_ids)
    rows = max(1, cdiv(len(tokens), per_row))
    fig, ax = plt.subplots(figsize=(1.15 * min(per_row, max(len(tokens), 1)) + 0.4, 1.05 * rows + 0.3))
    for k, (tok, i) in enumerate(zip(tokens, ids)):
        x, y = k % per_row * 1.1, (rows - 1 - k // per_row) * 1.0
        face = "#222222" if i in special else _COLORS[k % 6]
        ax.add_patch(Rectangle((x, y + 0.35), 1.0, 0.55, facecolor=face, alpha=0.9 if i in special else 0.3))
        ax.text(x + 0.5, y + 0.62, label(tok), ha="center", va="center", fontsize=8,
                color="white" if i in special else "black")
        ax.text(x + 0.5, y + 0.18, str(i), ha="center", va="center", fontsize=7, color="gray")
    ax.set_xlim(-0.1, per_row * 1.1)
    ax.set_ylim(0, rows)
    ax.axis("off")
    ax.set_title(f"{len(tokens)} tokens", fontsize=10)
    fig.tight_layout()
    return fig
