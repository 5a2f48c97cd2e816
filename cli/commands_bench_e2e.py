"""`cascade bench e2e`: Locust against a running stack -> the contract's JSON summary.

The lead's `bench` group registers it: `from cli.commands_bench_e2e import register;
register(bench_app)`. Defaults come from a running `cascade stack up` (gateway URL and any keys
it generated), so `cascade stack up && cascade bench e2e --out FILE` needs no flags.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from cli.errors import CliError
from loadtest.run import LoadConfig, run_load

STACK_STATE = Path("runs/stack/state.json")


def _stack_state(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def bench_e2e(
    out: Path = typer.Option(..., help="Summary JSON; Locust CSV/HTML (and the plot) beside it."),
    url: str | None = typer.Option(None, help="Gateway URL (default: the running `cascade "
                                   "stack`, else http://127.0.0.1:8000)."),
    rps: float = typer.Option(150.0, help="Offered ad requests per second (first step with "
                              "--step)."),
    seconds: float = typer.Option(60.0, help="Duration of the run (of each step with --step)."),
    step: bool = typer.Option(False, help="Raise the rate until p99 crosses --budget-ms; plot."),
    budget_ms: float = typer.Option(40.0, help="p99 budget for --step."),
    data: str | None = typer.Option(None, help="Marketplace dir with users.parquet (default: "
                                    "CASCADE_DATA, else ./data)."),
    user_rps: float = typer.Option(1.0, help="Requests/s per simulated frontend."),
    feedback: float = typer.Option(1.0, help="Share of answers that report events (0..1)."),
    stack_state: Path = typer.Option(STACK_STATE, help="`cascade stack` state file for defaults."),
) -> None:
    """Offer a fixed ad-request rate to the gateway and report latency, errors, stage times."""
    if rps <= 0 or seconds <= 0 or user_rps <= 0 or not 0 <= feedback <= 1:
        raise CliError("bench e2e: --rps, --seconds and --user-rps must be > 0 and --feedback "
                       "within 0..1")
    state = _stack_state(stack_state)
    api_key = (os.environ.get("CASCADE_API_KEY")
               or state.get("secrets", {}).get("CASCADE_API_KEY") or "")
    stack_urls = state.get("urls", {})
    target = url or stack_urls.get("gateway") or "http://127.0.0.1:8000"
    # Against the running stack, also scrape the stage services: their own handling times fill
    # in stages the gateway does not time itself.
    scraped = tuple(stack_urls.values()) if target == stack_urls.get("gateway") else ()
    cfg = LoadConfig(
        url=target, metrics_urls=scraped,
        out=out, api_key=api_key, data=data or os.environ.get("CASCADE_DATA") or "data",
        rps=rps, seconds=seconds, user_rps=user_rps, feedback=feedback, budget_ms=budget_ms,
        step=step)
    try:
        summary = run_load(cfg, say=typer.echo)
    except RuntimeError as exc:
        raise CliError(f"bench e2e: {exc}") from None
    typer.echo(f"offered {summary['offered_rps']} rps, achieved {summary['achieved_rps']} rps, "
               f"p50 {summary['p50_ms']} ms, p99 {summary['p99_ms']} ms, p99.9 "
               f"{summary['p999_ms']} ms, errors {summary['error_rate']}, degraded "
               f"{summary['degraded_share']} -> {out}")
    if (summary.get("achieved_rps") or 0) < 0.9 * summary["offered_rps"]:
        typer.echo("achieved rate is short of the offered rate: the stack is past capacity")


def register(bench_app: typer.Typer) -> None:
    """Add `e2e` to the `cascade bench` group."""
    bench_app.command("e2e")(bench_e2e)
