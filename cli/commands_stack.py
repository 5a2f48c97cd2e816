"""`cascade stack up|down|status`: docker-compose.yml's services as local processes."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from cli.main import app
from services.stack.compose import ComposeError
from services.stack.launcher import Stack, StackError, default_compose_file
from services.stack.plan import parse_replicas

stack_app = typer.Typer(help="Run the compose stack as local processes (no Docker needed).",
                        no_args_is_help=True)
app.add_typer(stack_app, name="stack")

RUN_DIR = Path("runs/stack")


@stack_app.command("up")
def up(
    bundle: str | None = typer.Option(None, help="Bundle version dir or BUNDLES root "
                                      "(default: CASCADE_BUNDLE, else the compose mount)."),
    data: str | None = typer.Option(None, help="Marketplace to load into the stack's own Redis "
                                    "(default: CASCADE_DATA, else ./data)."),
    run_dir: Path = typer.Option(RUN_DIR, help="State file and logs."),
    redis_url: str | None = typer.Option(None, help="Use this Redis (already loaded) instead of "
                                         "starting one (default: REDIS_URL)."),
    compose_file: Path | None = typer.Option(None, "--compose", help="Compose file to mirror."),
    free_ports: bool = typer.Option(False, help="Listen on free ports, not the compose ports."),
    timeout: float = typer.Option(180.0, help="Seconds each service may take to become ready."),
    replicas: str = typer.Option("", help="Run services as several processes, e.g. "
                                 "rank=2,gateway=2 (ports 100 apart; the gateways share Redis "
                                 "and spread stage calls over the replicas)."),
) -> None:
    """Start every service of docker-compose.yml; return once all answer /readyz."""
    try:
        counts = parse_replicas(replicas)
    except ValueError as exc:
        raise StackError(f"stack up: {exc}") from None
    try:
        state = Stack(run_dir).up(
            compose_file or default_compose_file(),
            bundle=bundle or os.environ.get("CASCADE_BUNDLE") or None,
            data=data or os.environ.get("CASCADE_DATA") or None,
            redis_url=redis_url or os.environ.get("REDIS_URL") or None,
            free_ports=free_ports, timeout_s=timeout, say=typer.echo, replicas=counts,
        )
    except ComposeError as exc:
        raise StackError(f"stack up: {exc}") from None
    except StackError as exc:
        raise StackError(f"stack up: {exc}") from None
    gateways = ",".join(state.get("gateways") or [])
    typer.echo(f"stack ready: gateway {gateways}, state {Path(run_dir) / 'state.json'}")
    if state.get("secrets"):
        names = ", ".join(sorted(state["secrets"]))
        typer.echo(f"generated {names} for this stack (kept in the state file)")


@stack_app.command("down")
def down(run_dir: Path = typer.Option(RUN_DIR, help="State file and logs.")) -> None:
    """Stop exactly the processes `stack up` started."""
    Stack(run_dir).down(say=typer.echo)


@stack_app.command("status")
def status(run_dir: Path = typer.Option(RUN_DIR, help="State file and logs.")) -> int:
    """Each service's pid, port and readiness; exit code 1 unless all are ready."""
    rows = Stack(run_dir).status()
    if not rows:
        typer.echo(f"no stack running (no state at {Path(run_dir) / 'state.json'})")
        return 1
    for row in rows:
        state = "ready" if row["ready"] else ("up, not ready" if row["alive"] else "stopped")
        port = row["port"] if row["port"] else "-"
        typer.echo(f"{row['name']:<10} pid {row['pid']:<8} port {port:<6} {state}")
    return 0 if all(r["ready"] for r in rows) else 1
