"""The HTTP ceiling: a FastAPI app that does no ad work, served the way `cascade serve` serves.

Running the load test's exact load shape against it shows what the framework, the server and
the load generator cost on their own, so the gateway's figures can be read as a ratio (CPU per
request, latency, capacity) to this floor. The uvicorn options copy cli/commands_serve.py's:
uvloop (asyncio without it), httptools, keep-alive 30 s, no access log, the same GIL switch
interval, and as many worker processes as the gateway runs.

`python -m loadtest.ceiling --port P [--workers N]` serves it; `CeilingServer` starts that on a
free port for the length of a `with` block.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from fastapi import FastAPI, Response
from pydantic import BaseModel

REPO = Path(__file__).resolve().parents[1]
# `cascade serve`'s GIL switch interval (cli/commands_serve.py: GIL_SWITCH_S), copied rather than
# imported: importing that module pulls in the whole CLI.
GIL_SWITCH_S = 0.0005


class AdRequest(BaseModel):
    """The /v1/ads body, parsed and validated as the gateway does (no ad work follows)."""

    request_id: str
    user_id: str | int
    scene: str
    slots: int = 1
    context: dict | None = None
    budget_ms: float | None = None
    debug: bool = False


def create_app() -> FastAPI:
    """/v1/ads answers `slots` fixed ads at once; events, health and metrics are no-ops."""
    app = FastAPI(title="cascade HTTP ceiling")

    @app.post("/v1/ads")
    async def ads(request: AdRequest) -> dict:
        slots = [{"ad_id": f"ad-{i}", "campaign_id": "c-0", "creative_id": "cr-0",
                  "price_micros": 1000, "pctr": 0.02, "pcvr": 0.1, "ecpm": 20.0,
                  "token": f"{request.request_id}-{i}"} for i in range(max(1, request.slots))]
        return {"request_id": request.request_id, "slots": slots, "stages": {}}

    @app.post("/v1/events")
    async def event(body: dict) -> dict:
        return {"accepted": True}

    @app.get("/healthz")
    @app.get("/readyz")
    async def health() -> dict:
        return {"ok": True}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response("", media_type="text/plain; version=0.0.4")

    return app


def serve(host: str, port: int, workers: int) -> None:
    """Serve the ceiling app exactly as `cascade serve` serves (options, pre-forked workers)."""
    import uvicorn

    from services.common.prefork import serve_forked, uvicorn_options

    sys.setswitchinterval(GIL_SWITCH_S)
    options = uvicorn_options(host, port)
    if workers > 1:
        serve_forked(create_app(), workers, options, say=lambda line: None)
    else:
        uvicorn.run(create_app(), **options)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class CeilingServer:
    """The ceiling app in its own process on a free local port, for a `with` block."""

    def __init__(self, workers: int = 1, start_timeout_s: float = 30.0) -> None:
        self.workers, self.start_timeout_s = workers, start_timeout_s
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None, "ceiling server not started"
        return self.process.pid

    def __enter__(self) -> CeilingServer:
        env = {**os.environ,
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO),
                                                           os.environ.get("PYTHONPATH")]))}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "loadtest.ceiling", "--port", str(self.port),
             "--workers", str(self.workers)], env=env, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                raise RuntimeError(f"ceiling server exited at start (code {code})")
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=1):
                    return self
            except OSError:
                time.sleep(0.1)
        self.__exit__(None, None, None)
        raise RuntimeError(f"ceiling server not ready in {self.start_timeout_s:g} s")

    def __exit__(self, *_exc) -> None:  # noqa: ANN002
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)  # the pre-fork parent stops its workers
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    serve(args.host, args.port, args.workers)


if __name__ == "__main__":
    main()
