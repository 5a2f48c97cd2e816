"""`cascade replay`: run every arm over the same traffic and write the JSON, table and plot.

Arms run one after the other in one event loop, each over its own fresh in-process store loaded
from the dataset, sharing the loaded stage states (read-only) and the rebuilt truth. With a URL
only the `cascade` arm runs, against that gateway over HTTP (services/replay/http_arm.py).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from models.bundle import read_bundle
from models.data import layout
from models.data.truth import Truth
from services.common.config import Settings
from services.gateway.stage_loaders import bundle_priors, load_stage
from services.replay import report
from services.replay.arms import ARMS
from services.replay.engine import ArmLog, ArmRun, ReplayConfig, Shared
from services.replay.traffic import draw_traffic

# the bundle models an arm cannot run without
NEEDS = {"cascade": ("two_tower", "dqm", "din_esmm"), "full-ranker": ("din_esmm",),
         "oracle": (), "qscore-only": ("qscore",), "dqm-only": ("dqm",)}
STATES = {"retrieval": "two_tower", "prerank": "dqm", "rank": "din_esmm"}


def check_arms(arms: tuple[str, ...], models: dict[str, Any], version: str) -> None:
    """Refuse, in one line, an unknown arm or a bundle that lacks a model an arm needs."""
    for arm in arms:
        if arm not in NEEDS:
            raise ValueError(f"unknown arm {arm!r} (arms: {', '.join(ARMS)})")
        missing = [m for m in NEEDS[arm] if m not in models]
        if missing:
            raise ValueError(f"bundle {version} has no {', '.join(missing)} model, which the "
                             f"{arm} arm needs")


def load_shared(data_dir: Path, bundle_path: str, arms: tuple[str, ...]) -> Shared:
    bundle = read_bundle(bundle_path)
    check_arms(arms, bundle.manifest.get("models", {}), bundle.version)
    truth = Truth.from_dataset(data_dir)
    settings = Settings()
    states = {name: load_stage(name, bundle_path, settings) for name, model in STATES.items()
              if model in bundle.manifest.get("models", {})}
    prior, counts, prior_cvr = bundle_priors(bundle)
    return Shared(data_dir, truth, states, prior, counts, prior_cvr, bundle.version,
                  bundle.manifest)


def run_replay(data_dir: str | Path, bundle_path: str | Path, requests: int, *, seed: int = 0,
               url: str | None = None, arms: tuple[str, ...] = ARMS,
               config: ReplayConfig | None = None,
               progress: Any = None) -> dict[str, Any]:
    """Replay `requests` requests through each arm; the result JSON (see the contract)."""
    if requests < 1:
        raise ValueError("--requests must be at least 1")
    if config is not None and config.top_n < 1:
        raise ValueError("--top-n must be at least 1")
    root = layout.require_dataset(data_dir)
    cfg = config or ReplayConfig()
    if url:
        arms = ("cascade",)
    traffic = draw_traffic(root, requests, seed)
    if url:
        from services.replay.http_arm import HttpArm

        bundle = read_bundle(str(bundle_path))
        logs = {"cascade": HttpArm(url, root, Truth.from_dataset(root), cfg,
                                   traffic).run(progress)}
        version = bundle.version
    else:
        shared = load_shared(root, str(bundle_path), arms)
        logs = asyncio.run(run_arms(arms, shared, cfg, traffic, progress))
        version = shared.version
    figures = {name: report.arm_figures(log) for name, log in logs.items()}
    for name, extra in report.comparisons(logs, seed).items():
        figures[name].update(extra)
    return {
        "data": str(root), "bundle": version, "requests": requests, "seed": seed,
        "mode": "http" if url else "in-process", "top_n": cfg.top_n,
        "budget_ms": cfg.budget_ms,
        "full_ranker_requests": len(logs["full-ranker"].columns["slots"])
        if "full-ranker" in logs else 0,
        "k": {"retrieval": cfg.gateway.k1, "screen": cfg.gateway.k2, "prerank": cfg.gateway.k3},
        "arms": figures,
        "goals": report.goals(figures),
        "timings": {name: round(log.seconds, 2) for name, log in logs.items()},
    }


async def run_arms(arms: tuple[str, ...], shared: Shared, cfg: ReplayConfig, traffic: Any,
                    progress: Any) -> dict[str, ArmLog]:
    logs: dict[str, ArmLog] = {}
    for arm in arms:
        replayed = traffic
        if arm == "full-ranker" and 0 < cfg.full_ranker_requests < len(traffic.requests):
            replayed = traffic.prefix(cfg.full_ranker_requests)
        logs[arm] = await ArmRun(arm, shared, cfg, replayed, progress).run()
    return logs


def write_outputs(result: dict[str, Any], out: str | Path, plot_path: str | Path | None = None
                  ) -> tuple[Path, Path]:
    """The JSON at `out` and the plot beside it (same name, .png) unless given."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    png = Path(plot_path) if plot_path else out.with_suffix(".png")
    report.plot(result["arms"], png)
    return out, png
