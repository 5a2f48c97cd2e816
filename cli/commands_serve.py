"""`cascade serve {gateway,retrieval,prerank,rank,all}`: run one service under uvicorn.

`all` is the embedded default: every stage in the gateway's process (stage URLs ignored). With
the in-process store (no REDIS_URL), `--data` (default CASCADE_DATA) fills it from a marketplace
at start-up. Thread settings (OMP_WAIT_POLICY=PASSIVE, OMP_NUM_THREADS) are exported before
torch or faiss is imported (they read them once, at load), and every BLAS / OpenMP pool already
loaded (numpy's OpenBLAS: the CLI imports numpy first) is held to the same count at run time
(services.common.threads); malloc is tuned for per-request activation tensors
(services.common.malloc) at the same point.

`--workers N` loads the bundle (and the gateway's catalog) once, then forks N processes that
share those pages (services.common.prefork); for the gateway that needs REDIS_URL, since
in-process stores and event logs cannot be shared between processes. With REDIS_URL set, the
gateway (and `all`) defaults to one worker per core, each with one torch / OpenMP / faiss
thread.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from cli.errors import CliError
from cli.main import app

ROLES = ("gateway", "retrieval", "prerank", "rank", "all")


GIL_SWITCH_S = 0.0005


def _thread_env(threads: int) -> None:
    # Stage work runs in threads beside a busy event loop; with the default 5 ms GIL switch
    # interval each of a stage's many short numpy/torch calls can wait 5 ms to get the GIL
    # back (a convoy that turned a 2 ms recall into 100+ ms under load). 0.5 ms bounds it.
    sys.setswitchinterval(GIL_SWITCH_S)
    from services.common.malloc import tune_malloc

    tune_malloc()  # large freed blocks are reused, not unmapped per request (see the module)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from services.common.threads import limit_native_threads

    limit_native_threads(threads)  # numpy's OpenBLAS is loaded already (see the module)


def _resolve_bundle(bundle: str | None) -> str | None:
    if not bundle:
        return None
    from models.bundle import BundleError, resolve_bundle_dir

    try:
        return str(resolve_bundle_dir(bundle))
    except BundleError as exc:
        raise CliError(str(exc)) from None


def build_app(role: str, bundle: str | None, data: str | None = None):  # noqa: ANN201
    """The ASGI app for `role`, from the environment's Settings (also used by tests)."""
    from services.common.config import Settings

    settings = Settings.from_env()
    if role in ("retrieval", "prerank", "rank"):
        if not bundle:
            raise CliError(f"no bundle: `cascade serve {role}` needs --bundle or CASCADE_BUNDLE")
        from functools import partial

        from services.gateway.stage_loaders import load_stage

        if role == "retrieval":
            from services.retrieval.app import create_app as create_retrieval

            return create_retrieval(settings, bundle=bundle,
                                    loader=partial(load_stage, "retrieval", settings=settings))
        module = __import__(f"services.{role}.app", fromlist=["create_app"])
        return module.create_app(settings, bundle=bundle)
    return _gateway_app(role, settings, bundle, data)


def _gateway_app(role: str, settings, bundle: str | None, data: str | None):  # noqa: ANN001,ANN202
    import asyncio

    from services.gateway.app import check_keys, create_app
    from services.gateway.cascade import GatewayConfig
    from services.gateway.service import Gateway
    from services.gateway.stage_loaders import build_stages

    if role == "all":
        settings = settings.with_(retrieval_url=None, prerank_url=None, rank_url=None)
    try:
        check_keys(settings)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    local = [n for n, u in (("retrieval", settings.retrieval_url),
                            ("prerank", settings.prerank_url), ("rank", settings.rank_url))
             if not u]
    if local and not bundle:
        raise CliError(f"no bundle: in-process stage(s) {', '.join(local)} need --bundle or "
                       f"CASCADE_BUNDLE (or set their CASCADE_<STAGE>_URL)")
    config = GatewayConfig.for_bundle_path(settings.extra.get("gateway", {}), bundle)
    gateway = Gateway(settings, config, build_stages(settings, bundle))
    data = data or settings.data
    if data and not settings.redis_url:
        from services.common.store_load import load_marketplace

        if not Path(data).is_dir():
            raise CliError(f"data directory not found: {data}")
        counts = asyncio.run(load_marketplace(gateway.store, data))
        print(f"in-process store: {counts.ads} ads, {counts.users} users from {data}", flush=True)
    return create_app(gateway)


@app.command("serve")
def serve(
    role: str = typer.Argument(..., help="gateway | retrieval | prerank | rank | all"),
    bundle: str = typer.Option("", "--bundle", help="Version dir or BUNDLES root "
                               "(default CASCADE_BUNDLE)."),
    data: str = typer.Option("", "--data", help="Marketplace to fill the in-process store "
                             "(default CASCADE_DATA)."),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port", min=0, max=65535),
    workers: int = typer.Option(0, "--workers", min=0, help="Worker processes (0 = one per "
                                "core for the gateway with REDIS_URL set, else 1)."),
) -> None:
    """Serve one Cascade service (or `all`: the embedded gateway with every stage)."""
    if role not in ROLES:
        raise CliError(f"unknown service '{role}' (choose from {', '.join(ROLES)})")
    threads = int(os.environ.get("CASCADE_TORCH_THREADS", "1") or 1)
    from services.common.prefork import PIN_ENV, PIN_MODES, pin_mode

    if pin_mode() not in PIN_MODES:
        raise CliError(f"{PIN_ENV} must be one of {', '.join(PIN_MODES)}")
    _thread_env(threads)
    bundle_path = _resolve_bundle(bundle or os.environ.get("CASCADE_BUNDLE"))
    if workers == 0:  # one per core where the workers can share a store, else one
        shared = role in ("gateway", "all") and os.environ.get("REDIS_URL")
        workers = (os.cpu_count() or 1) if shared else 1
    if workers > 1 and role in ("gateway", "all") and not os.environ.get("REDIS_URL"):
        raise CliError("--workers > 1 needs REDIS_URL: in-process stores and event logs are "
                       "per process")
    import uvicorn

    from services.common.prefork import serve_forked, uvicorn_options

    options = uvicorn_options(host, port)
    asgi = build_app(role, bundle_path, data or None)
    if workers > 1:
        gateway = getattr(asgi.state, "gateway", None)
        if gateway is not None:
            import asyncio

            asyncio.run(gateway.preload())
        serve_forked(asgi, workers, options, say=lambda line: print(f"cascade {role}: {line}",
                                                                       flush=True))
        return
    print(f"cascade {role} on http://{host}:{port}", flush=True)
    uvicorn.run(asgi, **options)
