"""`cascade bench stages` (this module) and `cascade bench e2e` (cli/commands_bench_e2e.py).

`bench_app` is the `cascade bench` group; the e2e module attaches its command to it through
its `register(bench_app)` hook, called at the end of this module.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import typer

from cli.errors import CliError
from cli.main import app

bench_app = typer.Typer(name="bench", no_args_is_help=True, add_completion=False,
                        pretty_exceptions_enable=False, rich_markup_mode=None,
                        help="Benchmarks: per-stage latency (stages) and end to end (e2e).")
app.add_typer(bench_app, name="bench")


@bench_app.command("stages")
def bench_stages(
    out: Path = typer.Option(..., "--out", help="JSON file to write."),
    scale: str = typer.Option("tiny", "--scale", help="tiny (5k ads), small (100k) or large "
                              "(1M); used when no --bundle is given."),
    bundle: Path | None = typer.Option(None, "--bundle", help="Bundle version dir or BUNDLES "
                                       "root (default: build one for --scale)."),
    requests: int = typer.Option(0, "--requests", min=0, help="Requests per stage (default: "
                                 "the scale's)."),
    keep: Path | None = typer.Option(None, "--keep", help="Write the built bundle under this "
                                     "BUNDLES root instead of a temporary directory."),
) -> None:
    """Each stage's p50/p99 and throughput on 1 CPU thread, beside a naive reference."""
    from services.bench.build import SCALES, build_bench_bundle
    from services.bench.stages import run_stages

    if scale not in SCALES:
        raise CliError(f"--scale: unknown scale '{scale}' (choose from {sorted(SCALES)})")
    spec = SCALES[scale]
    n = requests or spec.requests
    say = typer.echo
    with tempfile.TemporaryDirectory(prefix="cascade-bench-") as tmp:
        if bundle is None:
            root = keep or Path(tmp) / "bundles"
            path = str(build_bench_bundle(scale, root, say=say))
        else:
            if not bundle.exists():
                raise CliError(f"--bundle: not found: {bundle}")
            path = str(bundle)
        result = run_stages(path, requests=n, say=say)
    result["scale"] = scale if bundle is None else None
    text = json.dumps(result, indent=2)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    typer.echo(text)


def _attach_e2e() -> None:
    try:
        from cli.commands_bench_e2e import register
    except ModuleNotFoundError as exc:  # the e2e command needs the load-test extras
        if exc.name not in ("cli.commands_bench_e2e", "locust", "loadtest", "loadtest.run"):
            raise
        return
    register(bench_app)


_attach_e2e()


def _attach_chaos() -> None:
    from cli.commands_bench_chaos import register

    register(bench_app)


_attach_chaos()
