"""Choose the cascade's K1, K2, K3 from measured curves and record them in the bundle.

For validation requests (the bundle's validation period: never the test rows the funnel reports
on), the full ranker scores the whole eligible corpus once per request and its top N by eCPM
(one ad per campaign) is the ideal. Then, for every (K1, K2, K3) on a grid, the serving stages
run in this process exactly as the gateway runs them (recall with its channels, the gateway's
screening, DQM pre-ranking, DIN+ESMM ranking of the K3 survivors), and the script measures the
share of the ideal still present after each stage and the CPU time each stage spends
(`time.thread_time`, single-threaded, per request).

The recommendation is the grid point with the least serving CPU among those where at least
`--target` of the ideal reaches the ranker within `--cpu-budget-ms`; when none does, the one
with the highest share within the budget (and the report says the goal was missed). With
`--record` it is published as a new bundle version (models.bundle.publish_recommendation),
whose manifest carries `recommended_ks` and these curves.

    python -m scripts.choose_ks --data DIR --bundle BUNDLES --requests 100 --out ks.json --record
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from models.bundle import publish_recommendation
from models.data import layout
from models.train.split import ColumnSplit, split_from_dict
from services.common import wire
from services.gateway.funnel import Funnel, FunnelRequest, top_per_campaign
from services.gateway.screening import ScreenPolicy, screen

K1S = (1000, 2000, 3000)
K2S = (500, 1000, 2000, 3000)
K3S = (100, 200, 300, 500)
STAGES = ("retrieval", "screen", "prerank")
CHEAPEST_SLACK = 1.2


def validation_requests(data_dir: Path, funnel: Funnel, n: int, seed: int
                        ) -> list[FunnelRequest]:
    """N requests from the bundle's validation period, with profile and behaviour sequence."""
    split = split_from_dict(funnel.bundle.manifest["split"])
    if isinstance(split, ColumnSplit):
        raise ValueError("choose_ks needs a time-split bundle (validation by period)")
    requests = pq.read_table(data_dir / layout.REQUESTS_DIR).to_pydict()
    ts = np.asarray(requests["ts"])
    valid = np.flatnonzero((ts >= split.train_end_ts) & (ts < split.valid_end_ts))
    if valid.size == 0:
        raise ValueError(f"{data_dir}: no requests in the bundle's validation period")
    pick = np.sort(np.random.default_rng(seed).choice(valid, min(n, valid.size), replace=False))
    users = pq.read_table(data_dir / layout.USERS_FILE).to_pydict()
    row_of = {int(u): i for i, u in enumerate(users["user_id"])}
    profile = [c for c in users if c != "user_id"]
    out = []
    for i in pick.tolist():
        row = row_of.get(int(requests["user_id"][i]))
        hist = {name: wire.Column(ints=np.asarray(requests[name][i] or [], dtype=np.int64))
                for name in ("hist_ad_id", "hist_category_id") if name in requests}
        out.append(FunnelRequest(
            int(requests["request_id"][i]), str(requests["scene"][i]),
            {c: users[c][row] for c in profile} if row is not None else {}, hist,
            {"hour": int(requests["hour"][i]), "device": str(requests["device"][i]),
             "position": 0}))
    return out


def _timed(call: Callable[[], Any]) -> tuple[Any, float]:
    start = time.thread_time()
    value = call()
    return value, (time.thread_time() - start) * 1000.0


def measure_request(funnel: Funnel, req: FunnelRequest, top_n: int) -> list[dict[str, Any]]:
    """One row per grid point: kept share after each stage and CPU ms per stage."""
    ids, ecpm = funnel.rank_all(req, funnel.eligible(req.scene))
    ideal = ids[top_per_campaign(funnel.catalog, ids, ecpm, top_n)]
    part = dict(scene=req.scene, user=req.user, hist=req.hist, context=req.context)
    rows = []
    for k1 in K1S:
        recalled, recall_ms = _timed(lambda k=k1: funnel.retrieval.handle(
            wire.RecallRequest(**part, k=k)))
        channels = np.asarray(recalled.candidate_channels(), dtype=object)
        found = np.isin(recalled.ad_ids, ideal)
        by_channel = {str(c): int((channels[found] == c).sum()) / top_n
                      for c in set(channels.tolist())}
        for k2 in (k for k in K2S if k <= k1):
            screened, screen_ms = _timed(lambda k=k2, r=recalled: screen(
                r.ad_ids, scene=req.scene, caps={}, catalog=funnel.catalog, pacer=None,
                policy=ScreenPolicy(k=k, freq_cap=0, prior_cvr=funnel.prior_cvr)))
            pre, prerank_ms = _timed(lambda s=screened: funnel.prerank.handle(
                wire.PrerankRequest(**part, ad_ids=s.ad_ids, k=max(K3S), values=s.click_value)))
            for k3 in (k for k in K3S if k <= k2):
                kept = pre.ad_ids[:k3]
                _, rank_ms = _timed(lambda c=kept: funnel.rank.handle(
                    wire.RankRequest(**part, ad_ids=c)))
                rows.append({
                    "k1": k1, "k2": k2, "k3": k3,
                    "retrieval": float(np.isin(ideal, recalled.ad_ids).mean()),
                    "screen": float(np.isin(ideal, screened.ad_ids).mean()),
                    "prerank": float(np.isin(ideal, kept).mean()),
                    "by_channel": by_channel,
                    "cpu_ms": {"retrieval": recall_ms, "screen": screen_ms,
                               "prerank": prerank_ms, "rank": rank_ms},
                })
    return rows


