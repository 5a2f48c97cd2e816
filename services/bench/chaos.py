"""`cascade bench chaos`: faults injected into a local stack under a steady open-loop load.

The stack is real processes: a private redis-server (append-only, password), the three stage
services and a gateway using them over HTTP, on free loopback ports. A Poisson load offers
/v1/ads at a fixed rate; every served slot gets a click event (a fifth of them sent twice with
the same event id, and any 503 retried with the same id, as a frontend would). While it runs,
each fault in turn is injected and undone:

- stage SIGKILL + restart, stage SIGSTOP (the circuit breaker stops the waiting);
- Redis frozen (SIGSTOP), Redis killed and restarted from its AOF, Redis killed and restarted
  empty then reloaded with load-store;
- ten bundle hot swaps with corrupt bundles between them (each must be refused, 422);
- an event worker SIGKILLed mid-stream and restarted: a second gateway process, which takes no
  requests, shares the event stream through the consumer group; it is killed while it holds
  pending entries, and they are reclaimed once idle (30 s), so nothing it had read is lost.

Per fault: requests offered from the fault to recovery, errors (5xx other than a shed 503 with
Retry-After, and connection failures), degraded share, p99 latency during the fault (from each
request's intended send time), seconds from undoing the fault to a ready gateway answering a
non-degraded request, and the event ledger: accepted (answered accepted: true), applied (a
label record for the event id in Redis), lost (accepted, never applied) and double (applied
more than once).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from models.bundle import resolve_bundle_dir
from services.stack.launcher import free_port
from services.stack.redis_process import RedisProcess

PREFIX = "chaos:"
STAGES = ("retrieval", "prerank", "rank")
FAULTS = ("stage_kill", "stage_stop", "redis_freeze", "redis_restart_aof",
          "redis_restart_empty", "bundle_swap", "gateway_kill")
FAULT_NAMES = {
    "stage_kill": "rank SIGKILL + restart",
    "stage_stop": "rank SIGSTOP {stop_s:g} s",
    "redis_freeze": "Redis frozen {freeze_s:g} s",
    "redis_restart_aof": "Redis killed, restarted from AOF",
    "redis_restart_empty": "Redis killed, restarted empty + load-store",
    "bundle_swap": "bundle hot swap x10 + corrupt bundles",
    "gateway_kill": "event worker SIGKILL mid-stream, restart (reclaim)",
}
COLUMNS = ("fault", "requests", "errors", "degraded_share", "p99_ms", "recovery_s",
           "events_accepted", "events_applied", "events_lost", "events_double")


@dataclass
class ChaosConfig:
    data: Path
    bundle: Path
    out: Path
    rps: float = 20.0
    budget_ms: float = 200.0
    stop_s: float = 15.0
    freeze_s: float = 20.0
    replay_share: float = 0.2
    settle_s: float = 3.0  # load before each fault, and after recovery
    faults: tuple[str, ...] = FAULTS
    seed: int = 7


@dataclass
class AdSample:
    at: float  # intended send time (monotonic)
    ms: float
    status: int  # 0: no answer
    shed: bool = False
    degraded: bool = False


@dataclass
class Ledger:
    """What the load saw: requests, and the event ids the gateway accepted."""

    ads: list[AdSample] = field(default_factory=list)
    accepted: dict[str, float] = field(default_factory=dict)  # event id -> first try time
    applied: Counter[str] = field(default_factory=Counter)  # event id -> label records seen
    # label records a wipe destroyed (Redis restarted empty): their effects went with the store,
    # so an event applied before the wipe and again after it (a re-send that found no dedupe
    # marker) counts once in the restored store, not twice
    wiped: Counter[str] = field(default_factory=Counter)

    def live(self, event_id: str) -> int:
        """How many times the event's effects stand in the store now."""
        return self.applied[event_id] - self.wiped[event_id]

    def wipe(self) -> None:
        """Redis came back empty: what was applied so far is gone with it."""
        self.wiped.update(self.applied - self.wiped)


