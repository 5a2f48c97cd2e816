"""The replay's figures: per-arm aggregates, paired-bootstrap ratios, the table and the plot.

Every money figure is micros per 1,000 requests. *Expected* figures use the simulator's true
probabilities of the slots actually served (no click noise); *realised* ones count the drawn
clicks and conversions (what the worker charged, what advertisers got). Ratios against
`full-ranker` come with a paired bootstrap over requests: the same resampled requests for both
arms, which the common random numbers make meaningful.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from services.replay.engine import FUNNEL_STAGES, ArmLog

BOOTSTRAP_ROUNDS = 2000
BASELINE = "full-ranker"


def _per_1k(total: float, n: int) -> float:
    return round(1000.0 * total / max(n, 1), 3)


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 4) if b else None


def arm_figures(log: ArmLog) -> dict[str, Any]:
    """The contract's per-arm fields (and a few more) from one arm's per-request columns."""
    c, n = log.columns, log.n
    imps, clicks, conv = (float(c[k].sum()) for k in ("impressions", "clicks", "conversions"))
    revenue, value = float(c["revenue"].sum()), float(c["advertiser_value"].sum())
    expected, allocated = float(c["expected_revenue"].sum()), float(c["allocated_value"].sum())
    return {
        "requests": n,
        "expected_revenue_per_1k": _per_1k(expected, n),
        "revenue_per_1k": _per_1k(revenue, n),
        "ctr": round(clicks / imps, 5) if imps else 0.0,
        "cvr": round(conv / clicks, 5) if clicks else 0.0,
        "advertiser_value_per_1k": _per_1k(value, n),
        "spend_per_1k": _per_1k(revenue, n),
        "value_per_spend": _ratio(value, revenue),
        # the winners' true eCPM is value per 1,000 impressions: summed per request and
        # averaged, it is the expected advertiser value per 1,000 requests
        "allocated_value_per_1k": round(allocated / max(n, 1), 3),
        "expected_value_per_spend": _ratio(allocated / 1000.0, expected),
        "budget_delivery": round(log.spend_micros / log.budget_micros, 6)
        if log.budget_micros else 0.0,
        "campaigns_served": len(log.served_campaigns),
        "campaigns_at_budget": log.campaigns_at_budget,
        "impressions": int(imps), "clicks": int(clicks), "conversions": int(conv),
        "fill_rate": round(imps / float(c["slots"].sum()), 4) if c["slots"].sum() else 0.0,
        "degraded_share": round(float(c["degraded"].mean()), 4) if n else 0.0,
        "funnel": _mean_shares(log.funnel),
        "funnel_vs_oracle": _mean_shares(log.vs_oracle),
        "funnel_requests": len(log.funnel.get("retrieval", [])),
    }


def _mean_shares(shares: dict[str, list[float]]) -> dict[str, float | None]:
    return {stage: round(float(np.mean(shares[stage])), 4) if shares.get(stage) else None
            for stage in FUNNEL_STAGES}


def paired_ratio(arm: np.ndarray, base: np.ndarray, seed: int,
                 rounds: int = BOOTSTRAP_ROUNDS) -> dict[str, Any]:
    """sum(arm) / sum(base) with a paired bootstrap over requests: the 95% interval and the
    one-sided 95% lower bound (the issue's goals are stated as that bound)."""
    n = arm.size
    if n == 0 or base.sum() <= 0:
        return {"ratio": None, "ci95": None, "lower_95": None}
    rng = np.random.default_rng([seed, 5])
    weights = rng.multinomial(n, np.full(n, 1.0 / n), size=rounds).astype(np.float64)
    base_sums = weights @ base
    ratios = (weights @ arm) / np.where(base_sums > 0, base_sums, np.nan)
    ratios = ratios[np.isfinite(ratios)]
    lo, hi = np.percentile(ratios, [2.5, 97.5])
    return {"ratio": round(float(arm.sum() / base.sum()), 4),
            "ci95": [round(float(lo), 4), round(float(hi), 4)],
            "lower_95": round(float(np.percentile(ratios, 5.0)), 4)}


def comparisons(logs: dict[str, ArmLog], seed: int) -> dict[str, dict[str, Any]]:
    """Per arm: ratios against `full-ranker` (bootstrapped) and the oracle (the ceiling),
    paired over the requests both replayed (a common prefix)."""
    out: dict[str, dict[str, Any]] = {}
    for name, log in logs.items():
        entry: dict[str, Any] = {}
        if BASELINE in logs:
            base = logs[BASELINE]
            m = min(log.n, base.n)
            entry["vs_full_ranker"] = {
                key: paired_ratio(log.columns[key][:m], base.columns[key][:m], seed)
                for key in ("expected_revenue", "allocated_value", "advertiser_value")}
            entry["vs_full_ranker"]["paired_requests"] = m
        if "oracle" in logs:
            oracle = logs["oracle"]
            m = min(log.n, oracle.n)
            entry["vs_oracle"] = {key: _ratio(float(log.columns[key][:m].sum()),
                                              float(oracle.columns[key][:m].sum()))
                                  for key in ("expected_revenue", "allocated_value")}
        out[name] = entry
    return out


def goals(arms: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The issue's replay goals, read off the figures (None where an arm was not run)."""
    cascade = arms.get("cascade", {})
    lower = cascade.get("vs_full_ranker", {}).get("expected_revenue", {}).get("lower_95")
    beats = {}
    for other in ("qscore-only", "dqm-only"):
        if cascade and other in arms:
            beats[other] = bool(
                cascade["expected_revenue_per_1k"] > arms[other]["expected_revenue_per_1k"]
                and cascade["allocated_value_per_1k"] > arms[other]["allocated_value_per_1k"])
    return {"cascade_vs_full_ranker_lower_95": lower,
            "cascade_at_least_97pct_of_full_ranker": None if lower is None else lower >= 0.97,
            "cascade_beats": beats}


def table(arms: dict[str, dict[str, Any]]) -> str:
    """The printed table (also what the README quotes)."""
    head = ("arm", "requests", "E[rev]/1k", "rev/1k", "CTR", "CVR", "value/1k", "alloc/1k",
            "vs full-ranker [95% CI]", "reach ranker vs oracle")
    rows = []
    for name, a in arms.items():
        vs = a.get("vs_full_ranker", {}).get("expected_revenue", {})
        ci = vs.get("ci95")
        ratio = f"{vs['ratio']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "-"
        reach = a["funnel_vs_oracle"].get("prerank")
        rows.append((name, str(a["requests"]), f"{a['expected_revenue_per_1k']:,.0f}",
                     f"{a['revenue_per_1k']:,.0f}",
                     f"{a['ctr']:.4f}", f"{a['cvr']:.4f}", f"{a['advertiser_value_per_1k']:,.0f}",
                     f"{a['allocated_value_per_1k']:,.0f}", ratio,
                     "-" if reach is None else f"{reach:.3f}"))
    widths = [max(len(str(r[i])) for r in (head, *rows)) for i in range(len(head))]
    lines = [" | ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True))
             for r in (head, *rows)]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def plot(arms: dict[str, dict[str, Any]], path: Path) -> None:
    """Expected and realised revenue per arm; the share of the oracle's top N per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(arms)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = np.arange(len(names))
    left.bar(x - 0.2, [arms[a]["expected_revenue_per_1k"] / 1e6 for a in names], 0.4,
             label="expected (truth)")
    left.bar(x + 0.2, [arms[a]["revenue_per_1k"] / 1e6 for a in names], 0.4, label="realised")
    left.set_xticks(x, names, rotation=20)
    left.set_ylabel("revenue per 1,000 requests (currency units)")
    left.legend()
    for name in names:
        shares = arms[name]["funnel_vs_oracle"]
        stages = [s for s in FUNNEL_STAGES if shares.get(s) is not None]
        right.plot(stages, [shares[s] for s in stages], marker="o", label=name)
    right.set_ylim(0, 1.05)
    right.set_ylabel("share of the oracle's top N kept")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
