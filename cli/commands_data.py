"""`cascade simulate`: generate a synthetic ad marketplace and its impression logs."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cli.main import app
from models.data.sim_config import SCALES, load_config
from models.data.simulator import check_out_dir, simulate

console = Console()


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def summary_tables(summary: dict) -> list[Table]:
    """Rich tables of a simulate summary: totals with the oracle, then rates by scene and slot."""
    totals = Table(title=f"marketplace ({summary.get('scale')}, seed {summary.get('seed')})")
    totals.add_column("metric")
    totals.add_column("value", justify="right")
    for key in ("ads", "campaigns", "users", "requests", "impressions", "clicks", "conversions"):
        if key in summary:
            totals.add_row(key, f"{summary[key]:,}")
    totals.add_row("CTR (clicks / impressions)", _pct(summary["ctr"]))
    totals.add_row("CVR (conversions / clicks)", _pct(summary["cvr"]))
    oracle = summary["oracle"]
    totals.add_row("oracle CTR AUC", f"{oracle['ctr_auc']:.4f}")
    totals.add_row("oracle CTR GAUC", f"{oracle['ctr_gauc']:.4f}")
    totals.add_row("oracle CVR AUC (clicked)", f"{oracle['cvr_auc']:.4f}")
    totals.add_row("seconds", f"{summary['seconds']:.1f}")
    tables = [totals]
    for key, title in (("by_scene", "scene"), ("by_position", "position")):
        table = Table(title=f"rates by {title}")
        for col in (title, "impressions", "clicks", "CTR", "conversions", "CVR"):
            table.add_column(col, justify="left" if col == title else "right")
        for name, row in summary[key].items():
            table.add_row(name, f"{row['impressions']:,}", f"{row['clicks']:,}", _pct(row["ctr"]),
                          f"{row['conversions']:,}", _pct(row["cvr"]))
        tables.append(table)
    return tables


@app.command("simulate")
def simulate_command(
    scale: str = typer.Option("tiny", "--scale",
                              help=f"Preset size: {', '.join(SCALES)} (about 100k, 2M or 20M "
                                   "impressions)."),
    seed: int = typer.Option(1, "--seed", help="Random seed; the same seed gives the same data."),
    out: Path = typer.Option(..., "--out", help="Dataset directory to write. It must be new, "
                             "empty, or a previous dataset (which is replaced)."),
    config: Path | None = typer.Option(None, "--config",
                                       help="JSON or YAML file overriding any simulator "
                                            "parameter, e.g. {\"log\": {\"n_requests\": 5000}}."),
) -> None:
    """Generate a synthetic ad marketplace: catalog, users, requests with behaviour
    sequences, impressions with clicks/conversions and their true probabilities."""
    cfg = load_config(scale, config)
    check_out_dir(out)
    columns = (TextColumn("simulating {task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("chunks"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(f"{scale} -> {out}", total=None)

        def report(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        summary = simulate(cfg, seed, out, progress=report)
    for table in summary_tables(summary):
        console.print(table)
    console.print(f"wrote {out}")
