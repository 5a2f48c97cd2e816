"""Latency against offered load, from a step run: where the stack's p99 crosses the budget."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: CI and servers have no display
import matplotlib.pyplot as plt  # noqa: E402


def plot_latency_vs_load(steps: list[dict], budget_ms: float, out: str | Path,
                         title: str = "Cascade gateway: latency vs offered load") -> Path:
    """PNG with p50/p95/p99 per offered rate, the p99 budget, and the achieved rate."""
    if not steps:
        raise ValueError("no load steps to plot")
    offered = [s["offered_rps"] for s in steps]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for key, style in (("p50_ms", "o-"), ("p95_ms", "s-"), ("p99_ms", "^-")):
        ax.plot(offered, [s.get(key) for s in steps], style, label=key.replace("_ms", ""))
    ax.axhline(budget_ms, color="red", linestyle="--", label=f"p99 budget {budget_ms:g} ms")
    ax.set_xlabel("offered load (requests/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    rate = ax.twinx()
    rate.plot(offered, [s.get("achieved_rps") for s in steps], "k:", label="achieved rps")
    rate.set_ylabel("achieved (requests/s)")
    lines = ax.get_legend_handles_labels()
    more = rate.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="upper left")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
