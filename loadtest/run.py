"""Run Locust headless against a server and write the `cascade bench e2e` summary.

One run offers a fixed rate for a fixed time as an open-loop schedule (loadtest/schedule.py):
Poisson arrivals by default, evenly spaced ones, or bursts of N. A step run offers rising rates
until the p99 crosses the budget (or errors appear, or the server stops keeping up) and plots
latency against offered load. Ad-request capacity is measured without feedback; with
`feedback > 0` one more run at the same (or the found) rate posts the events answers lead to,
reported beside it as `with_feedback`. With `ceiling`, the same load shape also runs against a
trivial FastAPI app served the same way (loadtest/ceiling.py), reported as `ceiling`.

Locust runs as a subprocess: it monkey-patches its process with gevent, which must not leak
into the CLI.
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
from urllib.parse import urlsplit

from loadtest.ceiling import CeilingServer
from loadtest.plot import plot_latency_vs_load
from loadtest.procstat import listening_pids, memory_mb, server_pids
from loadtest.records import cpu_figures, read_records, summarize_records
from loadtest.report import scrape_all, stage_quantiles
from loadtest.schedule import arrival_schedule, pool_size

LOCUSTFILE = Path(__file__).resolve().with_name("locustfile.py")


@dataclass(frozen=True)
class LoadConfig:
    """One load run's knobs (the CLI fills it; the defaults are the contract's load test)."""

    url: str  # a gateway, or several comma-separated (requests go to each in turn)
    out: Path  # the summary JSON; Locust's CSV/HTML, requests.csv and the plot go beside it
    api_key: str
    data: str  # marketplace dir holding users.parquet
    rps: float = 150.0
    seconds: float = 60.0
    arrivals: str = "poisson"  # or "uniform"
    burst: int = 0  # > 0: N requests due at once, every N / rps seconds
    seed: int = 0
    feedback: float = 1.0  # > 0: one more run posting events for this share of answers
    latency_bound_s: float = 2.0  # users = rps x this (+ burst room), capped at max_users
    max_users: int = 1000
    timeout_s: float = 10.0  # per request; an unanswered request counts as an error
    budget_ms: float = 40.0  # p99 budget the step run searches against
    step: bool = False
    step_factor: float = 1.25
    max_steps: int = 10
    metrics_urls: tuple[str, ...] = ()  # services whose /metrics give stage times (default: url)
    server_ports: tuple[int, ...] = ()  # whose listeners' CPU counts (default: url's port)
    server_pids: tuple[int, ...] = ()  # explicit server processes (their children count too)
    ceiling: bool = False
    ceiling_workers: int = 0  # 0: as many as the target's uvicorn runs

    @property
    def targets(self) -> tuple[str, ...]:
        """The gateways the load is spread over."""
        targets = tuple(u.strip().rstrip("/") for u in self.url.split(",") if u.strip())
        if not targets:
            raise ValueError(f"no gateway URL in {self.url!r}")
        return targets

    @property
    def scraped(self) -> tuple[str, ...]:
        return self.metrics_urls or self.targets

    @property
    def ports(self) -> tuple[int, ...]:
        """Whose listeners' CPU counts: every gateway's (their CPU sums)."""
        return self.server_ports or tuple(urlsplit(u).port or 80 for u in self.targets)

    @property
    def users(self) -> int:
        return pool_size(self.rps, self.latency_bound_s, self.burst, self.max_users)


def locust_command(cfg: LoadConfig, prefix: Path) -> list[str]:
    """The headless Locust invocation; the locustfile quits it once every answer is in."""
    users = cfg.users
    limit = math.ceil(cfg.seconds + cfg.timeout_s + 15 + users / 1000)
    return [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
            "-u", str(users), "-r", str(users), "-t", f"{limit}s",
            "--host", cfg.targets[0], "--csv", str(prefix), "--html", f"{prefix}.html",
            "--reset-stats", "--only-summary", "--loglevel", "WARNING"]


def clean(value):  # noqa: ANN001, ANN201 - any JSON value
    """NaN/inf -> None, so the summary is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clean(v) for v in value]
    return value


def write_schedule(cfg: LoadConfig, path: Path) -> list[float]:
    due = arrival_schedule(cfg.rps, cfg.seconds, cfg.arrivals, cfg.seed, cfg.burst)
    if not due:
        raise RuntimeError(f"no request falls due in {cfg.seconds:g} s at {cfg.rps:g} rps")
    path.write_text(json.dumps({"arrivals": "burst" if cfg.burst else cfg.arrivals,
                                "burst": cfg.burst, "rps": cfg.rps, "seconds": cfg.seconds,
                                "seed": cfg.seed, "due_s": due}))
    return due


