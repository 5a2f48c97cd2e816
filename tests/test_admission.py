"""Admission control: the request's start (parse stamp or the sender's `X-Request-Start`), and
the adaptive in-flight bound, unit by unit and through a real uvicorn server."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn

from services.common.admission import (
    ARRIVED,
    MAX_HEADER_AGE_S,
    Admission,
    AdmissionConfig,
    AdmissionMiddleware,
    parse_request_start,
    request_start,
)
from services.common.prefork import uvicorn_options


@pytest.mark.parametrize("value, expected", [
    (b"t=1700000000.250", 1700000000.25),  # nginx t=${msec}: seconds with milliseconds
    (b"1700000000250", 1700000000.25),  # milliseconds
    (b"t=1700000000250000", 1700000000.25),  # microseconds
    ("1700000000.5", 1700000000.5),
])
def test_request_start_formats(value: bytes | str, expected: float) -> None:
    assert parse_request_start(value) == pytest.approx(expected)


@pytest.mark.parametrize("value", [b"", b"t=", b"soon", b"t=-5", b"nan"])
def test_request_start_garbage_is_none(value: bytes) -> None:
    assert parse_request_start(value) is None


def _scope(parsed_at: float, header: bytes | None) -> dict:
    headers = [(b"x-request-start", header)] if header is not None else []
    return {"type": "http", "headers": headers, "extensions": {ARRIVED: parsed_at}}


def test_the_earlier_of_parse_stamp_and_header_starts_the_deadline() -> None:
    now_wall, now_mono = 1_800_000_000.0, 500.0
    parsed = now_mono - 0.001
    sent_120ms_ago = f"t={now_wall - 0.120:.3f}".encode()
    start = request_start(_scope(parsed, sent_120ms_ago), now_wall, now_mono)
    assert start == pytest.approx(now_mono - 0.120)
    # a header later than the parse stamp (clocks a little apart) never moves the start later
    sent_just_now = f"t={now_wall:.3f}".encode()
    assert request_start(_scope(parsed, sent_just_now), now_wall, now_mono) == parsed
    # from the future, or older than any queue could be: a clock problem, ignored
    future = f"t={now_wall + 5:.3f}".encode()
    ancient = f"t={now_wall - MAX_HEADER_AGE_S - 1:.3f}".encode()
    for header in (future, ancient, b"garbage", None):
        assert request_start(_scope(parsed, header), now_wall, now_mono) == parsed


def test_one_stall_shrinks_the_bound_once_not_once_per_request() -> None:
    cfg = AdmissionConfig(target_ms=20, max_wait_ms=1e9, min_limit=2, max_limit=64,
                          initial_limit=8)
    gate = Admission(cfg)
    now = time.monotonic()
    tickets = [gate.try_enter(now, now) for _ in range(8)]
    assert all(t is not None for t in tickets) and gate.try_enter(now, now) is None
    for ticket in tickets:  # a stall: all eight come back late
        gate.leave(900.0, ticket)
    assert gate.limit == pytest.approx(8 * 0.9)
    # a request admitted after that shrink, also late, may shrink it again
    late = gate.try_enter(now, now)
    gate.leave(900.0, late)
    assert gate.limit == pytest.approx(8 * 0.9 * 0.9)
    # fast answers grow it back additively
    for _ in range(20):
        gate.leave(1.0, gate.try_enter(now, now))
    assert gate.limit > 8 * 0.9 * 0.9


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _ok_app(scope, receive, send) -> None:
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture
def gated_server() -> Iterator[tuple[str, Admission]]:
    """A real uvicorn server (the project's own protocol and options) behind the middleware."""
    gate = Admission(AdmissionConfig(max_wait_ms=15.0))
    app = AdmissionMiddleware(_ok_app, {"/v1/ads": gate})
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, **{**uvicorn_options("127.0.0.1", port),
                                                   "loop": "asyncio", "lifespan": "off"}))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", gate
    server.should_exit = True
    thread.join(timeout=5)


def test_a_request_queued_upstream_past_max_wait_is_shed_over_http(gated_server) -> None:
    """Time the sender says the request already spent (in a proxy, in the kernel's buffers)
    counts: past `max_wait_ms` it is a 503 with Retry-After; a fresh one is answered."""
    url, gate = gated_server

    async def run() -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=5) as client:
            stale = await client.post("/v1/ads", headers={
                "X-Request-Start": f"t={time.time() - 0.200:.3f}"})
            fresh = await client.post("/v1/ads", headers={
                "X-Request-Start": f"t={time.time():.3f}"})
            plain = await client.post("/v1/ads")
            return stale, fresh, plain

    stale, fresh, plain = asyncio.run(run())
    assert stale.status_code == 503 and stale.headers["retry-after"] == "1"
    assert "overloaded" in stale.json()["detail"]
    assert fresh.status_code == 200 and plain.status_code == 200
    # The client can hold the last byte before the server thread has left the middleware.
    deadline = time.monotonic() + 5
    while gate.in_flight and time.monotonic() < deadline:
        time.sleep(0.01)
    assert gate.shed == 1 and gate.admitted == 2 and gate.in_flight == 0


def test_workers_are_pinned_one_per_core_only_when_they_fill_the_cores_exactly() -> None:
    from services.common.prefork import worker_cpus

    assert worker_cpus(2, [3, 1]) == [1, 3]
    assert worker_cpus(2, [0, 1, 2, 3]) == [None, None]  # a container seeing the node's cores
    assert worker_cpus(1, [5]) == [5]  # `taskset -c 5 cascade serve all --workers 1`
    assert worker_cpus(3, [0, 1], "1") == [0, 1, 0]
    assert worker_cpus(2, [0, 1], "0") == [None, None]
    with pytest.raises(ValueError, match="CASCADE_PIN_WORKERS"):
        worker_cpus(2, [0, 1], "yes")


@pytest.mark.parametrize("budget_ms, settings, target_ms, max_wait_ms", [
    (25.0, {}, 20.0, 15.0),  # the overload benchmark's budget: the values it was tuned at
    (50.0, {}, 40.0, 30.0),  # the default budget: a share of it, not 25 ms's fixed values
    (50.0, {"latency_target_ms": 30, "max_queue_ms": 12}, 30.0, 12.0),  # settings win
])
def test_shedding_knobs_follow_the_default_budget_unless_set(budget_ms, settings, target_ms,
                                                             max_wait_ms) -> None:
    from services.gateway.cascade import GatewayConfig

    knobs = GatewayConfig.from_dict(settings).admission(budget_ms)
    assert knobs.target_ms == pytest.approx(target_ms)
    assert knobs.max_wait_ms == pytest.approx(max_wait_ms)
