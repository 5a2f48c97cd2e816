"""The stage client's circuit breaker: its state machine, and against a real stage process that
is stopped (SIGSTOP) and continued: calls fail fast while it is open, a probe closes it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest

from services.common import wire
from services.common.deadline import Deadline
from services.gateway.breaker import (
    CLOSED,
    HALF_OPEN,
    OPEN,
    BreakerConfig,
    BreakerOpen,
    CircuitBreaker,
)
from services.gateway.clients import HttpStage, StageSkipped
from services.stack.launcher import free_port

CASCADE = str(Path(sys.executable).with_name("cascade"))
INTERNAL = "breaker-internal-key-01"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_consecutive_failures_and_a_probe_closes_it() -> None:
    clock = Clock()
    breaker = CircuitBreaker("rank", BreakerConfig(failures=3, open_s=2.0), clock)
    for _ in range(2):
        breaker.before_call()
        breaker.failure()
    breaker.before_call()
    breaker.success()  # a success resets the count
    for _ in range(3):
        breaker.before_call()
        breaker.failure()
    assert breaker.state == OPEN and breaker.opened == 1
    with pytest.raises(BreakerOpen):
        breaker.before_call()
    clock.now = 2.0
    assert breaker.state == HALF_OPEN
    breaker.before_call()  # the probe
    with pytest.raises(BreakerOpen):
        breaker.before_call()  # only one probe at a time
    breaker.failure()  # the probe failed: open again for open_s
    assert breaker.state == OPEN
    clock.now = 4.0
    breaker.before_call()
    breaker.success()
    assert breaker.state == CLOSED
    breaker.before_call()


@pytest.mark.slow
@pytest.mark.anyio
async def test_stopped_stage_is_skipped_fast_then_probed_back(tiny_bundle: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASCADE_")}
    env.update(CASCADE_INTERNAL_KEY=INTERNAL, CASCADE_TORCH_THREADS="1")
    proc = subprocess.Popen([CASCADE, "serve", "prerank", "--bundle", str(tiny_bundle),
                             "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    client = HttpStage("prerank", url, "/v1/prerank", wire.PrerankResponse, admin_key=INTERNAL,
                       breaker=BreakerConfig(failures=3, open_s=0.5))
    ad_ids = pq.read_table(f"{tiny_bundle}/current/catalog.parquet",
                           columns=["ad_id"]).column("ad_id").to_pylist()[:50]
    request = wire.PrerankRequest(scene="search", k=10, ad_ids=ad_ids)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        assert len((await client.call(request, Deadline.after_ms(5000))).ad_ids) == 10

        os.kill(proc.pid, signal.SIGSTOP)
        for _ in range(3):  # each waits out its 150 ms budget
            with pytest.raises(Exception):  # noqa: B017 - a timeout, whatever its class
                await client.call(request, Deadline.after_ms(150))
        assert client.breaker.state == OPEN
        started = time.perf_counter()
        for _ in range(20):
            with pytest.raises(StageSkipped):
                await client.call(request, Deadline.after_ms(150))
        assert (time.perf_counter() - started) / 20 < 0.005  # no waiting while open

        os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.6)  # open_s passed: the next call is a probe, and succeeds
        assert len((await client.call(request, Deadline.after_ms(5000))).ad_ids) == 10
        assert client.breaker.state == CLOSED
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        await client.close()
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