def run_once(cfg: LoadConfig, run_dir: Path, feedback: float = 0.0) -> dict:
    """Offer `cfg.rps` for `cfg.seconds` on the open-loop schedule; that run's summary."""
    run_dir.mkdir(parents=True, exist_ok=True)
    prefix = run_dir / "locust"
    sidecar, records_csv = run_dir / "sidecar.json", run_dir / "requests.csv"
    metrics_start = run_dir / "metrics_start.txt"
    for stale in (sidecar, records_csv, metrics_start, Path(f"{prefix}_stats.csv")):
        stale.unlink(missing_ok=True)
    write_schedule(cfg, run_dir / "schedule.json")
    pids = server_pids(cfg.ports, cfg.server_pids)
    env = {**os.environ, "CASCADE_API_KEY": cfg.api_key, "CASCADE_DATA": str(cfg.data),
           "CASCADE_LOAD_FEEDBACK": str(feedback), "CASCADE_LOAD_SEED": str(cfg.seed),
           "CASCADE_LOAD_SCHEDULE": str(run_dir / "schedule.json"),
           "CASCADE_LOAD_RECORDS": str(records_csv), "CASCADE_LOAD_SIDECAR": str(sidecar),
           "CASCADE_LOAD_TIMEOUT_S": str(cfg.timeout_s),
           "CASCADE_LOAD_TARGETS": ",".join(cfg.targets),
           "CASCADE_LOAD_SERVER_PIDS": ",".join(map(str, sorted(pids))),
           "CASCADE_LOAD_METRICS_START": str(metrics_start),
           "CASCADE_LOAD_METRICS_URLS": ",".join(cfg.scraped)}
    before = scrape_all(cfg.scraped, cfg.api_key)  # fallback if the start scrape is missing
    log = run_dir / "locust.log"
    with log.open("w") as out:
        try:
            subprocess.run(locust_command(cfg, prefix), env=env, stdout=out,
                           stderr=subprocess.STDOUT, timeout=cfg.seconds + cfg.timeout_s + 120,
                           check=False)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"locust did not finish in time (see {log})") from None
    after = scrape_all(cfg.scraped, cfg.api_key)
    (run_dir / "metrics_end.txt").write_text(after)
    if not records_csv.is_file() or not sidecar.is_file():
        tail = " ".join(log.read_text().strip().splitlines()[-1:])
        raise RuntimeError(f"locust wrote no request records (see {log}): {tail}")
    side = json.loads(sidecar.read_text())
    summary = summarize_records(read_records(records_csv.read_text()), offered_rps=cfg.rps,
                                seconds=cfg.seconds, run_end_s=side.get("run_end_s"))
    summary["stages"] = stage_quantiles(
        after, metrics_start.read_text() if metrics_start.is_file() else before)
    summary.update(cpu_figures(side, summary["answered"]))
    summary["server_memory_mb"] = {str(pid): m for pid, m in memory_mb(pids).items()}
    events = dict(side.get("events") or {})
    summary.update(
        max_in_flight=side.get("max_in_flight"), users=side.get("users", cfg.users),
        arrivals="burst" if cfg.burst else cfg.arrivals, burst=cfg.burst, seed=cfg.seed,
        seconds=cfg.seconds, url=cfg.url, feedback=feedback, events=events,
        events_per_ad_request=(round(sum(events.values()) / summary["answered"], 3)
                               if summary["answered"] else 0.0),
        event_error_rate=(round(side.get("event_failures", 0) / sum(events.values()), 6)
                          if events else 0.0),
        requests_csv=str(records_csv), locust_html=f"{prefix}.html")
    if side.get("degraded_by_stage"):
        summary["degraded_by_stage"] = dict(side["degraded_by_stage"])
    return clean(summary)


def within_budget(summary: dict, budget_ms: float) -> bool:
    """The server keeps up: p99 under budget, under 1% errors and sheds, achieved >= 90%."""
    p99 = summary.get("p99_ms")
    return (p99 is not None and p99 <= budget_ms
            and (summary.get("error_rate") or 0.0) + (summary.get("shed_rate") or 0.0) <= 0.01
            and (summary.get("achieved_rps") or 0.0) >= 0.9 * summary["offered_rps"])


