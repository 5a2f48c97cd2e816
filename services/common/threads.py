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
