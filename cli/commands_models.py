"""`cascade train` and `cascade eval`: offline models, bundles and their quality figures."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from cli.main import app
from cli.progress import RichProgress

console = Console(width=None if Console().is_terminal else 120)


@app.command()
def train(
    data: Path = typer.Option(..., "--data", help="Marketplace dataset directory."),
    out: Path = typer.Option(..., "--out", help="BUNDLES root; a new version directory is written "
                             "there and BUNDLES/current is switched to it."),
    models: str = typer.Option("all", "--models", help="Comma-separated subset of two_tower, dqm, "
                               "din_esmm, qscore, base, cvr_base."),
    epochs: int = typer.Option(30, "--epochs", min=1, help="Maximum passes over the training "
                               "rows; with --max-steps, whichever ends first."),
    max_steps: int = typer.Option(3000, "--max-steps", min=0, help="Optimiser-step budget "
                                  "per model (0 = epochs only). Validation runs every epoch, "
                                  "or 20 times over the budget when an epoch is longer, and "
                                  "the best point by validation loss is kept."),
    patience: int = typer.Option(2, "--patience", min=0, help="Validations without "
                                 "improvement before a model stops."),
    batch_size: int = typer.Option(2048, "--batch-size", min=16),
    max_rows: int = typer.Option(0, "--max-rows", min=0, help="Train on the earliest N "
                                 "impressions only (0 = all)."),
    sample_rows: int = typer.Option(0, "--sample-rows", min=0, help="Sample at most N training "
                                    "rows per model per epoch (0 = all)."),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("", "--device", help="cpu or cuda (default: CUDA when present)."),
    flat_below: int = typer.Option(50_000, "--flat-below", min=1, help="Exact faiss index below "
                                   "this many ads, IVF above."),
    value_weight: float | None = typer.Option(
        None, "--value-weight", min=0.0, help="Value-aware retrieval: the index scores "
        "cos(u, a) + W x (log eCPM_a - mean log eCPM), eCPM the ad's Qscore estimate "
        "(needs qscore). Default: the two-tower temperature; 0 = cosine only."),
) -> None:
    """Train every model on the dataset's own split (its `split` column) or, without one, a
    time split, and publish one bundle."""
    from models.train.loop import FitConfig
    from models.train.trainer import TrainOptions, parse_models
    from models.train.trainer import train as run_train
    from services.retrieval.index import add_bundle_index

    options = TrainOptions(
        models=parse_models(models),
        fit=FitConfig(epochs=epochs, max_steps=max_steps or None, patience=patience,
                      batch_size=batch_size, seed=seed, max_train_rows=sample_rows or None),
        max_rows=max_rows or None,
        device=device or None,
    )
    writer, info = run_train(data, out, options, RichProgress())
    try:
        add_bundle_index(writer, info, value_weight=value_weight, exact_below=flat_below)
        path = writer.commit()
    except BaseException:
        writer.abort()
        raise
    console.print(f"bundle {writer.version} -> {path} (current -> {writer.version})")
    table = Table(title="validation metrics")
    for col in ("model", "best epoch", "metrics"):
        table.add_column(col)
    for name, entry in writer.manifest["models"].items():
        metrics = ", ".join(f"{k}={v}" for k, v in entry.get("metrics", {}).items())
        table.add_row(name, str(entry.get("best_epoch", "-")), metrics)
    console.print(table)
    if "index" in writer.manifest:
        idx = writer.manifest["index"]
        console.print(f"faiss index: {idx['kind']} nlist={idx['nlist']} nprobe={idx['nprobe']} "
                      f"recall@{idx['k']}={idx['recall_at_k']}, value weight "
                      f"{idx.get('value_weight', 0.0):g} (mu {idx.get('value_mu', 0.0):.3f})")


@app.command("eval")
def eval_command(
    data: Path = typer.Option(..., "--data", help="The dataset the bundle was trained on."),
    bundle: Path = typer.Option(..., "--bundle", help="Bundle version dir or BUNDLES root."),
    out: Path = typer.Option(..., "--out", help="Metrics JSON file to write."),
) -> None:
    """Evaluate every model in a bundle beside the oracle on its recorded test split."""
    from models.train.evaluate import evaluate

    result = evaluate(data, bundle)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out)
    print_metrics(result)
    console.print(f"wrote {out}")


def print_metrics(result: dict) -> None:
    """One row per metric, one column per model (the oracle first), so it fits a terminal."""
    columns = {"oracle": result.get("oracle", {}), **result["models"]}
    if result.get("oracle_learnable"):
        columns = {"oracle": columns.pop("oracle"),
                   "oracle_learnable": result["oracle_learnable"], **columns}
    keys = sorted({k for m in columns.values() for k in m}, key=_metric_order)
    table = Table(title=f"test split: {result['rows']} impressions (bundle {result['bundle']})")
    table.add_column("metric")
    for name in columns:
        table.add_column(name, justify="right")
    for key in keys:
        table.add_row(key, *[_fmt(metrics.get(key)) for metrics in columns.values()])
    console.print(table)


ORDER = ("ctr_auc", "ctr_gauc", "logloss", "calibration", "cvr_auc", "cvr_fidelity",
         "cvr_calibration", "ctcvr_auc", "recall@100", "recall@500", "recall@1000")


def _metric_order(key: str) -> int:
    return ORDER.index(key) if key in ORDER else len(ORDER)


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


@app.command()
def funnel(
    data: Path = typer.Option(..., "--data", help="The marketplace the bundle was trained on."),
    bundle: Path = typer.Option(..., "--bundle", help="Bundle version dir or BUNDLES root."),
    requests: int = typer.Option(100, "--requests", min=1, help="Requests sampled from the "
                                 "bundle's test split."),
    out: Path = typer.Option(..., "--out", help="Funnel JSON file to write."),
    top_n: int = typer.Option(10, "--top-n", min=1, help="Size of the full-corpus ideal set."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Share of the full ranker's top-N (over the whole eligible corpus) that survives
    retrieval, screening and DQM, and the eCPM the cascade loses; on simulated data also the
    share of the oracle's top-N (true eCPM) and the true eCPM lost."""
    from rich.progress import Progress

    from services.gateway.funnel import run_funnel

    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("funnel", total=requests)
        result = run_funnel(data, bundle, requests, top_n, seed,
                            progress=lambda: bar.advance(task))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    table = Table(title=f"funnel: top-{top_n} of the full ranker over ~{result['mean_corpus']:.0f} "
                  f"eligible ads, {result['requests']} requests")
    table.add_column("after stage")
    table.add_column("K", justify="right")
    table.add_column("share of top-N kept", justify="right")
    oracle = result.get("vs_oracle")
    if oracle:
        table.add_column("of the oracle's top-N", justify="right")
    for stage, share in result["survival"].items():
        extra = [f"{oracle['survival'][stage]:.3f}"] if oracle else []
        table.add_row(stage, str(result["k"][stage]), f"{share:.3f}", *extra)
    console.print(table)
    if oracle:
        console.print(f"true eCPM lost against the oracle: {100 * oracle['ecpm_lost']:.2f}%")
    console.print(f"eCPM lost by the cascade: {100 * result['ecpm_lost']:.2f}%  "
                  f"(goal: >= 90% of the top-{top_n} reach the ranker: "
                  f"{'met' if result['goal']['met'] else 'missed'})")
    console.print(f"wrote {out}")
