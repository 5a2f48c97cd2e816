"""What /readyz says about the gateway, and the same facts as Prometheus gauges.

Ready means this process can serve a correct answer now:
- every stage has a bundle loaded and answers its own /readyz (a stage whose circuit breaker is
  open still counts as ready: the cascade answers degraded without it, so pulling the gateway
  out would only make things worse);
- the catalog snapshot is not empty;
- the store has data: a Redis that restarted empty has lost budgets, spend and caps, so serving
  from it would be wrong (`cascade load-store` makes it ready again);
- the store answers, or stopped answering less than `store_grace_s` ago. A blip keeps every
  gateway in rotation (events answer 503 + Retry-After meanwhile, ads keep serving from the
  snapshots); an outage longer than the grace takes them out. Either way the body says so.

The body also carries the event worker's lag (seconds since its last completed pass) and its
counters, and each stage's breaker state, for operators.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from prometheus_client import Gauge

STORE_GRACE_S = 30.0
STORE_PROBE_TIMEOUT_S = 0.5


class GatewayHealth:
    """Probes the store, reads the worker and the stages; `check()` -> (ready, body)."""

    def __init__(self, gateway: Any, *, store_grace_s: float = STORE_GRACE_S,
                 probe_timeout_s: float = STORE_PROBE_TIMEOUT_S) -> None:
        self.gateway = gateway
        self.store_grace_s = store_grace_s
        self.probe_timeout_s = probe_timeout_s
        self._down_since: float | None = None
        registry = gateway.metrics.registry
        self.g_ready = Gauge("cascade_gateway_ready", "1 when /readyz answers 200",
                             registry=registry)
        self.g_store_up = Gauge("cascade_gateway_store_up", "1 when the store answers PING",
                                registry=registry)
        self.g_store_loaded = Gauge("cascade_gateway_store_loaded",
                                    "1 when the store holds a catalog", registry=registry)
        self.g_worker_lag = Gauge("cascade_gateway_worker_lag_seconds",
                                  "Seconds since the event worker last completed a pass",
                                  registry=registry)
        self.g_breaker = Gauge("cascade_gateway_breaker_open",
                               "1 while a stage client's circuit breaker is open", ("stage",),
                               registry=registry)

    async def _probe_store(self) -> tuple[bool, bool]:
        """(answers, holds a catalog) within the probe timeout."""
        store = self.gateway.store
        try:
            async with asyncio.timeout(self.probe_timeout_s):
                await store.ping()
                loaded = await store.catalog_version() > 0
            return True, loaded
        except Exception:  # noqa: BLE001 - any failure means "does not answer"
            return False, False

    async def check(self) -> tuple[bool, dict[str, Any]]:
        parts = await self.gateway.ready()  # stages and catalog: name -> bool
        ok = all(parts.values())
        body: dict[str, Any] = dict(parts)

        up, loaded = await self._probe_store()
        now = time.monotonic()
        if up:
            self._down_since = None
        elif self._down_since is None:
            self._down_since = now
        down_s = 0.0 if self._down_since is None else now - self._down_since
        if not up:
            status = "unreachable"
        else:
            status = "ok" if loaded else "empty"
        store_ok = (up and loaded) or (not up and down_s < self.store_grace_s)
        body["store"] = {"status": status, "down_s": round(down_s, 3), "ready": store_ok,
                         "grace_s": self.store_grace_s}
        ok = ok and store_ok

        worker = self.gateway.worker
        lag = now - worker.last_ok
        body["worker"] = {"lag_s": round(lag, 3), "applied": worker.stats.applied,
                          "repeated": worker.stats.repeated,
                          "malformed": worker.stats.malformed}
        breakers = {}
        for name, client in self.gateway.stages.all().items():
            breaker = getattr(client, "breaker", None)
            state = breaker.state if breaker is not None else "closed"
            breakers[name] = state
            self.g_breaker.labels(name).set(1.0 if state == "open" else 0.0)
        body["breakers"] = breakers

        self.g_ready.set(1.0 if ok else 0.0)
        self.g_store_up.set(1.0 if up else 0.0)
        self.g_store_loaded.set(1.0 if loaded else 0.0)
        self.g_worker_lag.set(lag)
        return ok, {"ready": ok, **body}
