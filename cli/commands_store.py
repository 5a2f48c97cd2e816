"""`cascade load-store` (fill Redis from a marketplace) and the importers of public datasets."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from cli.errors import CliError
from cli.main import app
from services.common.config import Settings, redact_url

console = Console(stderr=True)


def _progress() -> Progress:
    return Progress(TextColumn("{task.description:<10}"), BarColumn(),
                    TextColumn("{task.completed:>10,}/{task.total:,}"), TimeElapsedColumn(),
                    console=console, transient=False)


async def _load(settings: Settings, data: Path) -> str:
    import redis.exceptions

    from services.common.store_load import load_marketplace
    from services.common.store_redis import RedisStore

    try:
        store = RedisStore.from_url(settings.redis_url or "", prefix=settings.redis_prefix,
                                    socket_connect_timeout=3)
    except ValueError as exc:  # a malformed redis+cluster:// URL
        raise CliError(f"REDIS_URL {settings.redis_url_safe}: {exc}") from None
    try:
        try:
            await store.ping()
        except (redis.exceptions.ConnectionError, redis.exceptions.RedisClusterException,
                OSError) as exc:
            raise CliError(f"Redis at {settings.redis_url_safe} is unreachable: "
                           f"{redact_url(str(exc))}") from None
        with _progress() as bar:
            tasks: dict[str, int] = {}

            def report(what: str, n: int, total: int) -> None:
                if what not in tasks:
                    tasks[what] = bar.add_task(what, total=total)
                bar.advance(tasks[what], n)

            counts = await load_marketplace(store, data, progress=report)
    finally:
        await store.close()
    return (f"loaded {counts.ads:,} ads, {counts.campaigns:,} campaigns, {counts.users:,} users, "
            f"{counts.sequences:,} sequences into {settings.redis_url_safe} "
            f"(prefix {settings.redis_prefix!r}) in {counts.seconds:.1f}s")


@app.command("load-store")
def load_store(
    data: Path = typer.Option(..., "--data", help="Marketplace directory (cascade simulate "
                              "--out, or an importer's --out)."),
) -> None:
    """Fill the Redis at REDIS_URL with ads, campaigns, users and behaviour sequences.

    Keys go under CASCADE_REDIS_PREFIX (default 'cascade:'). Writes go out as large
    pipelines on one connection (redis-cli --pipe style). Without REDIS_URL there is nothing
    to fill: the in-process store loads itself at `cascade serve all --data DIR`.
    """
    from models.data.layout import require_dataset

    settings = Settings.from_env()
    if not settings.redis_url:
        raise CliError("REDIS_URL is not set: load-store fills a Redis server "
                       "(e.g. REDIS_URL=redis://127.0.0.1:6379/0)")
    require_dataset(data)
    print(asyncio.run(_load(settings, data)))


@app.command("import-aliccp")
def import_aliccp_cmd(
    src: Path = typer.Option(..., "--src", help="Directory with the Ali-CCP CSVs (sample_"
                             "skeleton_{train,test}.csv, common_features_{train,test}.csv)."),
    out: Path = typer.Option(..., "--out", help="Dataset directory to write."),
    max_samples: int = typer.Option(0, "--max-samples", min=0,
                                    help="Stop each split after this many samples (0 = all)."),
) -> None:
    """Convert the public Ali-CCP click/conversion logs into a Cascade dataset.

    Keeps Ali-CCP's own train/test split in an impressions `split` column and writes the
    Ali-CCP schema to OUT/schema.yaml; train with `cascade train --data OUT`.
    """
    from models.data.aliccp import import_aliccp

    started = time.perf_counter()
    with _progress() as bar:
        tasks: dict[str, int] = {}

        def report(what: str, n: int, total: int) -> None:
            if what not in tasks:
                tasks[what] = bar.add_task(what, total=total or None)
            bar.update(tasks[what], completed=n, total=total or None)

        summary = import_aliccp(src, out, max_samples=max_samples or None, progress=report)
    print(f"imported {summary['impressions']:,} impressions ({summary['train_impressions']:,} "
          f"train, {summary['test_impressions']:,} test), {summary['ads']:,} ads, "
          f"{summary['users']:,} users into {out} in {time.perf_counter() - started:.1f}s")


@app.command("import-movielens")
def import_movielens_cmd(
    src: Path = typer.Option(..., "--src", help="The ml-100k directory (u.data, u.item, "
                             "u.user) of GroupLens' MovieLens 100k."),
    out: Path = typer.Option(..., "--out", help="Dataset directory to write."),
) -> None:
    """Convert MovieLens 100k ratings into a Cascade dataset: one impression per rating,
    click = rating >= 4, conversion = rating 5, the clicked movies before each rating as its
    behaviour sequence, and a global 80/20 time split in an impressions `split` column.
    Writes the MovieLens schema to OUT/schema.yaml; train with `cascade train --data OUT`.
    """
    from models.data.movielens import import_movielens

    started = time.perf_counter()
    summary = import_movielens(src, out)
    print(f"imported {summary['impressions']:,} ratings ({summary['train_impressions']:,} "
          f"train, {summary['test_impressions']:,} test; CTR {summary['ctr']:.3f}, CVR "
          f"{summary['cvr']:.3f}), {summary['ads']:,} movies, {summary['users']:,} users into "
          f"{out} in {time.perf_counter() - started:.1f}s")
