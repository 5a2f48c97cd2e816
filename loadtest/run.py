"""Run Locust headless against a running stack and write the `cascade bench e2e` summary.

One run offers a fixed rate for a fixed time. A step run offers rising rates until the p99
crosses the budget (or errors appear, or the stack stops keeping up) and plots latency against
offered load. Locust runs as a subprocess: it monkey-patches its process with gevent, which must
not leak into the CLI.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from loadtest.plot import plot_latency_vs_load
from loadtest.report import scrape_all, summarize

LOCUSTFILE = Path(__file__).resolve().with_name("locustfile.py")


@dataclass(frozen=True)
class LoadConfig:
    """One load run's knobs (the CLI fills it; the defaults are the contract's load test)."""

    url: str
    out: Path  # the summary JSON; Locust's CSV/HTML and the plot go beside it
    api_key: str
    data: str  # marketplace dir holding users.parquet
    rps: float = 150.0
    seconds: float = 60.0
    user_rps: float = 1.0  # per simulated frontend: users = rps / user_rps
    feedback: float = 1.0
    budget_ms: float = 40.0  # p99 budget the step run searches against
    step: bool = False
    step_factor: float = 1.25
    max_steps: int = 10
    metrics_urls: tuple[str, ...] = ()  # services whose /metrics give stage times (default: url)

    @property
    def scraped(self) -> tuple[str, ...]:
        return self.metrics_urls or (self.url,)


def users_for(rps: float, user_rps: float) -> int:
    """Enough constant-throughput users to offer `rps` whatever the latency."""
    return max(1, math.ceil(rps / user_rps))


def locust_command(cfg: LoadConfig, prefix: Path) -> list[str]:
    """The headless Locust invocation for one run (spawns every user within about a second)."""
    users = users_for(cfg.rps, cfg.user_rps)
    return [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
            "-u", str(users), "-r", str(users), "-t", f"{max(1, round(cfg.seconds))}s",
            "--host", cfg.url, "--csv", str(prefix), "--html", f"{prefix}.html",
            "--reset-stats", "--only-summary", "--stop-timeout", "2",
            "--loglevel", "WARNING"]


def clean(value):  # noqa: ANN001, ANN201 - any JSON value
    """NaN/inf -> None, so the summary is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clean(v) for v in value]
    return value


def run_once(cfg: LoadConfig, run_dir: Path) -> dict:
    """Offer `cfg.rps` for `cfg.seconds`; the summary of that one run (files in `run_dir`)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    prefix = run_dir / "locust"
    sidecar = run_dir / "sidecar.json"
    metrics_start = run_dir / "metrics_start.txt"
    for stale in (sidecar, metrics_start, Path(f"{prefix}_stats.csv")):
        stale.unlink(missing_ok=True)
    env = {**os.environ, "CASCADE_API_KEY": cfg.api_key, "CASCADE_DATA": str(cfg.data),
           "CASCADE_LOAD_USER_RPS": str(cfg.user_rps), "CASCADE_LOAD_FEEDBACK": str(cfg.feedback),
           "CASCADE_LOAD_SIDECAR": str(sidecar),
           "CASCADE_LOAD_METRICS_START": str(metrics_start),
           "CASCADE_LOAD_METRICS_URLS": ",".join(cfg.scraped)}
    before = scrape_all(cfg.scraped, cfg.api_key)  # fallback if the start scrape is missing
    log = run_dir / "locust.log"
    with log.open("w") as out:
        try:
            subprocess.run(locust_command(cfg, prefix), env=env, stdout=out,
                           stderr=subprocess.STDOUT, timeout=cfg.seconds + 120, check=False)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"locust did not finish in time (see {log})") from None
    after = scrape_all(cfg.scraped, cfg.api_key)
    (run_dir / "metrics_end.txt").write_text(after)
    stats = Path(f"{prefix}_stats.csv")
    if not stats.is_file():
        tail = " ".join(log.read_text().strip().splitlines()[-1:])
        raise RuntimeError(f"locust wrote no stats (see {log}): {tail}")
    summary = summarize(
        stats.read_text(), offered_rps=cfg.rps,
        sidecar=json.loads(sidecar.read_text()) if sidecar.is_file() else None,
        metrics_before=metrics_start.read_text() if metrics_start.is_file() else before,
        metrics_after=after)
    summary.update(users=users_for(cfg.rps, cfg.user_rps), seconds=cfg.seconds, url=cfg.url,
                   locust_csv=str(stats), locust_html=f"{prefix}.html")
    return clean(summary)


def within_budget(summary: dict, budget_ms: float) -> bool:
    """The stack keeps up: p99 under budget, under 1% errors, achieved >= 90% of offered."""
    p99 = summary.get("p99_ms")
    return (p99 is not None and p99 <= budget_ms
            and (summary.get("error_rate") or 0.0) <= 0.01
            and (summary.get("achieved_rps") or 0.0) >= 0.9 * summary["offered_rps"])


def run_steps(cfg: LoadConfig, say: Callable[[str], None] = print) -> dict:
    """Rising offered rates until the budget breaks; the best passing step + every step + plot."""
    steps: list[dict] = []
    rate = cfg.rps
    for index in range(cfg.max_steps):
        step_cfg = replace(cfg, rps=round(rate, 1))
        result = run_once(step_cfg, cfg.out.parent / f"step_{index:02d}_{step_cfg.rps:g}rps")
        steps.append(result)
        say(f"step {index}: offered {result['offered_rps']:g} rps, achieved "
            f"{result['achieved_rps']} rps, p99 {result['p99_ms']} ms, "
            f"errors {result['error_rate']}")
        if not within_budget(result, cfg.budget_ms):
            break
        rate *= cfg.step_factor
    passing = [s for s in steps if within_budget(s, cfg.budget_ms)]
    best = dict(passing[-1] if passing else steps[0])
    plot = plot_latency_vs_load(steps, cfg.budget_ms, cfg.out.parent / "latency_vs_load.png")
    best.update(steps=steps, budget_ms=cfg.budget_ms, plot=str(plot),
                capacity_rps=passing[-1]["offered_rps"] if passing else None)
    return best


def run_load(cfg: LoadConfig, say: Callable[[str], None] = print) -> dict:
    """One run, or a step run; writes and returns the summary."""
    if not (Path(cfg.data) / "users.parquet").is_file():
        raise FileNotFoundError(f"no users.parquet in {cfg.data}: pass --data (the marketplace "
                                "the stack serves)")
    started = time.time()
    if cfg.step:
        summary = run_steps(cfg, say)
    else:
        summary = run_once(cfg, cfg.out.parent)
    summary.update(started_at=started, budget_ms=cfg.budget_ms, feedback=cfg.feedback,
                   user_rps=cfg.user_rps)
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    cfg.out.write_text(json.dumps(clean(summary), indent=2) + "\n")
    return summary
