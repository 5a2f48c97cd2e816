"""Native compute pools (BLAS, OpenMP) held to the serving thread count, whatever loaded them.

Why: a serving worker gives each request one core, and its event loop, stage threads and
sibling workers already fill the machine. A BLAS or OpenMP pool with a thread per core then
only adds threads that spin between calls. Environment variables cannot prevent that on their
own, because a pool reads them once, when its library loads, and the CLI imports numpy (with
its OpenBLAS) before `cascade serve` runs. So the limit is set at run time, on every pool
loaded so far (threadpoolctl finds numpy's OpenBLAS, faiss's OpenBLAS and libgomp, and
torch's libgomp), and the environment is set for libraries loaded later.

Measured (`cascade serve all`, 1M ads, Redis store, 2 workers on 2 cores, `cascade bench e2e
--rps 40 --seconds 30 --feedback 0`): with numpy's OpenBLAS left at 2 threads, 45.9 ms of
server CPU per ad request, 7% shed and 20% degraded; with every pool at 1 thread, 12.1 ms,
0.1% shed and 1.1% degraded. The pre-ranker's interest match is a numpy matmul large enough
for OpenBLAS to split it over both threads, and the second thread spun after every call.
"""

from __future__ import annotations

import os
import threading
from typing import Any

THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def limit_native_threads(threads: int) -> list[dict[str, Any]]:
    """Hold every loaded BLAS / OpenMP pool to `threads` and tell libraries loaded later the
    same (unless the environment already says otherwise). Returns the pools as set: one dict
    per library (`internal_api`, `num_threads`, `filepath`)."""
    from threadpoolctl import threadpool_info, threadpool_limits

    threads = max(1, int(threads))
    for name in THREAD_ENV:
        os.environ.setdefault(name, str(threads))
    threadpool_limits(limits=threads)
    return native_pools(threadpool_info())


def native_pools(info: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The loaded BLAS / OpenMP pools and their thread counts (for reports and tests)."""
    if info is None:
        from threadpoolctl import threadpool_info

        info = threadpool_info()
    return [{"internal_api": pool["internal_api"], "num_threads": int(pool["num_threads"]),
             "filepath": os.path.basename(pool["filepath"])} for pool in info]


STAGE_NICE_ENV = "CASCADE_STAGE_NICE"
DEFAULT_STAGE_NICE = 10
STAGE_THREAD_PREFIX = "stage-"  # loadtest.procstat groups a worker's CPU by it


def stage_nice() -> int:
    """How much lower than the event loop a stage thread runs (`CASCADE_STAGE_NICE`, 0: same)."""
    raw = os.environ.get(STAGE_NICE_ENV, str(DEFAULT_STAGE_NICE))
    try:
        nice = int(raw)
    except ValueError:
        raise ValueError(f"{STAGE_NICE_ENV} must be an integer 0-19, got {raw!r}") from None
    if not 0 <= nice <= 19:
        raise ValueError(f"{STAGE_NICE_ENV} must be an integer 0-19, got {raw!r}")
    return nice


def lower_this_thread(nice: int) -> int:
    """Run the calling thread `nice` steps below the process (a thread-pool initializer).

    Why: a worker's event loop and its stage threads share the worker's core. When they have
    the same priority, the kernel gives the loop about half the core while a stage computes, so
    a new request (or the 503 that sheds it) waits in the socket for the loop's turn. Below the
    loop, a stage thread yields the core as soon as the loop has work: parsing, admission,
    shedding and the loop's own short steps go first; the stages get every cycle the loop leaves.
    Linux only (a thread id is a task there); elsewhere, or unpermitted, nothing changes.
    Returns the niceness applied (0 when none)."""
    if nice <= 0 or not hasattr(os, "setpriority"):
        return 0
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + nice)
    except OSError:
        return 0
    return nice


def name_this_thread(name: str) -> None:
    """Give the calling thread `name` (at most 15 bytes) as the kernel knows it.

    Why: Python's thread names stay inside the interpreter, and every thread of a worker shows
    up in /proc as the process's name. Named, the load test can split a worker's CPU by thread
    (`loadtest.procstat.thread_cpu_seconds`): the event loop against each stage's pool, which
    a sampling profiler cannot do reliably (it counts uvloop's idle wait as busy). Linux only;
    elsewhere, or when the kernel refuses, nothing changes."""
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as comm:
            comm.write(name.encode("ascii", "replace")[:15].decode("ascii"))
    except OSError:
        pass


def init_stage_thread(stage: str, nice: int) -> None:
    """A stage pool's thread initializer: named `stage-<stage>`, and `nice` steps below the
    event loop (`lower_this_thread`)."""
    name_this_thread(f"{STAGE_THREAD_PREFIX}{stage}")
    lower_this_thread(nice)


_LOWERED = threading.local()


def lower_this_thread_once(nice: int) -> None:
    """`lower_this_thread(nice)` the first time a (reused) pool thread calls it: for pools that
    take no initializer, such as anyio's worker threads."""
    if not getattr(_LOWERED, "done", False):
        lower_this_thread(nice)
        _LOWERED.done = True
