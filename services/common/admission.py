"""Arrival time and overload shedding: a request's budget starts when its first byte arrives,
and a worker past what it can answer in time says 503 at once instead of queueing.

Why both: under overload an asyncio server keeps accepting; every admitted request then waits
behind the others, so latency grows without bound while all of them still "succeed", late. A
frontend has moved on by then, so the work is wasted. Instead:

- `ArrivalHttpToolsProtocol` (uvicorn's httptools protocol) stamps each request's scope with
  `time.monotonic()` when its first byte is parsed, before it waits for the event loop; the
  cascade's deadline starts there (`arrived(scope)`).
- `Admission` bounds the requests in flight per worker. The bound adapts (AIMD on latency):
  it shrinks while answers come back slower than `target_ms`, and grows again while they are
  fast, between `min_limit` and `max_limit`. A request that already waited more than
  `max_wait_ms` before its handler could start is shed too: it could not make its budget.
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

    def try_enter(self, arrived_at: float, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        if self.in_flight >= int(self.limit) or \
                (now - arrived_at) * 1000.0 > self.config.max_wait_ms:
            self.shed += 1
            return False
        self.in_flight += 1
        self.admitted += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        return True

    def leave(self, latency_ms: float) -> None:
        """A request finished after `latency_ms` (from arrival): adapt the bound."""
        self.in_flight -= 1
        cfg = self.config
        if latency_ms > cfg.target_ms:
            self.limit = max(float(cfg.min_limit), self.limit * 0.9)
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
        start = arrived(scope)
        scope.setdefault("extensions", {})[ARRIVED] = start
        if not gate.try_enter(start):
            if self.on_shed is not None:
                self.on_shed(scope["path"])
            await _overloaded(send, gate.config.retry_after_s)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            gate.leave((time.monotonic() - start) * 1000.0)


async def _overloaded(send: Any, retry_after_s: int) -> None:
    body = orjson.dumps({"detail": "overloaded: this worker has as many requests in flight as "
                                  "it can answer within their budget; retry later",
                         "field": ""})
    await send({"type": "http.response.start", "status": 503,
                "headers": [(b"content-type", b"application/json"),
                            (b"retry-after", str(retry_after_s).encode()),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
