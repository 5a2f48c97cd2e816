"""Serving holds every native compute pool to its thread count, even numpy's, which the CLI
loads before `cascade serve` can set the environment (services.common.threads)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from services.common.threads import THREAD_ENV

PROBE = """
import json, os
from cli.main import _register_commands
_register_commands()  # as `cascade` does: the command modules import numpy
from services.common.threads import native_pools
before = native_pools()
from cli.commands_serve import _thread_env
_thread_env(1)
import faiss, torch  # loaded after: they read the environment _thread_env set
print(json.dumps({"cpus": os.cpu_count(), "before": before, "after": native_pools()}))
"""


def test_serving_holds_numpys_blas_and_every_later_pool_to_one_thread() -> None:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_ENV}  # a user's shell
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    blas = [p for p in report["before"] if p["internal_api"] == "openblas"]
    assert blas, "numpy's OpenBLAS was not loaded by the CLI's imports"
    if report["cpus"] > 1:  # the condition this guards against: a pool per core
        assert max(p["num_threads"] for p in blas) > 1
    after = report["after"]
    assert {p["internal_api"] for p in after} >= {"openblas", "openmp"}
    assert all(p["num_threads"] == 1 for p in after), after
