"""Phase 13's pictures: the server under load, from a ``bench.serve`` result (``bench/results/13_serve_*.json``).

:func:`serve_scaling` draws three panels against the number of concurrent streaming clients: output
tokens/s (continuous batching turns more clients into more throughput), time to first token and
inter-token latency (p50 solid, p99 dashed: what each client pays for sharing the engine), with one legend
for the figure. :func:`summary_rows` gives the same numbers as table rows. Left out: per-request timelines.
"""

from collections.abc import Sequence

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from minivllm.course.engine_plots import model_note

THROUGHPUT, TTFT, ITL = "#4C72B0", "#DD8452", "#55A868"


def _levels(result: dict) -> list[dict]:
    levels = sorted(result["levels"], key=lambda r: r["concurrency"])
    if not levels:
        raise ValueError("the result has no concurrency levels")
    return levels


def _title(result: dict) -> str:
    return f"{result.get('device', '?')}, {model_note(result)}, {result.get('max_tokens', '?')} tokens/request"


def serve_scaling(result: dict | Sequence[dict], labels: Sequence[str] | None = None) -> Figure:
    """Throughput, TTFT and ITL against concurrency, for one result or several (one line style each)."""
    results = [result] if isinstance(result, dict) else list(result)
    labels = list(labels) if labels is not None else [_title(r) for r in results]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(13, 4.4))
    markers = "os^D"
    for i, res in enumerate(results):
        levels = _levels(res)
        x = [r["concurrency"] for r in levels]
        m = markers[i % len(markers)]
        a.plot(x, [r["output_tokens_per_s"] for r in levels], marker=m, color=THROUGHPUT)
        for ax, key, colour in ((b, "ttft_ms", TTFT), (c, "itl_ms", ITL)):
            ax.plot(x, [r[key]["p50"] for r in levels], marker=m, color=colour)
            ax.plot(x, [r[key]["p99"] for r in levels], marker=m, color=colour, linestyle="--")
    clients = sorted({r["concurrency"] for res in results for r in res["levels"]})
    for ax, title, unit in ((a, "throughput", "output tokens/s"), (b, "time to first token", "ms"),
                            (c, "inter-token latency", "ms")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(clients, [str(n) for n in clients])
        ax.minorticks_off()
        ax.set_xlabel("concurrent streaming clients")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    a.set_ylim(bottom=0)
    # one legend for the figure: the line styles (latency panels), and the marker of each result when several
    handles = [Line2D([], [], color="gray", label="p50 (median)"),
               Line2D([], [], color="gray", linestyle="--", label="p99")]
    if len(results) > 1:
        handles += [Line2D([], [], color="gray", marker=markers[i % len(markers)], linestyle="", label=label)
                    for i, label in enumerate(labels)]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle("the server under load" + (f": {labels[0]}" if len(results) == 1 else ""))
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    plt.close(fig)
    return fig


def summary_rows(result: dict) -> list[tuple[int, float, float, float, float, float]]:
    """(clients, output tokens/s, TTFT p50 ms, TTFT p99 ms, ITL p50 ms, ITL p99 ms) per level."""
    return [(r["concurrency"], r["output_tokens_per_s"], r["ttft_ms"]["p50"], r["ttft_ms"]["p99"],
             r["itl_ms"]["p50"], r["itl_ms"]["p99"]) for r in _levels(result)]
