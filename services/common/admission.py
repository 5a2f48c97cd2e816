"""Arrival time and overload shedding: a request's budget starts when its first byte arrives,
and a worker past what it can answer in time says 503 at once instead of queueing.

Why both: under overload an asyncio server keeps accepting; every admitted request then waits
behind the others, so latency grows without bound while all of them still "succeed", late. A
frontend has moved on by then, so the work is wasted. Instead:

- `ArrivalHttpToolsProtocol` (uvicorn's httptools protocol) stamps each request's scope with
  `time.monotonic()` when its first byte is parsed, before it waits for the event loop; the
  cascade's deadline starts there (`arrived(scope)`).
- A frontend or proxy that knows better says so in `X-Request-Start` (the convention of
  nginx's `t=${msec}`, Heroku's router and APM agents): its wall-clock time when the request
  left it. The byte-parse stamp cannot see time spent in the kernel's socket buffers while the
  worker was busy (under overload that is most of the wait), so the earlier of the two starts
  the deadline. A header more than `MAX_HEADER_AGE_S` old, or from the future, is a clock
  problem, not a queue, and is ignored.
- `Admission` bounds the requests in flight per worker. The bound adapts (AIMD on latency):
  it shrinks while answers come back slower than `target_ms`, and grows again while they are
  fast, between `min_limit` and `max_limit`. As in TCP, it shrinks at most once per window:
  only an answer admitted after the last shrink can shrink it again, so one stall that makes
  every request in flight late costs one decrease, not one per request (that collapse left the
  bound at its floor, shedding for a second after each stall). A request that already waited
  more than `max_wait_ms` before its handler could start is shed too: it could not make its
  budget.
- `AdmissionMiddleware` (pure ASGI, so a shed request costs no routing, body read or
  validation) answers a shed request `503` with `Retry-After` before reading its body: nothing
  is logged, served or charged for it.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

ARRIVED = "cascade.arrived"
REQUEST_START_HEADER = b"x-request-start"
MAX_HEADER_AGE_S = 60.0
Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
                   Awaitable[None]]


class ArrivalHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, plus the arrival time of each request in its scope."""

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope.setdefault("extensions", {})[ARRIVED] = time.monotonic()


def arrived(scope: Mapping[str, Any]) -> float:
    """When the request's first byte was parsed (monotonic); now when the server did not
    stamp it (another protocol, the test client)."""
    stamped = (scope.get("extensions") or {}).get(ARRIVED)
    return float(stamped) if stamped is not None else time.monotonic()


def parse_request_start(value: bytes | str) -> float | None:
    """Wall-clock seconds from an `X-Request-Start` value: `t=1700000000.123` (seconds, as
    nginx writes `t=${msec}`), or an integer in milliseconds or microseconds (`t=` optional),
    told apart by magnitude. None when it is not a number."""
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    text = text.strip()
    if text.startswith("t="):
        text = text[2:]
    try:
        number = float(text)
    except ValueError:
        return None
    if number != number or number <= 0:  # NaN or nonsense
        return None
    if number > 1e14:  # microseconds since the epoch
        return number / 1e6
    if number > 1e11:  # milliseconds since the epoch
        return number / 1e3
    return number


def request_start(scope: Mapping[str, Any], now_wall: float | None = None,
                  now_mono: float | None = None) -> float:
    """The request's start on the monotonic clock: the earlier of the byte-parse stamp and the
    sender's `X-Request-Start` (see the module docstring)."""
    parsed = arrived(scope)
    header = next((v for k, v in scope.get("headers") or () if k == REQUEST_START_HEADER), None)
    if header is None:
        return parsed
    sent = parse_request_start(header)
    if sent is None:
        return parsed
    now_wall = time.time() if now_wall is None else now_wall
    now_mono = time.monotonic() if now_mono is None else now_mono
    age = now_wall - sent
    if not 0.0 <= age <= MAX_HEADER_AGE_S:
        return parsed
    return min(parsed, now_mono - age)


@dataclass
class AdmissionConfig:
    """One endpoint's admission knobs (per worker)."""

    target_ms: float = 25.0  # answers slower than this shrink the in-flight bound
    max_wait_ms: float = 20.0  # a request that waited longer before starting is shed
    min_limit: int = 2
    max_limit: int = 64
    initial_limit: int = 8
    retry_after_s: int = 1


class Admission:
    """An adaptive bound on requests in flight (see the module docstring)."""

    def __init__(self, config: AdmissionConfig | None = None) -> None:
        self.config = config or AdmissionConfig()
        self.limit = float(self.config.initial_limit)
        self.in_flight = 0
        self.max_in_flight = 0
        self.admitted = 0
        self.shed = 0
        self._shrunk_at = 0  # `admitted` count when the bound last shrank

    def try_enter(self, arrived_at: float, now: float | None = None) -> int | None:
        """The admission's ticket (its sequence number), or None when it is shed."""
        now = time.monotonic() if now is None else now
        if self.in_flight >= int(self.limit) or \
                (now - arrived_at) * 1000.0 > self.config.max_wait_ms:
            self.shed += 1
            return None
        self.in_flight += 1
        self.admitted += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        return self.admitted

    def leave(self, latency_ms: float, ticket: int | None = None) -> None:
        """A request admitted with `ticket` finished after `latency_ms` (from arrival): adapt
        the bound; a late answer admitted before the last shrink does not shrink it again."""
        self.in_flight -= 1
        cfg = self.config
        if latency_ms > cfg.target_ms:
            if ticket is None or ticket > self._shrunk_at:
                self.limit = max(float(cfg.min_limit), self.limit * 0.9)
                self._shrunk_at = self.admitted
        else:
            self.limit = min(float(cfg.max_limit), self.limit + 1.0 / max(self.limit, 1.0))


class AdmissionMiddleware:
    """Shed past each path's `Admission` bound with 503 + Retry-After (see module docstring)."""

    def __init__(self, app: ASGIApp, gates: Mapping[str, Admission],
                 on_shed: Callable[[str], None] | None = None) -> None:
        self.app = app
        self.gates = dict(gates)
        self.on_shed = on_shed

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        gate = self.gates.get(scope.get("path", "")) if scope["type"] == "http" else None
        if gate is None:
            await self.app(scope, receive, send)
            return
        start = request_start(scope)
        scope.setdefault("extensions", {})[ARRIVED] = start
        ticket = gate.try_enter(start)
        if ticket is None:
            if self.on_shed is not None:
                self.on_shed(scope["path"])
            await _overloaded(send, gate.config.retry_after_s)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            gate.leave((time.monotonic() - start) * 1000.0, ticket)


async def _overloaded(send: Any, retry_after_s: int) -> None:
    body = orjson.dumps({"detail": "overloaded: this worker has as many requests in flight as "
                                  "it can answer within their budget; retry later",
                         "field": ""})
    await send({"type": "http.response.start", "status": 503,
                "headers": [(b"content-type", b"application/json"),
                            (b"retry-after", str(retry_after_s).encode()),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