def run_steps(cfg: LoadConfig, out_dir: Path, say: Callable[[str], None] = print,
              label: str = "") -> dict:
    """Rising offered rates until the budget breaks; the best passing step + every step + plot."""
    steps: list[dict] = []
    rate = cfg.rps
    for index in range(cfg.max_steps):
        step_cfg = replace(cfg, rps=round(rate, 1))
        result = run_once(step_cfg, out_dir / f"step_{index:02d}_{step_cfg.rps:g}rps")
        steps.append(result)
        say(f"{label}step {index}: offered {result['offered_rps']:g} rps, achieved "
            f"{result['achieved_rps']} rps, p99 {result['p99_ms']} ms, errors "
            f"{result['error_rate']}, shed {result['shed_rate']}, cpu/request "
            f"{result['cpu_ms_per_request']} ms")
        if not within_budget(result, cfg.budget_ms):
            break
        rate *= cfg.step_factor
    passing = [s for s in steps if within_budget(s, cfg.budget_ms)]
    best = dict(passing[-1] if passing else steps[0])
    title = f"{label or 'Cascade gateway: '}latency vs offered load ({best['arrivals']})"
    plot = plot_latency_vs_load(steps, cfg.budget_ms, out_dir / "latency_vs_load.png", title)
    best.update(steps=steps, plot=str(plot),
                capacity_rps=passing[-1]["offered_rps"] if passing else None,
                capacity_exceeds_last_step=len(passing) == len(steps) == cfg.max_steps)
    return best


def measure(cfg: LoadConfig, out_dir: Path, say: Callable[[str], None], label: str = "") -> dict:
    """Ad-request figures (no feedback), then the feedback run beside them if asked for."""
    summary = run_steps(cfg, out_dir, say, label) if cfg.step else run_once(cfg, out_dir)
    if cfg.feedback > 0:
        rate = summary.get("capacity_rps") or summary["offered_rps"]
        fed = run_once(replace(cfg, rps=rate), out_dir / "with_feedback", cfg.feedback)
        say(f"{label}with feedback {cfg.feedback:g}: offered {fed['offered_rps']:g} rps, p99 "
            f"{fed['p99_ms']} ms, {fed['events_per_ad_request']} events per ad request, "
            f"cpu/request {fed['cpu_ms_per_request']} ms")
        summary["with_feedback"] = fed
    return summary


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return round(numerator / denominator, 3) if numerator and denominator else None


def compare_to_ceiling(summary: dict, ceiling: dict) -> dict:
    """How far the gateway is from an HTTP endpoint that does no work, served the same way.

    Ratios gateway / ceiling, at the same offered rate (of a step run: the ceiling's step at
    the gateway's best rate). A ceiling that never broke its budget has a capacity above its
    last step, so the capacity ratio is then only an upper bound (`capacity_rps_at_most`).
    """
    same_rate = [s for s in ceiling.get("steps", [])
                 if s["offered_rps"] == summary["offered_rps"]]
    at_rate = same_rate[0] if same_rate else ceiling
    ratios = {"offered_rps": at_rate["offered_rps"]}
    ratios.update({key: _ratio(summary.get(key), at_rate.get(key))
                   for key in ("cpu_ms_per_request", "p50_ms", "p99_ms")})
    if "capacity_rps" not in summary:  # a single run finds no capacity
        return ratios
    capacity = _ratio(summary.get("capacity_rps"), ceiling.get("capacity_rps"))
    if ceiling.get("capacity_exceeds_last_step"):
        ratios["capacity_rps_at_most"] = capacity
    else:
        ratios["capacity_rps"] = capacity
    return ratios


def uvicorn_workers(port: int) -> int:
    """Workers serving `port`: a multi-worker uvicorn's supervisor holds the socket too."""
    holders = len(listening_pids(port))
    return holders - 1 if holders > 1 else 1


def run_ceiling(cfg: LoadConfig, say: Callable[[str], None]) -> dict:
    workers = cfg.ceiling_workers or uvicorn_workers(urlsplit(cfg.targets[0]).port or 80)
    with CeilingServer(workers=workers) as server:
        ceiling_cfg = replace(cfg, url=server.url, metrics_urls=(), server_ports=(),
                              server_pids=(server.pid,), feedback=0.0, ceiling=False)
        say(f"ceiling: trivial FastAPI app, {workers} worker(s), on {server.url}")
        summary = measure(ceiling_cfg, cfg.out.parent / "ceiling", say, label="ceiling ")
    summary["workers"] = workers
    return summary


def run_load(cfg: LoadConfig, say: Callable[[str], None] = print) -> dict:
    """One run or a step run (plus feedback and ceiling runs); writes and returns the summary."""
    if not (Path(cfg.data) / "users.parquet").is_file():
        raise FileNotFoundError(f"no users.parquet in {cfg.data}: pass --data (the marketplace "
                                "the server serves)")
    started = time.time()
    summary = measure(cfg, cfg.out.parent, say)
    summary["server_workers"] = sum(uvicorn_workers(urlsplit(u).port or 80)
                                    for u in cfg.targets)
    summary["gateways"] = len(cfg.targets)
    if cfg.ceiling:
        summary["ceiling"] = run_ceiling(cfg, say)
        summary["vs_ceiling"] = compare_to_ceiling(summary, summary["ceiling"])
    summary.update(started_at=started, budget_ms=cfg.budget_ms)
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    cfg.out.write_text(json.dumps(clean(summary), indent=2) + "\n")
    return summary