def summarise(per_request: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Mean over requests per grid point."""
    out = []
    for point in zip(*per_request, strict=True):
        first = point[0]
        cpu = {s: float(np.mean([p["cpu_ms"][s] for p in point])) for s in first["cpu_ms"]}
        channels = sorted({c for p in point for c in p["by_channel"]})
        out.append({
            "k1": first["k1"], "k2": first["k2"], "k3": first["k3"],
            **{s: round(float(np.mean([p[s] for p in point])), 4) for s in STAGES},
            "retrieval_by_channel": {c: round(float(np.mean(
                [p["by_channel"].get(c, 0.0) for p in point])), 4) for c in channels},
            "cpu_ms": {s: round(v, 3) for s, v in cpu.items()},
            "cpu_ms_total": round(sum(cpu.values()), 3),
        })
    return out


def choose(curve: list[dict[str, Any]], target: float, budget_ms: float) -> dict[str, Any]:
    """Least CPU reaching the target within the budget; else the best share within the
    budget; else (no point fits the budget on this machine) the best share within
    CHEAPEST_SLACK x the cheapest point's CPU, so the choice stays near the budget."""
    within = [p for p in curve if p["cpu_ms_total"] <= budget_ms]
    meeting = [p for p in within if p["prerank"] >= target]
    if meeting:
        best = min(meeting, key=lambda p: (p["cpu_ms_total"], -p["prerank"]))
    else:
        if not within:
            cheapest = min(p["cpu_ms_total"] for p in curve)
            within = [p for p in curve if p["cpu_ms_total"] <= CHEAPEST_SLACK * cheapest]
        best = max(within, key=lambda p: (p["prerank"], -p["cpu_ms_total"]))
    return {"ks": {k: best[k] for k in ("k1", "k2", "k3")}, "point": best,
            "goal_met": bool(meeting), "within_budget": best["cpu_ms_total"] <= budget_ms}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--top-n", type=int, default=10)
    parser.add_argument("--target", type=float, default=0.9,
                        help="share of the ideal top N that must reach the ranker")
    parser.add_argument("--cpu-budget-ms", type=float, default=6.0,
                        help="serving CPU per request for recall+screen+prerank+rank "
                             "(the capacity issue's budget is 6 ms per request)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--record", action="store_true",
                        help="publish the recommendation as a new bundle version")
    args = parser.parse_args(argv)
    try:
        data_dir = layout.require_dataset(args.data)
        funnel = Funnel(str(args.bundle), data_dir)
        requests = validation_requests(data_dir, funnel, args.requests, args.seed)
        per_request = []
        for i, req in enumerate(requests):
            per_request.append(measure_request(funnel, req, args.top_n))
            print(f"\r{i + 1}/{len(requests)} requests", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        curve = summarise(per_request)
        choice = choose(curve, args.target, args.cpu_budget_ms)
        result = {"bundle": funnel.bundle.version, "requests": len(requests),
                  "top_n": args.top_n, "target": args.target,
                  "cpu_budget_ms": args.cpu_budget_ms, **choice, "curve": curve}
        if args.record:
            path = publish_recommendation(args.bundle, choice["ks"], {
                k: result[k] for k in ("bundle", "requests", "top_n", "target",
                                       "cpu_budget_ms", "point", "goal_met", "within_budget")})
            result["recorded_in"] = str(path)
    except (ValueError, FileNotFoundError) as exc:
        print(f"choose_ks: {exc}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    for point in curve:
        print(f"K1={point['k1']:5d} K2={point['k2']:5d} K3={point['k3']:4d}  kept: "
              f"retrieval {point['retrieval']:.3f} screen {point['screen']:.3f} "
              f"prerank {point['prerank']:.3f}  cpu {point['cpu_ms_total']:.2f} ms")
    p = choice["point"]
    goal = "met" if choice["goal_met"] else "missed"
    print(f"recommended K1={p['k1']} K2={p['k2']} K3={p['k3']}: {p['prerank']:.3f} reach the "
          f"ranker at {p['cpu_ms_total']:.2f} ms CPU (goal {goal})"
          + (f"; recorded in {result['recorded_in']}" if args.record else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
