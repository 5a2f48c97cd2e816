"""`cascade bench e2e`: open-loop Locust load against a running gateway -> the contract's JSON.

The lead's `bench` group registers it: `from cli.commands_bench_e2e import register;
register(bench_app)`. Defaults come from a running `cascade stack up` (gateway URL, any keys it
generated, and its processes for the server CPU), so `cascade stack up && cascade bench e2e --out
FILE` needs no flags; against `cascade serve all` pass `--url` (its CPU is read from whatever
listens on that port). Load and figures: loadtest/run.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import urlsplit

import typer

from cli.errors import CliError

# loadtest.schedule's names, kept here so `cascade` starts without numpy, matplotlib or fastapi
# (every command imports this module; loadtest.run is imported when the bench runs).
ARRIVALS = ("poisson", "uniform")

STACK_STATE = Path("runs/stack/state.json")


def _stack_state(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _stack_ports(state: dict) -> tuple[int, ...]:
    """Every port the stack's processes serve (gateway, stages, its own Redis)."""
    return tuple(sorted({int(p["port"]) for p in state.get("processes", []) if p.get("port")}))


def bench_e2e(
    out: Path = typer.Option(..., help="Summary JSON; requests.csv, Locust CSV/HTML and the "
                             "plot beside it."),
    url: str | None = typer.Option(None, help="Gateway URL, or several comma-separated (the "
                                   "load goes to each in turn; CPU sums over all) (default: "
                                   "the running `cascade stack`'s gateways, else "
                                   "http://127.0.0.1:8000)."),
    rps: float = typer.Option(150.0, help="Offered ad requests per second (first step with "
                              "--step)."),
    seconds: float = typer.Option(60.0, help="Duration of the run (of each step with --step)."),
    arrivals: str = typer.Option("poisson", help="poisson | uniform (evenly spaced, random "
                                 "phase)."),
    burst: int = typer.Option(0, help="N > 0: N requests at once every N/rps seconds (burst "
                              "tolerance)."),
    seed: int = typer.Option(0, help="Seed of the arrival schedule and the traffic."),
    step: bool = typer.Option(False, help="Raise the rate until p99 crosses --budget-ms; plot."),
    budget_ms: float = typer.Option(40.0, help="p99 budget for --step."),
    step_factor: float = typer.Option(1.25, help="Rate multiplier between --step steps."),
    max_steps: int = typer.Option(10, help="Most steps of a --step run."),
    data: str | None = typer.Option(None, help="Marketplace dir with users.parquet (default: "
                                    "CASCADE_DATA, else ./data)."),
    feedback: float = typer.Option(1.0, help="Share of answers that post events in an extra "
                                   "run reported as with_feedback (0: capacity run only)."),
    latency_bound_s: float = typer.Option(2.0, help="Users = rps x this, so one is free when "
                                          "a request falls due."),
    max_users: int = typer.Option(1000, help="Cap on Locust users (past it requests go late; "
                                  "latency still counts from the due time)."),
    timeout_s: float = typer.Option(10.0, help="Per-request timeout (counts as an error)."),
    server_pid: list[int] = typer.Option([], help="Server process(es) whose CPU counts, with "
                                         "children (default: whoever listens on the ports)."),
    ceiling: bool = typer.Option(False, help="Also run the same load against a trivial FastAPI "
                                 "app served the same way; reported as ceiling."),
    ceiling_workers: int = typer.Option(0, help="Ceiling worker processes (0: as many as the "
                                        "gateway's uvicorn)."),
    stack_state: Path = typer.Option(STACK_STATE, help="`cascade stack` state file for defaults."),
) -> None:
    """Offer an open-loop ad-request rate to the gateway; report latency, errors, stages, CPU."""
    if rps <= 0 or seconds <= 0 or latency_bound_s <= 0 or timeout_s <= 0 or max_users < 1:
        raise CliError("bench e2e: --rps, --seconds, --latency-bound-s, --timeout-s and "
                       "--max-users must be > 0")
    if step_factor <= 1 or max_steps < 1:
        raise CliError("bench e2e: --step-factor must be > 1 and --max-steps >= 1")
    if not 0 <= feedback <= 1 or burst < 0 or ceiling_workers < 0:
        raise CliError("bench e2e: --feedback must be within 0..1, --burst and "
                       "--ceiling-workers >= 0")
    if arrivals not in ARRIVALS:
        raise CliError(f"bench e2e: unknown --arrivals {arrivals!r} (choose from "
                       f"{', '.join(ARRIVALS)})")
    from loadtest.run import LoadConfig, run_load

    state = _stack_state(stack_state)
    api_key = (os.environ.get("CASCADE_API_KEY")
               or state.get("secrets", {}).get("CASCADE_API_KEY") or "")
    stack_urls = state.get("urls", {})
    stack_gateways = ",".join(state.get("gateways") or
                              ([stack_urls["gateway"]] if "gateway" in stack_urls else []))
    target = url or stack_gateways or "http://127.0.0.1:8000"
    targets = [u.strip() for u in target.split(",") if u.strip()]
    if not targets or any(not urlsplit(u).scheme or not urlsplit(u).hostname for u in targets):
        raise CliError(f"bench e2e: --url {target!r}: expected http://HOST:PORT[,http://...]")
    if any(urlsplit(u).hostname not in ("127.0.0.1", "localhost", "::1") for u in targets):
        typer.echo("note: a target is not local; server CPU is read only from local processes")
    in_stack = set(targets) <= {u for n, u in stack_urls.items() if n.startswith("gateway")}
    # Against the running stack, also scrape the stage services (their own handling times fill
    # in stages the gateway does not time itself) and count every stack process's CPU.
    cfg = LoadConfig(
        url=target, metrics_urls=tuple(stack_urls.values()) if in_stack else (),
        server_ports=_stack_ports(state) if in_stack else (), server_pids=tuple(server_pid),
        out=out, api_key=api_key, data=data or os.environ.get("CASCADE_DATA") or "data",
        rps=rps, seconds=seconds, arrivals=arrivals, burst=burst, seed=seed, feedback=feedback,
        latency_bound_s=latency_bound_s, max_users=max_users, timeout_s=timeout_s,
        budget_ms=budget_ms, step=step, step_factor=step_factor, max_steps=max_steps,
        ceiling=ceiling, ceiling_workers=ceiling_workers)
    try:
        summary = run_load(cfg, say=typer.echo)
    except (RuntimeError, FileNotFoundError, ValueError) as exc:
        raise CliError(f"bench e2e: {exc}") from None
    typer.echo(f"offered {summary['offered_rps']} rps ({summary['arrivals']}, arrival cv "
               f"{summary['arrival_cv']}), achieved {summary['achieved_rps']} rps, p50 "
               f"{summary['p50_ms']} ms, p99 {summary['p99_ms']} ms, p99.9 {summary['p999_ms']} "
               f"ms, errors {summary['error_rate']}, shed {summary['shed_rate']}, degraded "
               f"{summary['degraded_share']}, server cpu {summary['cpu_ms_per_request']} "
               f"ms/request -> {out}")
    by_thread = summary.get("cpu_ms_per_request_by_thread") or {}
    if by_thread:
        typer.echo("server cpu by thread, ms/request: " + ", ".join(
            f"{group} {ms}" for group, ms in by_thread.items()))
    if (summary.get("achieved_rps") or 0) < 0.9 * summary["offered_rps"]:
        typer.echo("achieved rate is short of the offered rate: the server is past capacity")
    if (summary.get("send_lag_p99_ms") or 0) > 10:
        typer.echo(f"sends left up to {summary['send_lag_p99_ms']} ms late (p99): the load "
                   "generator or its user pool did not keep up; latency still counts from "
                   "the due times")


def register(bench_app: typer.Typer) -> None:
    """Add `e2e` to the `cascade bench` group."""
    bench_app.command("e2e")(bench_e2e)
