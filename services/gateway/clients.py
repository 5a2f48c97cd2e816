"""Stage clients: one interface per stage, in-process or over HTTP; the cascade sees only this.

`StageClient.call(request, deadline)` returns the stage's response or raises; the cascade
decides what a failure means (skip the stage, keep the previous order). Two implementations:

- `LocalStage`: the stage's state object in this process (`state.handle(request, deadline)`),
  run on a small thread pool so faiss/torch never block the event loop. The state is held by
  reference and swapped whole on reload, so in-flight calls finish on the old bundle.
- `HttpStage`: the stage's replicas over HTTP, each with its own `httpx.AsyncClient` (pooled
  keep-alive connections), protobuf bodies (candidate lists are packed bytes), the remaining
  budget in `X-Cascade-Budget-Ms`, and a timeout equal to that remaining budget. A circuit
  breaker per replica (services/gateway/breaker.py) stops calling a replica after a few
  consecutive failures or timeouts and probes it again, so a hung replica costs each request
  nothing instead of its whole budget.

Replicas (`CASCADE_RANK_URL=http://a:8003,http://b:8003`, or one DNS name such as a Kubernetes
headless Service, `http://rank-headless:8003`, re-resolved every `resolve_s` so autoscaled pods
get traffic): the balancing is client-side because keep-alive connections to one ClusterIP stick
to whichever pod answered first. Each call goes to the replica with the fewest calls in flight
(ties in turn): unlike round-robin it steers around a slow replica (a noisy neighbour, a CPU pod
beside GPU ones) at the cost of one counter per replica. A replica whose breaker is open is
skipped; when all are, the call raises `StageSkipped` and the cascade's fallback applies.
Catalog updates and reloads go to every replica (the set re-resolved first).

A thread cannot be cancelled, so a hung in-process stage keeps its worker thread until its own
deadline check lets it go; the cascade stops waiting at the deadline either way.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, Protocol, TypeVar
from urllib.parse import urlsplit, urlunsplit

import anyio
import anyio.to_thread
import httpx

from services.common import wire
from services.common.bundle_guard import bundle_schema_sha256, check_same_schema
from services.common.deadline import Deadline, DeadlineExceeded
from services.common.stage_app import pinned_state
from services.common.threads import init_stage_thread, stage_nice
from services.gateway.breaker import BreakerConfig, BreakerGroup, BreakerOpen, CircuitBreaker

Req = TypeVar("Req", bound=wire.WireModel)
Resp = TypeVar("Resp", bound=wire.WireModel)
T = TypeVar("T")

log = logging.getLogger(__name__)

RESOLVE_S = 5.0  # how often a stage's DNS name is resolved again (new or gone pods)


class StageError(RuntimeError):
    """A stage answered with an error, or could not be reached; the message says which."""


class StageSkipped(StageError):
    """Not called: the stage's circuit breaker is open."""


class StageClient(Protocol[Req, Resp]):
    """What the cascade needs from a stage, wherever it runs."""

    name: str

    async def call(self, request: Req, deadline: Deadline) -> Resp: ...
    async def update(self, update: wire.CatalogUpdate) -> wire.CatalogUpdateResponse | None: ...
    async def reload(self, bundle: str | None) -> wire.ReloadResponse: ...
    # The two-phase reload the gateway drives (admin.py): every stage or none switches.
    async def prepare(self, bundle: str | None) -> wire.ReloadResponse: ...
    async def commit(self) -> wire.ReloadResponse: ...
    async def abort(self) -> None: ...
    async def rollback(self) -> wire.ReloadResponse: ...
    async def ready(self) -> bool: ...
    async def close(self) -> None: ...


