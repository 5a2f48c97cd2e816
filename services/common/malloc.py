"""glibc malloc settings for serving processes: keep freed large blocks for the next request.

Why: a rank call allocates a dozen activation tensors of 0.3-1.3 MB ([history, candidates,
hidden] floats). With glibc's defaults a block over the mmap threshold (128 KiB at first) is
mmapped and unmapped per use, and the heap top is trimmed past twice the threshold, so until
the dynamic threshold has caught up with the largest tensors a process faults its activations
in page by page on every call (`tests/test_malloc.py`: 1,531 faults per call in its pattern,
0 with these settings). What that is worth, measured on the 2-core box:
- a fresh process (DIN+ESMM 200 x 50, one thread, 50 requests x 5 rounds, 4 alternating runs
  each): 4.4 / 4.8 / 6.1 / 7.1 ms per call with the defaults, 4.3 / 4.6 / 4.5 / 4.1 ms with
  these settings; under CPU contention (a training job beside it) 10.2-10.7 against 4.7-5.0 ms;
- a long-running worker (`cascade serve all`, 1M ads, 30 rps): nothing measurable, about one
  fault and 23-24 ms of CPU per request either way, because by then glibc's dynamic threshold
  has adapted.
So the setting makes a worker's speed independent of its allocation history (start-up, a
reload, `cascade bench stages`), not faster in steady state.

The settings: blocks up to `MMAP_THRESHOLD` come from the heap and are reused after `free`,
and up to `TRIM_THRESHOLD` of free heap top is kept instead of handed back. Setting either
also turns off glibc's dynamic threshold. The cost is memory a worker keeps after a peak (per
malloc arena, bounded by the peak itself). `CASCADE_MALLOC_TUNE=0` leaves glibc's defaults;
other C libraries are left alone.
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


def tune_malloc() -> bool:
    """Apply the settings above to this process (children forked later inherit them).
    True when applied; False when switched off or not glibc."""
    if os.environ.get("CASCADE_MALLOC_TUNE", "1") == "0":
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
