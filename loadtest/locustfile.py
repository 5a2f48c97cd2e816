"""Locust traffic for the gateway: an open-loop ad frontend fleet that also reports feedback.

Open loop: `loadtest.run` writes the run's arrival schedule (due times, loadtest/schedule.py)
before Locust starts, and spawns a pool of users larger than the rate needs. Every user takes the
next due time from the one shared schedule, sleeps until it, sends, and records the answer;
latency counts from the due time (Locust's own stats too), so neither a slow answer nor a busy
pool can lower the offered rate or hide queueing. When every due request is answered the run
ends; `requests.csv` holds each one's due, sent and answer times.

The traffic model (Zipf users, scene mix, feedback at pCTR / pCVR) is loadtest/traffic.py.

Environment: CASCADE_DATA, CASCADE_API_KEY, CASCADE_LOAD_SCHEDULE (JSON from loadtest.run),
CASCADE_LOAD_RECORDS (requests.csv to write), CASCADE_LOAD_TIMEOUT_S (per request, 10),
CASCADE_LOAD_SERVER_PIDS (comma-separated: processes whose CPU the run reads), CASCADE_LOAD_ZIPF,
CASCADE_LOAD_SCENES, CASCADE_LOAD_FEEDBACK (share of answers that report events, 0.0),
CASCADE_LOAD_TARGETS (comma-separated gateway URLs: requests go to each in turn, as a load
balancer in front of several gateways would send them; default: Locust's --host),
CASCADE_LOAD_SEED (0), CASCADE_LOAD_SIDECAR (JSON written at exit), CASCADE_LOAD_METRICS_START +
CASCADE_LOAD_METRICS_URLS (save the services' /metrics just before the schedule starts).
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from pathlib import Path

import gevent
from gevent.event import Event
from locust import FastHttpUser, constant, events, task
from locust.stats import CSV_STATS_INTERVAL_SEC

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # locust -f runs this as a script
from loadtest.procstat import (  # noqa: E402
    cpu_by_thread,
    cpu_seconds,
    cpu_spent,
    descendants,
    thread_cpu_seconds,
)
from loadtest.records import UNANSWERED, RequestRecord, write_records  # noqa: E402
from loadtest.report import scrape_all  # noqa: E402
from loadtest.traffic import Traffic, degraded_stages, feedback_events  # noqa: E402

ADS_NAME = "/v1/ads"
TURNS = itertools.count()  # one greenlet runs at a time: no lock needed
TARGETS = [u.rstrip("/") for u in os.environ.get("CASCADE_LOAD_TARGETS", "").split(",") if u]
LEAD_S = 0.3  # between the start readings and the first due time
TRAFFIC: Traffic | None = None


class SharedSchedule:
    """The run's due times, handed out in order to whichever user is free."""

    def __init__(self, due_s: list[float], server_pids: list[int]) -> None:
        self.records = [RequestRecord(i, t) for i, t in enumerate(due_s)]
        self.server_pids = server_pids
        self.next_index = 0
        self.finished = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.users = 0
        self.start = 0.0  # perf_counter() at due time 0
        self.started = Event()
        self.ended_at: float | None = None
        self.cpu_before: tuple[dict[int, float], float] | None = None
        self.threads_before: dict[tuple[int, int], tuple[str, float]] = {}
        self.cpu: dict = {}

    def now(self) -> float:
        return time.perf_counter() - self.start

    def server_tree(self) -> set[int]:
        return descendants(self.server_pids, exclude=[os.getpid()])

    def begin(self) -> None:
        tree = self.server_tree()
        self.cpu_before = (cpu_seconds(tree), time.process_time())
        self.threads_before = thread_cpu_seconds(tree)
        self.start = time.perf_counter() + LEAD_S
        self.started.set()

    def take(self) -> RequestRecord | None:
        if self.next_index >= len(self.records):
            return None
        record = self.records[self.next_index]
        self.next_index += 1
        return record

    def end(self) -> None:
        """Read the CPU counters once, when the last answer is in (or the run is cut short)."""
        if self.ended_at is not None or self.cpu_before is None:
            return
        self.ended_at = self.now()
        server_before, loadgen_before = self.cpu_before
        tree = self.server_tree()
        server_after = cpu_seconds(tree)
        self.cpu = {"loadgen_cpu_s": round(time.process_time() - loadgen_before, 4),
                    "server_cpu_s": (round(cpu_spent(server_before, server_after), 4)
                                     if self.server_pids else None),
                    "server_cpu_s_by_thread": (cpu_by_thread(self.threads_before,
                                                             thread_cpu_seconds(tree))
                                               if self.server_pids else {}),
                    "server_pids": sorted(server_after)}

    def finish(self, environment) -> None:  # noqa: ANN001 - locust's Environment
        self.finished += 1
        if self.finished == len(self.records):
            self.end()
            # Locust rewrites its CSV once per interval and not at quit: wait one out so the
            # CSV holds every request too (the CPU readings are already taken).
            gevent.spawn_later(CSV_STATS_INTERVAL_SEC + 0.2, environment.runner.quit)


SCHEDULE: SharedSchedule | None = None


