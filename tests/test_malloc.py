"""Serving's malloc setting (services.common.malloc): a freed activation-sized block is reused,
so a request no longer faults its tensors in page by page. Counted in page faults, not time."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import json, resource, sys
import numpy as np
from services.common.malloc import tune_malloc
applied = tune_malloc()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def request():  # a rank call's activations: a few 0.6-1.25 MiB tensors alive at once
    live = [np.ones((50, 200, width), np.float32) for width in (32, 32, 16, 32, 16, 32)]
    return sum(float(t[0, 0, 0]) for t in live)
for _ in range(5):  # warm: the first touches fault in any case
    request()
before = faults()
for _ in range(100):
    request()
print(json.dumps({"applied": applied, "faults_per_request": (faults() - before) / 100}))
"""


def _probe(tune: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE], env={"CASCADE_MALLOC_TUNE": tune},
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_a_freed_activation_block_is_reused_instead_of_faulted_in_again() -> None:
    default, tuned = _probe("0"), _probe("1")
    assert not default["applied"] and tuned["applied"]
    # glibc's defaults: the freed 6 MiB are handed back, then faulted in again page by page
    assert default["faults_per_request"] > 100
    assert tuned["faults_per_request"] < 5