class Stack:
    """Redis + three stages + a gateway, as processes; kill / stop / restart any of them."""

    def __init__(self, cfg: ChaosConfig, work: Path, say: Callable[[str], None]) -> None:
        self.cfg, self.work, self.say = cfg, work, say
        self.keys = {name: secrets.token_urlsafe(24) for name in
                     ("CASCADE_API_KEY", "CASCADE_ADMIN_KEY", "CASCADE_TOKEN_SECRET",
                      "CASCADE_INTERNAL_KEY")}
        self.redis = RedisProcess(appendonly=True, password=secrets.token_urlsafe(16),
                                  workdir=work / "redis")
        self.ports = {name: free_port() for name in (*STAGES, "gateway", "worker")}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def env(self, name: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("CASCADE_") and k != "REDIS_URL"}
        env.update(CASCADE_INTERNAL_KEY=self.keys["CASCADE_INTERNAL_KEY"],
                   CASCADE_TORCH_THREADS="1", CASCADE_FAISS_THREADS="1", PYTHONUNBUFFERED="1")
        if name in ("gateway", "worker"):
            env.update(self.keys, REDIS_URL=self.redis.url, CASCADE_REDIS_PREFIX=PREFIX,
                       CASCADE_BUDGET_MS=str(self.cfg.budget_ms),
                       CASCADE_EXPORT_DIR=str(self.work / "exports"),
                       **{f"CASCADE_{s.upper()}_URL": self.url(s) for s in STAGES})
        return env

    def spawn(self, name: str) -> None:
        role = "gateway" if name == "worker" else name  # the worker is a gateway's
        argv = [sys.executable, "-m", "cli.main", "serve", role, "--bundle",
                str(self.cfg.bundle), "--host", "127.0.0.1", "--port", str(self.ports[name])]
        log = open(self.work / f"{name}.log", "ab")  # noqa: SIM115 - the child keeps it
        self.procs[name] = subprocess.Popen(argv, env=self.env(name), stdout=log, stderr=log)

    def wait_ready(self, name: str, timeout_s: float = 240.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            proc = self.procs[name]
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited (see {self.work / (name + '.log')})")
            try:
                if httpx.get(self.url(name) + "/readyz", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not ready within {timeout_s:g} s")
            time.sleep(0.3)

    async def load_store(self) -> None:
        from services.common.store_load import load_marketplace
        from services.common.store_redis import RedisStore

        store = RedisStore.from_url(self.redis.url, prefix=PREFIX)
        try:
            await load_marketplace(store, self.cfg.data)
        finally:
            await store.close()

    async def start(self) -> None:
        self.redis.start()
        await self.load_store()
        for name in STAGES:
            self.spawn(name)
        for name in STAGES:
            await asyncio.to_thread(self.wait_ready, name)
        self.spawn("gateway")
        self.spawn("worker")  # a second gateway: no requests, its event worker shares the log
        await asyncio.to_thread(self.wait_ready, "gateway")
        await asyncio.to_thread(self.wait_ready, "worker")

    def signal(self, name: str, sig: int) -> None:
        os.kill(self.procs[name].pid, sig)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    os.kill(proc.pid, signal.SIGCONT)
                except OSError:
                    pass
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.redis.stop()


class Load:
    """Open-loop Poisson /v1/ads with a click per served slot (see the module docstring)."""

    def __init__(self, stack: Stack, cfg: ChaosConfig, ledger: Ledger) -> None:
        self.stack, self.cfg, self.ledger = stack, cfg, ledger
        self.rng = random.Random(cfg.seed)
        self.headers = {"X-API-Key": stack.keys["CASCADE_API_KEY"]}
        self.client = httpx.AsyncClient(base_url=stack.url("gateway"), timeout=10.0,
                                        limits=httpx.Limits(max_connections=200))
        self.tasks: set[asyncio.Task[Any]] = set()
        self.sent = 0

    async def run(self, stop: asyncio.Event) -> None:
        next_at = time.monotonic()
        while not stop.is_set():
            next_at += self.rng.expovariate(self.cfg.rps)
            delay = next_at - time.monotonic()
            if delay > 0:
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                    break
                except TimeoutError:
                    pass
            self.sent += 1
            self._spawn(self.one_request(self.sent, next_at))
        await asyncio.gather(*list(self.tasks), return_exceptions=True)
        await self.client.aclose()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def one_request(self, i: int, intended: float) -> None:
        body = {"request_id": f"chaos-{i}", "user_id": str(self.rng.randint(0, 999)),
                "scene": "home_feed", "slots": 2}
        sample = AdSample(intended, 0.0, 0)
        try:
            reply = await self.client.post("/v1/ads", json=body, headers=self.headers)
            sample.status = reply.status_code
            sample.shed = reply.status_code == 503 and "retry-after" in reply.headers
            if reply.status_code == 200:
                answer = reply.json()
                sample.degraded = bool(answer.get("degraded")) or any(
                    s.get("degraded") for s in answer.get("stages", []))
                for slot in answer.get("slots", []):
                    self._spawn(self.click(f"{body['request_id']}:{slot['ad_id']}",
                                           slot["token"]))
        except httpx.HTTPError:
            sample.status = 0
        sample.ms = (time.monotonic() - intended) * 1000
        self.ledger.ads.append(sample)

    async def click(self, event_id: str, token: str) -> None:
        first = time.monotonic()
        sends = 2 if self.rng.random() < self.cfg.replay_share else 1
        for n in range(sends):
            if n:
                await asyncio.sleep(0.3)  # the replayed id: must count once
            for _ in range(60):  # retry 503 / no answer with the same id, as a frontend would
                try:
                    reply = await self.client.post("/v1/events", headers=self.headers, json={
                        "event_id": event_id, "token": token, "type": "click"})
                except httpx.HTTPError:
                    await asyncio.sleep(1.0)
                    continue
                if reply.status_code == 200:
                    answer = reply.json()
                    # "duplicate" also means recorded: an earlier try landed, its answer was lost
                    if answer.get("accepted") or answer.get("duplicate"):
                        self.ledger.accepted.setdefault(event_id, first)
                    break
                if reply.status_code != 503:
                    break
                await asyncio.sleep(float(reply.headers.get("retry-after") or 1))


async def poll_labels(stack: Stack, ledger: Ledger, stop: asyncio.Event) -> None:
    """Follow the label stream (ids are time-ordered, so the cursor survives a restart)."""
    import redis.asyncio as aioredis

    cursor = "-"
    client = aioredis.Redis.from_url(stack.redis.url, decode_responses=True,
                                     socket_timeout=1.0, socket_connect_timeout=1.0)
    try:
        while not stop.is_set():
            try:
                page = await client.xrange(PREFIX + "labels", cursor, "+", count=2000)
                for entry_id, record in page:
                    if record.get("type") == "click":
                        ledger.applied[record.get("event_id", "")] += 1
                    cursor = "(" + entry_id
                if len(page) == 2000:
                    continue
            except Exception:  # noqa: BLE001 - Redis is down or frozen on purpose
                pass
            await asyncio.sleep(0.3)
    finally:
        await client.aclose()


def variant_bundle(source: Path, root: Path, version: str, corrupt: str | None = None) -> Path:
    """Another version of `source` (files hard-linked); `corrupt` is replaced by garbage whose
    checksum the manifest records, so only loading it can tell."""
    src = resolve_bundle_dir(source)
    target = root / version
    target.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((src / "manifest.json").read_text())
    for item in src.iterdir():
        if item.name not in ("manifest.json", corrupt) and not (target / item.name).exists():
            os.link(item, target / item.name)
    if corrupt:
        garbage = b"\x08\x00\x00\x00\x00\x00\x00\x00{corrupt}" * 64
        (target / corrupt).write_bytes(garbage)
        manifest["files"][corrupt] = {"sha256": hashlib.sha256(garbage).hexdigest(),
                                      "bytes": len(garbage)}
    manifest["version"] = version
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


async def recovered(stack: Stack, timeout_s: float = 90.0) -> float:
    """Seconds until /readyz is 200 and a request is answered without degradation."""
    started = time.monotonic()
    headers = {"X-API-Key": stack.keys["CASCADE_API_KEY"]}
    async with httpx.AsyncClient(base_url=stack.url("gateway"), timeout=5.0) as client:
        i = 0
        while time.monotonic() - started < timeout_s:
            i += 1
            try:
                ready = await client.get("/readyz")
                reply = await client.post("/v1/ads", headers=headers, json={
                    "request_id": f"probe-{i}-{time.time()}", "user_id": "1",
                    "scene": "home_feed", "slots": 1, "budget_ms": 1000})
                if ready.status_code == 200 and reply.status_code == 200:
                    answer = reply.json()
                    if not any(s.get("degraded") for s in answer.get("stages", [])):
                        return time.monotonic() - started
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
    return float("nan")


async def inject(fault: str, stack: Stack, cfg: ChaosConfig, work: Path,
                 notes: dict[str, Any], ledger: Ledger) -> None:
    """Apply the fault and undo it (returns when undone; recovery is measured after)."""
    if fault == "stage_kill":
        stack.signal("rank", signal.SIGKILL)
        stack.procs["rank"].wait(timeout=10)
        stack.spawn("rank")
        await asyncio.to_thread(stack.wait_ready, "rank")
    elif fault == "stage_stop":
        stack.signal("rank", signal.SIGSTOP)
        await asyncio.sleep(cfg.stop_s)
        stack.signal("rank", signal.SIGCONT)
    elif fault == "redis_freeze":
        stack.redis.freeze()
        await asyncio.sleep(cfg.freeze_s)
        stack.redis.thaw()
    elif fault == "redis_restart_aof":
        await asyncio.to_thread(stack.redis.restart)
    elif fault == "redis_restart_empty":
        await asyncio.to_thread(stack.redis.restart, empty=True)
        ledger.wipe()
        await stack.load_store()
    elif fault == "bundle_swap":
        good = [variant_bundle(cfg.bundle, work / "bundles", f"chaos-v{i}") for i in (1, 2)]
        bad = [variant_bundle(cfg.bundle, work / "bundles", f"chaos-bad-{name.split('.')[0]}",
                              name) for name in ("din_esmm.safetensors", "faiss.index")]
        statuses: dict[str, list[int]] = {"good": [], "corrupt": []}
        headers = {"X-API-Key": stack.keys["CASCADE_ADMIN_KEY"]}
        async with httpx.AsyncClient(base_url=stack.url("gateway"), timeout=300.0) as client:
            for i in range(10):
                reply = await client.post("/admin/reload", headers=headers,
                                          json={"bundle": str(good[i % 2])})
                statuses["good"].append(reply.status_code)
                if i % 5 == 0:
                    for corrupt in bad:
                        reply = await client.post("/admin/reload", headers=headers,
                                                  json={"bundle": str(corrupt)})
                        statuses["corrupt"].append(reply.status_code)
            await client.post("/admin/reload", headers=headers, json={"bundle": str(cfg.bundle)})
        notes["reload_statuses"] = statuses
    elif fault == "gateway_kill":
        stack.signal("worker", signal.SIGKILL)
        stack.procs["worker"].wait(timeout=10)
        stack.spawn("worker")
        await asyncio.to_thread(stack.wait_ready, "worker")
    else:
        raise ValueError(f"unknown fault '{fault}' (known: {', '.join(FAULTS)})")


def fault_row(name: str, ledger: Ledger, window: tuple[float, float],
              fault_span: tuple[float, float], recovery_s: float) -> dict[str, Any]:
    ads = [s for s in ledger.ads if window[0] <= s.at < window[1]]
    during = [s.ms for s in ads if fault_span[0] <= s.at < fault_span[1]] or [s.ms for s in ads]
    errors = sum(1 for s in ads if s.status == 0 or (s.status >= 500 and not s.shed))
    answered = [s for s in ads if s.status == 200]
    accepted = [e for e, t in ledger.accepted.items() if window[0] <= t < window[1]]
    applied = [e for e in accepted if ledger.live(e) >= 1]
    return {
        "fault": name, "requests": len(ads), "errors": errors,
        "degraded_share": round(sum(s.degraded for s in answered) / max(1, len(answered)), 4),
        "p99_ms": round(float(np.percentile(during, 99)), 1) if during else None,
        "recovery_s": None if recovery_s != recovery_s else round(recovery_s, 2),
        "events_accepted": len(accepted), "events_applied": len(applied),
        "events_lost": len(accepted) - len(applied),
        "events_double": sum(1 for e in accepted if ledger.live(e) > 1),
    }


async def drain(ledger: Ledger, since: float, timeout_s: float = 30.0) -> None:
    """Wait until every event accepted since `since` has a label record (or the timeout)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(ledger.applied[e] for e, t in ledger.accepted.items() if t >= since):
            return
        await asyncio.sleep(0.3)


async def run_chaos(cfg: ChaosConfig, work: Path, say: Callable[[str], None] = print
                    ) -> dict[str, Any]:
    stack = Stack(cfg, work, say)
    ledger = Ledger()
    say(f"starting redis + {', '.join(STAGES)} + gateway under {work}")
    try:
        await stack.start()
        stop = asyncio.Event()
        load = Load(stack, cfg, ledger)
        tasks = [asyncio.create_task(load.run(stop)),
                 asyncio.create_task(poll_labels(stack, ledger, stop))]
        rows = []
        for fault in cfg.faults:
            name = FAULT_NAMES[fault].format(stop_s=cfg.stop_s, freeze_s=cfg.freeze_s)
            window_start = time.monotonic()
            await asyncio.sleep(cfg.settle_s)
            say(f"fault: {name}")
            notes: dict[str, Any] = {}
            began = time.monotonic()
            await inject(fault, stack, cfg, work, notes, ledger)
            undone = time.monotonic()
            recovery = await recovered(stack)
            await asyncio.sleep(cfg.settle_s)
            window_end = time.monotonic()
            await drain(ledger, window_start, 60.0 if fault == "gateway_kill" else 30.0)
            row = fault_row(name, ledger, (window_start, window_end), (began, undone + recovery
                                                                         if recovery == recovery
                                                                         else window_end),
                            recovery)
            if notes:
                row["notes"] = notes
            say("  " + ", ".join(f"{k}={row[k]}" for k in COLUMNS[1:]))
            rows.append(row)
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        return {"faults": rows, "rps": cfg.rps, "budget_ms": cfg.budget_ms,
                "replay_share": cfg.replay_share}
    finally:
        stack.stop()


def markdown_table(result: dict[str, Any]) -> str:
    """The README's Reliability table, from the bench chaos JSON."""
    head = ("| fault | requests | errors | degraded | p99 ms | recovery s | events accepted | "
            "applied | lost | double |")
    lines = [head, "|" + "---|" * 10]
    for row in result["faults"]:
        lines.append("| " + " | ".join(
            str(row[c]) if row[c] is not None else "-" for c in COLUMNS) + " |")
    return "\n".join(lines)


README_BEGIN = "<!-- bench chaos: begin (generated by `cascade bench chaos --readme README.md`) -->"
README_END = "<!-- bench chaos: end -->"


def update_readme(readme: Path, result: dict[str, Any]) -> bool:
    """Replace the table between the README's bench-chaos markers; False when they are absent."""
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        return False
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    settings = (f"\n\nOffered {result['rps']:g} requests/s (Poisson), request budget "
                f"{result['budget_ms']:g} ms, {result['replay_share']:.0%} of clicks sent twice "
                f"with the same event id.\n")
    readme.write_text(head + README_BEGIN + "\n" + markdown_table(result) + settings
                      + README_END + tail)
    return True
