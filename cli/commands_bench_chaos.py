"""`cascade bench chaos`: the fault suite against a local stack under load -> JSON + table.

Registered on the `bench` group by cli/commands_bench.py (`register(bench_app)`).
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from pathlib import Path

import typer

from cli.errors import CliError


def bench_chaos(
    out: Path = typer.Option(..., help="Result JSON ({\"faults\": [...]}); a Markdown table "
                             "is written beside it (.md)."),
    data: Path | None = typer.Option(None, help="Marketplace to load into Redis (default "
                                     "CASCADE_DATA)."),
    bundle: Path | None = typer.Option(None, help="Bundle the stages serve (default "
                                       "CASCADE_BUNDLE)."),
    rps: float = typer.Option(20.0, help="Offered /v1/ads requests per second (Poisson)."),
    faults: str = typer.Option(",".join(("stage_kill", "stage_stop", "redis_freeze",
                                         "redis_restart_aof", "redis_restart_empty",
                                         "bundle_swap", "gateway_kill")),
                               help="Comma-separated faults to run, in order."),
    stop_s: float = typer.Option(15.0, help="How long the stage stays SIGSTOPped."),
    freeze_s: float = typer.Option(20.0, help="How long Redis stays frozen."),
    budget_ms: float = typer.Option(200.0, help="The gateway's default request budget."),
    readme: Path | None = typer.Option(None, help="Also rewrite the table between this "
                                       "README's bench-chaos markers."),
) -> None:
    """Inject faults into a local stack (Redis + stages + gateway) under a steady open-loop
    load; report errors, degradation, p99, recovery time and the event ledger per fault."""
    from services.bench.chaos import (
        FAULTS,
        ChaosConfig,
        markdown_table,
        run_chaos,
        update_readme,
    )

    data = data or (Path(os.environ["CASCADE_DATA"]) if os.environ.get("CASCADE_DATA")
                    else None)
    bundle = bundle or (Path(os.environ["CASCADE_BUNDLE"]) if os.environ.get("CASCADE_BUNDLE")
                        else None)
    if data is None or bundle is None:
        raise CliError("bench chaos needs --data and --bundle (or CASCADE_DATA / "
                       "CASCADE_BUNDLE): run `cascade simulate` and `cascade train` first")
    chosen = tuple(f.strip() for f in faults.split(",") if f.strip())
    unknown = [f for f in chosen if f not in FAULTS]
    if unknown or not chosen:
        raise CliError(f"bench chaos: unknown faults {unknown} (known: {', '.join(FAULTS)})")
    if rps <= 0 or stop_s <= 0 or freeze_s <= 0:
        raise CliError("bench chaos: --rps, --stop-s and --freeze-s must be > 0")
    cfg = ChaosConfig(data=data.resolve(), bundle=bundle.resolve(), out=out, rps=rps,
                      stop_s=stop_s, freeze_s=freeze_s, faults=chosen, budget_ms=budget_ms)
    with tempfile.TemporaryDirectory(prefix="cascade-chaos-") as work:
        try:
            result = asyncio.run(run_chaos(cfg, Path(work), say=typer.echo))
        except RuntimeError as exc:
            raise CliError(f"bench chaos: {exc}") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    table = markdown_table(result)
    out.with_suffix(".md").write_text(table + "\n")
    typer.echo(table)
    if readme is not None and not update_readme(readme, result):
        raise CliError(f"bench chaos: {readme} has no bench-chaos markers; the result is in "
                       f"{out}")


def register(bench_app: typer.Typer) -> None:
    bench_app.command("chaos")(bench_chaos)