class LocalStage(Generic[Req, Resp]):
    """A stage state in this process. `loader(bundle_path) -> state` for reloads."""

    def __init__(self, name: str, state: Any, loader: Callable[[str], Any] | None = None,
                 bundle: str | None = None, threads: int = 4) -> None:
        self.name = name
        self.state = state
        self.loader = loader
        self.bundle = bundle
        # its own small pool (threads start lazily, after a pre-fork): an executor hop costs
        # half of anyio's to_thread, and it is paid three times per request
        self._executor = ThreadPoolExecutor(max_workers=threads,
                                            thread_name_prefix=f"cascade-{name}",
                                            initializer=init_stage_thread,
                                            initargs=(name, stage_nice()))
        self._reload_lock = threading.Lock()
        # the schema of the bundle being served, recorded now: `current` may move later
        self.schema_sha256 = bundle_schema_sha256(bundle) if bundle else None
        self._staged: tuple[Any, str, str | None] | None = None  # prepared, not yet served
        self._previous: tuple[Any, str | None, str | None] | None = None  # before the commit

    @property
    def version(self) -> str:
        return str(getattr(self.state, "version", ""))

    async def call(self, request: Req, deadline: Deadline) -> Resp:
        # one reference for the whole call (atomic swap on reload); a request pinned to the
        # version before a commit still in progress elsewhere is scored by that one
        previous = self._previous[0] if self._previous is not None else None
        state = pinned_state(self.state, previous, getattr(request, "model_version", ""))

        def work() -> Resp:
            if deadline.expired:
                raise DeadlineExceeded(f"{self.name}: deadline passed while queued")
            return state.handle(request, deadline)

        # a cancelled wait (deadline) abandons the thread's work; it stops at its own checks
        return await asyncio.get_running_loop().run_in_executor(self._executor, work)

    async def update(self, update: wire.CatalogUpdate) -> wire.CatalogUpdateResponse | None:
        method = getattr(self.state, "update", None)
        if method is None:
            return None
        return await anyio.to_thread.run_sync(method, update)

    async def reload(self, bundle: str | None) -> wire.ReloadResponse:
        await self.prepare(bundle)
        return await self.commit()

    async def prepare(self, bundle: str | None) -> wire.ReloadResponse:
        """Load and verify `bundle` beside the served state; serve it only on `commit`."""
        if self.loader is None:
            raise StageError(f"{self.name}: no loader configured, cannot reload")
        path = bundle or self.bundle
        if not path:
            raise StageError(f"{self.name}: no bundle given and none configured")
        if not self._reload_lock.acquire(blocking=False):
            raise StageError(f"{self.name}: another reload is in progress")
        try:
            # SchemaMismatch (a ValueError) before anything is loaded
            schema = check_same_schema(self.schema_sha256, path)
            state = await anyio.to_thread.run_sync(self.loader, path)
            self._staged = (state, path, schema)
            return wire.ReloadResponse(version=str(state.version), previous=self.version)
        finally:
            self._reload_lock.release()

    async def commit(self) -> wire.ReloadResponse:
        staged, self._staged = self._staged, None
        if staged is None:
            raise StageError(f"{self.name}: nothing prepared to commit")
        previous = self.version
        self._previous = (self.state, self.bundle, self.schema_sha256)
        self.state, self.bundle, self.schema_sha256 = staged
        return wire.ReloadResponse(version=self.version, previous=previous)

    async def abort(self) -> None:
        self._staged = None

    async def rollback(self) -> wire.ReloadResponse:
        if self._previous is None:
            raise StageError(f"{self.name}: no previous state to roll back to")
        current = self.version
        (self.state, self.bundle, self.schema_sha256), self._previous = self._previous, None
        return wire.ReloadResponse(version=self.version, previous=current)

    async def ready(self) -> bool:
        return self.state is not None

    async def close(self) -> None:
        return None


def replica_urls(setting: str) -> list[str]:
    """The URLs in a stage URL setting: one, or a comma-separated list (blanks ignored)."""
    urls = [part.strip().rstrip("/") for part in setting.split(",") if part.strip()]
    if not urls:
        raise ValueError(f"no URL in stage setting {setting!r}")
    return urls


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _with_host(url: str, ip: str) -> str:
    parts = urlsplit(url)
    host = f"[{ip}]" if ":" in ip else ip
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def pick_addresses(infos: list[tuple]) -> list[str]:
    """Distinct addresses from getaddrinfo, IPv4 first-class: `localhost` gives ::1 and
    127.0.0.1, and a server bound to 0.0.0.0 answers only the second."""
    v4 = sorted({info[4][0] for info in infos if info[0] == socket.AF_INET})
    v6 = sorted({info[4][0] for info in infos if info[0] == socket.AF_INET6})
    return v4 or v6


class Replica:
    """One replica: its client, its breaker, and how many calls it has in flight."""

    def __init__(self, name: str, url: str, limits: httpx.Limits,
                 transport: httpx.AsyncBaseTransport | None, breaker: BreakerConfig | None) -> None:
        self.url = url
        self.breaker = CircuitBreaker(f"{name}@{url}", breaker)
        self.in_flight = 0
        self.client = httpx.AsyncClient(base_url=url, limits=limits, transport=transport,
                                        timeout=10.0)