@events.init.add_listener
def _on_init(environment, **_kwargs) -> None:  # noqa: ANN001 - locust's signature
    global TRAFFIC, SCHEDULE
    TRAFFIC = Traffic.from_env()
    plan = json.loads(Path(os.environ["CASCADE_LOAD_SCHEDULE"]).read_text())
    pids = [int(p) for p in os.environ.get("CASCADE_LOAD_SERVER_PIDS", "").split(",") if p]
    SCHEDULE = SharedSchedule(plan["due_s"], pids)


def _begin() -> None:
    target = os.environ.get("CASCADE_LOAD_METRICS_START")
    urls = [u for u in os.environ.get("CASCADE_LOAD_METRICS_URLS", "").split(",") if u]
    if target and urls:
        Path(target).write_text(scrape_all(urls, os.environ.get("CASCADE_API_KEY", "")))
    if TRAFFIC is not None:
        TRAFFIC.reset()
    SCHEDULE.begin()


@events.spawning_complete.add_listener
def _on_spawned(user_count: int, **_kwargs) -> None:
    """Every user is waiting: scrape /metrics, read the CPU counters, start the clock."""
    if SCHEDULE is not None and not SCHEDULE.started.is_set():
        SCHEDULE.users = user_count
        gevent.spawn(_begin)


@events.quitting.add_listener
def _on_quit(environment, **_kwargs) -> None:  # noqa: ANN001 - locust's signature
    if SCHEDULE is None or TRAFFIC is None:
        return
    SCHEDULE.end()
    records_path = os.environ.get("CASCADE_LOAD_RECORDS")
    if records_path:
        Path(records_path).write_text(write_records(SCHEDULE.records))
    target = os.environ.get("CASCADE_LOAD_SIDECAR")
    if target:
        side = {**TRAFFIC.sidecar(), **SCHEDULE.cpu, "max_in_flight": SCHEDULE.max_in_flight,
                "run_end_s": SCHEDULE.ended_at, "users": SCHEDULE.users}
        Path(target).write_text(json.dumps(side, indent=2))


class AdFrontend(FastHttpUser):
    """One frontend connection of the fleet: send due ad requests, report what users did."""

    wait_time = constant(0)  # pacing is the shared schedule's, never a per-user rhythm
    network_timeout = connection_timeout = float(os.environ.get("CASCADE_LOAD_TIMEOUT_S", "10"))

    def on_start(self) -> None:
        self.headers = {"X-API-Key": os.environ.get("CASCADE_API_KEY", ""),
                        "Content-Type": "application/json"}

    @staticmethod
    def _url(path: str) -> str:
        """`path` on the next gateway in turn (several targets), else on Locust's host."""
        if len(TARGETS) < 2:
            return path
        return TARGETS[next(TURNS) % len(TARGETS)] + path

    @task
    def next_due_request(self) -> None:
        schedule, traffic = SCHEDULE, TRAFFIC
        assert schedule is not None and traffic is not None, "locustfile init did not run"
        schedule.started.wait()
        record = schedule.take()
        if record is None:
            gevent.sleep(3600)  # schedule done: the last answer quits the runner
            return
        try:
            self._send(record, schedule, traffic)
        finally:
            schedule.finish(self.environment)

    def _send(self, record: RequestRecord, schedule: SharedSchedule, traffic: Traffic) -> None:
        payload = traffic.ad_request()
        delay = record.due_s - schedule.now()
        if delay > 0:
            gevent.sleep(delay)
        record.sent_s = schedule.now()
        record.status = UNANSWERED
        schedule.in_flight += 1
        schedule.max_in_flight = max(schedule.max_in_flight, schedule.in_flight)
        slots: list = []
        # as a frontend or proxy does: when the request was due, on the wall clock, so the
        # gateway's budget counts time spent in its socket buffers too
        due_wall = time.time() - (record.sent_s - record.due_s)
        headers = {**self.headers, "X-Request-Start": f"t={due_wall:.6f}"}
        try:
            with self.client.post(self._url("/v1/ads"), json=payload, headers=headers,
                                  name=ADS_NAME, catch_response=True) as response:
                record.done_s = schedule.now()
                record.status = response.status_code or UNANSWERED
                # Locust's own report also counts from the due time, not the send.
                response.request_meta["response_time"] = record.latency_ms
                if response.status_code != 200:
                    response.failure(f"HTTP {response.status_code}")
                    return
                try:
                    body = response.json()
                    slots = list(body.get("slots") or [])
                except (ValueError, TypeError, AttributeError):
                    response.failure("response is not the /v1/ads JSON")
                    record.status = UNANSWERED
                    return
                traffic.counts["answered"] += 1
                traffic.counts["slots"] += len(slots)
                degraded = degraded_stages(body)
                if degraded:
                    record.degraded = 1
                    traffic.counts["degraded"] += 1
                    traffic.degraded_by_stage.update(degraded)
        finally:
            schedule.in_flight -= 1
        if not slots or traffic.rng.random() >= traffic.feedback:
            return
        for kind, token in feedback_events(slots, traffic.rng):
            traffic.counts[kind] += 1
            event = {"event_id": traffic.next_id(), "token": token, "type": kind}
            with self.client.post(self._url("/v1/events"), name=f"event:{kind}",
                                  headers=self.headers, json=event,
                                  catch_response=True) as response:
                if response.status_code != 200:
                    traffic.counts["event_failures"] += 1
                    response.failure(f"HTTP {response.status_code}")
