"""glibc malloc settings for serving processes: keep freed large blocks for the next request.

Why: a rank call allocates a dozen activation tensors of 0.3-1.3 MB ([history, candidates,
hidden] floats). glibc serves blocks over its mmap threshold (128 KiB at first, raised on the
fly only up to the size of the last freed block) with a fresh `mmap` and returns them with
`munmap`, and trims the heap top past twice that; so every request faulted in and zeroed its
activations page by page again. Measured on the 2-core box (`/tmp`-free reproduction:
`cascade bench stages`, DIN+ESMM 200 x 50, one thread): 10.2-10.7 ms per call before, 4.7-5.0 ms
with these settings, in alternating runs of the same process setup.

The settings: blocks up to `MMAP_THRESHOLD` come from the heap and are reused after `free`,
and up to `TRIM_THRESHOLD` of free heap top is kept instead of handed back. Setting either
also turns off glibc's dynamic threshold. The cost is memory a worker keeps after a peak (per
malloc arena, bounded by the peak itself), reported by `cascade bench e2e` as each worker's
private memory. `CASCADE_MALLOC_TUNE=0` leaves glibc's defaults; other C libraries are left
alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's own ceiling for the dynamic threshold on 64-bit
TRIM_THRESHOLD = 64 << 20


def tune_malloc(env: dict[str, str] | None = None) -> bool:
    """Apply the settings above to this process (children forked later inherit them).
    True when applied; False when switched off or not glibc."""
    env = os.environ if env is None else env
    if env.get("CASCADE_MALLOC_TUNE", "1") == "0":
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and \
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not ok:
        log.warning("mallopt refused the serving settings; glibc defaults stay")
    return ok
