"""Serving holds every native compute pool to its thread count, even numpy's, which the CLI
loads before `cascade serve` can set the environment (services.common.threads)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from services.common.threads import (
    STAGE_NICE_ENV,
    THREAD_ENV,
    lower_this_thread,
    lower_this_thread_once,
    stage_nice,
)
from services.gateway.clients import LocalStage

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


def test_stage_threads_run_below_the_event_loop_and_the_setting_is_checked(monkeypatch) -> None:
    """The gateway's in-process stage threads yield the core to the event loop (admission and
    shedding go first); CASCADE_STAGE_NICE sets by how much, 0 turns it off, junk is refused."""
    def thread_nice() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    loop_nice = thread_nice()
    for setting, expected in (("7", min(19, loop_nice + 7)), ("0", loop_nice)):
        monkeypatch.setenv(STAGE_NICE_ENV, setting)
        stage = LocalStage("probe", state=None)
        try:
            assert stage._executor.submit(thread_nice).result(timeout=10) == expected
        finally:
            stage._executor.shutdown()
    assert thread_nice() == loop_nice  # the calling thread itself is untouched
    for junk in ("-1", "20", "high"):
        monkeypatch.setenv(STAGE_NICE_ENV, junk)
        with pytest.raises(ValueError, match=STAGE_NICE_ENV):
            stage_nice()
    assert lower_this_thread(0) == 0

    def twice() -> int:  # a reused pool thread (anyio's, in the stage services) lowers once
        lower_this_thread_once(3)
        lower_this_thread_once(3)
        return thread_nice()

    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(twice).result(timeout=10) == min(19, loop_nice + 3)