class HttpStage(Generic[Req, Resp]):
    """A stage behind HTTP, over one or more replicas: POST `path` with a protobuf body."""

    def __init__(self, name: str, base_url: str, path: str, response: type[Resp], *,
                 admin_key: str | None = None, encoding: str = wire.PROTOBUF,
                 max_connections: int = 64, transport: httpx.AsyncBaseTransport | None = None,
                 breaker: BreakerConfig | None = None, resolve_s: float = RESOLVE_S) -> None:
        self.name = name
        self.path = path
        self.response = response
        self.encoding = encoding
        self.admin_key = admin_key
        self.resolve_s = resolve_s
        self._breaker_config = breaker
        self._transport = transport
        self._limits = httpx.Limits(max_connections=max_connections,
                                    max_keepalive_connections=max_connections,
                                    keepalive_expiry=30.0)
        self.targets = replica_urls(base_url)
        # a DNS name is re-resolved (an injected transport, as in tests, has no DNS)
        self._names = [u for u in self.targets
                       if transport is None and not _is_ip(urlsplit(u).hostname or "")]
        self.replicas: list[Replica] = []
        self._retired: list[Replica] = []
        self._turn = 0
        self._resolved_at = time.monotonic()
        self._resolving: asyncio.Task[None] | None = None
        self._apply(self._resolve_blocking() or [])
        self.breaker = BreakerGroup(lambda: [r.breaker for r in self.replicas])

    # ----- replica discovery ----------------------------------------------------------------
    def _expand(self, url: str, addresses: list[str] | None) -> list[str]:
        """A URL as the replicas it names: itself, or one URL per address it resolves to."""
        if url not in self._names or not addresses:
            return [url]  # an IP, or a name that did not resolve (httpx tries it per call)
        return [_with_host(url, ip) for ip in addresses]

    def _resolve_blocking(self, keep_on_error: bool = False) -> list[str] | None:
        """The replica URLs now. A name that does not resolve stays as itself (httpx tries it
        per call), or with `keep_on_error` the whole answer is None: keep the replicas we have."""
        urls: list[str] = []
        for url in self.targets:
            addresses = None
            if url in self._names:
                parts = urlsplit(url)
                try:
                    addresses = pick_addresses(socket.getaddrinfo(
                        parts.hostname, parts.port or 80, type=socket.SOCK_STREAM))
                except OSError:
                    if keep_on_error:
                        return None
            urls.extend(self._expand(url, addresses))
        return urls

    async def _resolve(self) -> list[str] | None:
        # getaddrinfo blocks: a worker thread, as asyncio's own loop.getaddrinfo does
        return await asyncio.to_thread(self._resolve_blocking, True)

    def _apply(self, urls: list[str]) -> None:
        """Serve `urls` from now on: new replicas join, gone ones retire (closed when idle)."""
        current = {r.url: r for r in self.replicas}
        wanted = list(dict.fromkeys(urls))
        if wanted == list(current):
            return
        self.replicas = [current.get(u) or Replica(self.name, u, self._limits, self._transport,
                                                   self._breaker_config) for u in wanted]
        self._retired.extend(r for u, r in current.items() if u not in set(wanted))
        if self.replicas:
            log.info("%s: replicas %s", self.name, [r.url for r in self.replicas])

    async def refresh(self) -> None:
        """Re-resolve the DNS names now (also what a stale set triggers in the background)."""
        if self._names:
            urls = await self._resolve()
            if urls:
                self._apply(urls)
        self._resolved_at = time.monotonic()
        for replica in [r for r in self._retired if r.in_flight == 0]:
            self._retired.remove(replica)
            await replica.client.aclose()

    def _maybe_refresh(self) -> None:
        if (self._names and time.monotonic() - self._resolved_at >= self.resolve_s
                and (self._resolving is None or self._resolving.done())):
            self._resolved_at = time.monotonic()
            self._resolving = asyncio.get_running_loop().create_task(self.refresh())

    def _pick(self) -> Replica:
        """The replica with the fewest calls in flight whose breaker lets a call through."""
        replicas = self.replicas
        count = len(replicas)
        start, self._turn = self._turn, (self._turn + 1) % max(count, 1)
        order = sorted(range(count), key=lambda i: (replicas[i].in_flight, (i - start) % count))
        for i in order:
            try:
                replicas[i].breaker.before_call()
            except BreakerOpen:
                continue
            return replicas[i]
        raise StageSkipped(f"{self.name}: circuit breaker open on all {count} replica(s)")

    # ----- the request path -----------------------------------------------------------------
    def _admin_headers(self) -> dict[str, str]:
        """The internal key (CASCADE_INTERNAL_KEY): stage services refuse calls without it."""
        return {"X-API-Key": self.admin_key} if self.admin_key else {}

    async def call(self, request: Req, deadline: Deadline) -> Resp:
        remaining = deadline.remaining_s()
        if remaining <= 0:
            raise DeadlineExceeded(f"{self.name}: no budget left to call")
        self._maybe_refresh()
        replica = self._pick()
        replica.in_flight += 1
        try:
            response = await self._call(replica, request, deadline, remaining)
        except Exception:  # refused, unreachable, timed out, or an undecodable answer
            replica.breaker.failure()
            raise
        except asyncio.CancelledError:  # the cascade stopped waiting: at its deadline, a failure
            if deadline.expired:
                replica.breaker.failure()
            else:
                replica.breaker.release()
            raise
        finally:
            replica.in_flight -= 1
        replica.breaker.success()
        return response

    async def _call(self, replica: Replica, request: Req, deadline: Deadline,
                    remaining: float) -> Resp:
        headers = {"Content-Type": self.encoding, "Accept": self.encoding, **deadline.header(),
                   **self._admin_headers()}
        try:
            reply = await replica.client.post(
                self.path, content=wire.encode(request, self.encoding), headers=headers,
                timeout=None if remaining == float("inf") else remaining)
        except httpx.TimeoutException as exc:
            raise DeadlineExceeded(f"{self.name}: no answer within the budget") from exc
        except httpx.HTTPError as exc:
            raise StageError(f"{self.name} ({replica.url}): {type(exc).__name__}: {exc}") from exc
        if reply.status_code != 200:
            raise StageError(f"{self.name}: HTTP {reply.status_code}: {reply.text[:200]}")
        return wire.decode(self.response, reply.content, reply.headers.get("content-type"))

    # ----- fan-out to every replica ---------------------------------------------------------
    async def _each(self, send: Callable[[Replica], Awaitable[T]]) -> list[T]:
        """`send` to every replica at once (the set re-resolved first, so new pods are in);
        the first failure is raised once all have answered, naming the replica."""
        await self.refresh()
        replicas = list(self.replicas)
        answers = await asyncio.gather(*(send(r) for r in replicas), return_exceptions=True)
        for replica, answer in zip(replicas, answers, strict=True):
            if isinstance(answer, StageError):
                raise answer
            if isinstance(answer, httpx.HTTPError):
                raise StageError(f"{self.name} ({replica.url}): {type(answer).__name__}: "
                                 f"{answer}") from answer
            if isinstance(answer, BaseException):
                raise answer
        return list(answers)  # type: ignore[arg-type]

    async def update(self, update: wire.CatalogUpdate) -> wire.CatalogUpdateResponse | None:
        body = wire.encode(update)

        async def send(replica: Replica) -> wire.CatalogUpdateResponse | None:
            reply = await replica.client.post("/admin/ads", content=body,
                                              headers={"Content-Type": wire.JSON,
                                                       **self._admin_headers()})
            if reply.status_code == 404:  # a stage without catalog updates
                return None
            if reply.status_code != 200:
                raise StageError(f"{self.name} ({replica.url}): /admin/ads HTTP "
                                 f"{reply.status_code}: {reply.text[:200]}")
            return wire.decode(wire.CatalogUpdateResponse, reply.content, wire.JSON)

        return (await self._each(send))[0]

    async def reload(self, bundle: str | None) -> wire.ReloadResponse:
        return await self._admin("/admin/reload", bundle)

    async def prepare(self, bundle: str | None) -> wire.ReloadResponse:
        return await self._admin("/admin/reload/prepare", bundle)

    async def commit(self) -> wire.ReloadResponse:
        return await self._admin("/admin/reload/commit", None)

    async def abort(self) -> None:
        async def send(replica: Replica) -> None:
            reply = await replica.client.post("/admin/reload/abort",
                                              headers=self._admin_headers())
            if reply.status_code != 200:
                raise StageError(f"{self.name} ({replica.url}): abort HTTP "
                                 f"{reply.status_code}: {reply.text[:200]}")

        await self._each(send)

    async def rollback(self) -> wire.ReloadResponse:
        return await self._admin("/admin/reload/rollback", None)

    async def _admin(self, path: str, bundle: str | None) -> wire.ReloadResponse:
        body = wire.encode(wire.ReloadRequest(bundle=bundle or ""))

        async def send(replica: Replica) -> wire.ReloadResponse:
            reply = await replica.client.post(path, content=body, timeout=300.0,
                                              headers={"Content-Type": wire.JSON,
                                                       **self._admin_headers()})
            if reply.status_code != 200:
                raise StageError(f"{self.name} ({replica.url}): {path} HTTP "
                                 f"{reply.status_code}: {reply.text[:200]}")
            return wire.decode(wire.ReloadResponse, reply.content, wire.JSON)

        return (await self._each(send))[0]

    async def ready(self) -> bool:
        """Ready while any replica is: the others are skipped by their breakers."""
        self._maybe_refresh()  # a gateway that started before its stages' pods learns them
        async def one(replica: Replica) -> bool:
            try:
                reply = await replica.client.get("/readyz", timeout=2.0)
            except httpx.HTTPError:
                return False
            return reply.status_code == 200

        return any(await asyncio.gather(*(one(r) for r in self.replicas)))

    async def close(self) -> None:
        if self._resolving is not None and not self._resolving.done():
            self._resolving.cancel()
        for replica in [*self.replicas, *self._retired]:
            await replica.client.aclose()
