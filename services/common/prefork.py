"""Pre-fork serving: load once, fork one worker per core, share the read-only memory.

Why not uvicorn's `--workers`: it spawns fresh interpreters, and each loads the bundle and
the catalog again, so N workers hold N copies of a 1M-ad index, the ad-vector and feature
tables, and the catalog columns. Here the parent builds the app (stage states from the bundle,
and the gateway's catalog through `preload`) and binds the socket, then forks. The children
inherit those numpy arrays and the faiss index copy-on-write: pages nobody writes stay shared.
Each child then runs its own event loop, store connections and
background tasks (started by the app's lifespan, after the fork), and all accept on the one
listening socket.

Before forking, the loaded objects are frozen out of the garbage collector (`gc.freeze`), so
collections in the workers neither walk them (a stall of ~1 s at 1M ads) nor write to their
pages. The parent supervises: a worker that dies is replaced, SIGTERM/SIGINT stop them all. No
threads, event loops or connections exist in the parent before the fork (preloading opens its
own store client and closes it), which is what makes forking safe.

Each worker is pinned to a core of its own when there is exactly one core per worker
(`worker_cpus`; `CASCADE_PIN_WORKERS`: `auto` by default, `1` always, round robin, `0`
never). Why: a request hops between a worker's event loop and its stage threads several times
(recall, pre-rank, rank), and a thread the scheduler wakes on the other core starts with cold
caches. Pinned, the hops stay on one core's caches. Measured with `cascade serve all` (1M
ads, Redis, 2 workers on 2 cores, Locust on the same box, `cascade bench e2e --rps R
--seconds 30 --feedback 0`, servers restarted between runs): at 100 rps pinned 9.1-9.8 ms of
server CPU per request (3 runs), 0.1-0.6% shed, p99 44-49 ms; free 10.4-10.5 ms (2 runs),
2.5-3.1% shed, p99 54-57 ms. At 60 rps no difference beyond the noise (pinned 9.8-11.5 ms,
free 10.2-10.8 ms). In-process, the same requests cost 9.6 ms with the stages on threads and
8.3 ms with them inline; the hand-off itself is about 0.2 ms of that (60-75 us a round trip).
`auto` leaves a worker free to move when the workers do not fill the allowed cores exactly
(a container whose quota is not a cpuset sees the node's cores).
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger(__name__)
RESPAWN_PAUSE_S = 0.5
PIN_ENV = "CASCADE_PIN_WORKERS"
PIN_MODES = ("auto", "1", "0")


def worker_cpus(workers: int, allowed: Sequence[int], mode: str = "auto") -> list[int | None]:
    """The core each worker slot is pinned to, None where it is not pinned (module docstring).

    `auto`: one allowed core per worker exactly, else none; `1`: round robin over the allowed
    cores; `0`: none."""
    if mode not in PIN_MODES:
        raise ValueError(f"{PIN_ENV} must be one of {', '.join(PIN_MODES)}, got {mode!r}")
    cores = sorted(allowed)
    if mode == "0" or not cores or (mode == "auto" and len(cores) != workers):
        return [None] * workers
    return [cores[slot % len(cores)] for slot in range(workers)]


def pin_mode() -> str:
    """`CASCADE_PIN_WORKERS` as set (`auto` when unset or empty)."""
    return os.environ.get(PIN_ENV, "").strip() or "auto"


def _allowed_cpus() -> list[int]:
    getter = getattr(os, "sched_getaffinity", None)
    return list(getter(0)) if getter is not None else []


def uvicorn_options(host: str, port: int) -> dict[str, Any]:
    """How every Cascade service (and the load test's HTTP ceiling) is served: uvloop and
    httptools, with each request's arrival stamped for its deadline and admission."""
    from services.common.admission import ArrivalHttpToolsProtocol

    options: dict[str, Any] = dict(host=host, port=port, log_level="warning", access_log=False,
                                   loop="uvloop", http=ArrivalHttpToolsProtocol,
                                   timeout_keep_alive=30)
    try:
        import uvloop  # noqa: F401
    except ImportError:
        options["loop"] = "asyncio"
    return options


def bind(host: str, port: int) -> socket.socket:
    """The listening socket every worker accepts on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _child(app: Any, sock: socket.socket, options: dict[str, Any], cpu: int | None) -> None:
    import uvicorn

    if cpu is not None:  # before any thread starts: every thread of the worker inherits it
        os.sched_setaffinity(0, {cpu})
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    config = uvicorn.Config(app, **{k: v for k, v in options.items()
                                    if k not in ("host", "port")})
    uvicorn.Server(config).run(sockets=[sock])


def serve_forked(app: Any, workers: int, options: dict[str, Any],
                 say: Callable[[str], None] = print) -> None:
    """Run `app` in `workers` forked processes on (options' host, port) until signalled."""
    sock = bind(options["host"], int(options["port"]))
    # Everything loaded so far lives as long as the workers: move it out of the collector's
    # reach. A full collection otherwise walks millions of long-lived objects (a 1M-ad
    # catalog's per-ad containers) for ~1 s, stalling requests, and writes every object's
    # header in each worker, un-sharing the pages the fork shared.
    gc.collect()
    gc.freeze()
    cpus = worker_cpus(workers, _allowed_cpus(), pin_mode())
    children: dict[int, int] = {}  # pid -> slot
    stopping = False

    def spawn(slot: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            code = 0
            try:
                _child(app, sock, options, cpus[slot])
            except BaseException:  # noqa: BLE001 - a worker never returns into the parent's code
                log.exception("worker %d failed", slot)
                code = 1
            finally:
                sys.stdout.flush()
                os._exit(code)
        children[pid] = slot

    def stop(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for slot in range(workers):
        spawn(slot)
    pinned = "" if cpus[0] is None else f", pinned to cores {', '.join(map(str, cpus))}"
    say(f"{workers} workers (pids {', '.join(map(str, children))}) on "
        f"http://{options['host']}:{options['port']}{pinned}")
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        slot = children.pop(pid, None)
        if slot is None or stopping:
            continue
        log.warning("worker %d (pid %d) exited with status %d; starting another", slot, pid,
                    status)
        time.sleep(RESPAWN_PAUSE_S)
        spawn(slot)
    sock.close()
