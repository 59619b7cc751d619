"""Phase 13's pictures: the server under load, from a ``bench.serve`` result (``bench/results/13_serve_*.json``).

:func:`serve_scaling` draws three panels against the number of concurrent streaming clients: output
tokens/s (continuous batching turns more clients into more throughput), time to first token and
inter-token latency (p50 solid, p99 dashed: what each client pays for sharing the engine).
:func:`summary_rows` gives the same numbers as table rows. Left out: per-request timelines.
"""

from collections.abc import Sequence

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

THROUGHPUT, TTFT, ITL = "#4C72B0", "#DD8452", "#55A868"


def _levels(result: dict) -> list[dict]:
    levels = sorted(result["levels"], key=lambda r: r["concurrency"])
    if not levels:
        raise ValueError("the result has no concurrency levels")
    return levels


def _title(result: dict) -> str:
    return f"{result.get('config', '?')} on {result.get('device', '?')}, {result.get('max_tokens', '?')} tokens/request"


def serve_scaling(result: dict | Sequence[dict], labels: Sequence[str] | None = None) -> Figure:
    """Throughput, TTFT and ITL against concurrency, for one result or several (one line style each)."""
    results = [result] if isinstance(result, dict) else list(result)
    labels = list(labels) if labels is not None else [_title(r) for r in results]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(13, 3.8))
    markers = "os^D"
    for i, (res, label) in enumerate(zip(results, labels)):
        levels = _levels(res)
        x = [r["concurrency"] for r in levels]
        m = markers[i % len(markers)]
        a.plot(x, [r["output_tokens_per_s"] for r in levels], marker=m, color=THROUGHPUT, label=label)
        for ax, key, colour in ((b, "ttft_ms", TTFT), (c, "itl_ms", ITL)):
            ax.plot(x, [r[key]["p50"] for r in levels], marker=m, color=colour, label=f"{label}: p50")
            ax.plot(x, [r[key]["p99"] for r in levels], marker=m, color=colour, linestyle="--",
                    label=f"{label}: p99")
    for ax, title, unit in ((a, "throughput", "output tokens/s"), (b, "time to first token", "ms"),
                            (c, "inter-token latency", "ms")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streaming clients")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    a.set_ylim(bottom=0)
    b.legend(fontsize=7)
    c.legend(fontsize=7)
    fig.suptitle("the server under load" + (f": {labels[0]}" if len(results) == 1 else ""))
    fig.tight_layout()
    plt.close(fig)
    return fig


def summary_rows(result: dict) -> list[tuple[int, float, float, float, float, float]]:
    """(clients, output tokens/s, TTFT p50 ms, TTFT p99 ms, ITL p50 ms, ITL p99 ms) per level."""
    return [(r["concurrency"], r["output_tokens_per_s"], r["ttft_ms"]["p50"], r["ttft_ms"]["p99"],
             r["itl_ms"]["p50"], r["itl_ms"]["p99"]) for r in _levels(result)]
