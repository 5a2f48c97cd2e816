"""`loadtest.run` end to end against a stand-in gateway: real Locust, real HTTP, real files.

The stand-in answers /v1/ads like the gateway (every 4th answer degraded), accepts events, and
exposes a stage histogram on /metrics, so the runner's whole path is checked without a bundle.
It can stall (hold every ad request that arrives in a one-second window) and records when each
request arrived and how many it held at once, so the open-loop claims are checked from the
server's side too.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from loadtest.records import read_records
from loadtest.run import LoadConfig, run_load

KEY = "load-key"
ROOT = Path(__file__).resolve().parents[1]
CASCADE = str(Path(sys.executable).with_name("cascade"))


class FakeGateway(BaseHTTPRequestHandler):
    """Just enough of the gateway's API for the load test (keep-alive, like the real one)."""

    protocol_version = "HTTP/1.1"

    counts: Counter = Counter()
    lock = threading.Lock()
    tokens: set = set()
    arrivals: list = []  # monotonic arrival time of each /v1/ads request
    service_s = 0.0  # time each ad request takes
    stall_after_s: float | None = None  # hold ad requests arriving in [first + this, +1 s)
    stall_s = 1.0
    held = 0
    in_flight = 0
    max_in_flight = 0

    def _reply(self, code: int, body: bytes, kind: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        with self.lock:
            n = self.counts["ads"]
        metrics = "\n".join([
            "# TYPE cascade_stage_latency_seconds histogram",
            f'cascade_stage_latency_seconds_bucket{{stage="rank",le="0.004"}} {n}',
            f'cascade_stage_latency_seconds_bucket{{stage="rank",le="0.008"}} {n}',
            f'cascade_stage_latency_seconds_bucket{{stage="rank",le="+Inf"}} {n}',
            f'cascade_stage_latency_seconds_count{{stage="rank"}} {n}', ""])
        self._reply(200, metrics.encode(), "text/plain; version=0.0.4")

    def _hold(self, now: float) -> None:
        cls = type(self)
        with self.lock:
            cls.arrivals.append(now)
            cls.in_flight += 1
            cls.max_in_flight = max(cls.max_in_flight, cls.in_flight)
            stall_from = (cls.arrivals[0] + cls.stall_after_s
                          if cls.stall_after_s is not None else math.inf)
            stalled = stall_from <= now < stall_from + cls.stall_s
            cls.held += stalled
        if stalled:
            time.sleep(stall_from + cls.stall_s - now)
        if cls.service_s:
            time.sleep(cls.service_s)
        with self.lock:
            cls.in_flight -= 1

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.headers.get("X-API-Key") != KEY:
            return self._reply(401, b'{"detail": "bad key"}')
        if self.path == "/v1/events":
            with self.lock:
                known = body["token"] in self.tokens
                self.counts["event:" + body["type"]] += 1
            return self._reply(200 if known else 422, b"{}")
        self._hold(time.monotonic())
        with self.lock:
            self.counts["ads"] += 1
            n = self.counts["ads"]
            self.counts["users:" + body["user_id"]] += 1
            slots = [{"ad_id": i, "token": f"t{n}-{i}", "pctr": 0.3, "pcvr": 0.5, "ecpm": 1.0}
                     for i in range(body["slots"])]
            self.tokens.update(s["token"] for s in slots)
        stages = {"retrieval": {"degraded": False}, "rank": {"degraded": n % 4 == 0}}
        self._reply(200, json.dumps({"slots": slots, "stages": stages}).encode())

    def log_message(self, *args) -> None:
        pass


class Server(ThreadingHTTPServer):
    request_queue_size = 256  # the default 5 drops SYNs when all users connect at once
    daemon_threads = True


def reset_gateway(stall_after_s: float | None = None, service_s: float = 0.0) -> None:
    FakeGateway.counts, FakeGateway.tokens, FakeGateway.arrivals = Counter(), set(), []
    FakeGateway.stall_after_s, FakeGateway.service_s = stall_after_s, service_s
    FakeGateway.held = FakeGateway.in_flight = FakeGateway.max_in_flight = 0


@pytest.fixture
def gateway():
    reset_gateway()
    server = Server(("127.0.0.1", 0), FakeGateway)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def users_dir(tmp_path):
    pq.write_table(pa.table({"user_id": pa.array(range(50), pa.int64())}),
                   tmp_path / "users.parquet")
    return tmp_path


def load(gateway: str, out: Path, data: Path, **knobs) -> dict:
    cfg = LoadConfig(url=gateway, out=out / "summary.json", api_key=KEY, data=str(data),
                     **{"feedback": 0.0, **knobs})
    run_load(cfg, say=lambda line: None)
    return json.loads((out / "summary.json").read_text())


@pytest.mark.slow
def test_run_writes_the_contract_summary_feedback_and_ceiling(tmp_path, gateway,
                                                              users_dir) -> None:
    summary = load(gateway, tmp_path / "load", users_dir, rps=20, seconds=3, feedback=1.0,
                   ceiling=True)
    assert {"offered_rps", "achieved_rps", "p50_ms", "p95_ms", "p99_ms", "p999_ms",
            "error_rate", "degraded_share", "stages", "arrival_cv", "max_in_flight",
            "cpu_ms_per_request", "shed_rate", "loadgen_cpu_ms_per_request"} <= set(summary)
    assert summary["offered_rps"] == 20 and summary["arrivals"] == "poisson"
    records = read_records(Path(summary["requests_csv"]).read_text())
    assert summary["requests"] == len(records) == summary["sent"] == summary["answered"]
    locust_rows = {row["Name"]: row for row in csv.DictReader(
        (tmp_path / "load" / "locust_stats.csv").open())}
    assert int(locust_rows["/v1/ads"]["Request Count"]) == len(records)  # Locust's CSV too
    assert summary["achieved_rps"] == pytest.approx(len(records) / 3, rel=0.1)
    assert summary["error_rate"] == 0 and summary["shed_rate"] == 0
    assert 0 < summary["p50_ms"] <= summary["p99_ms"] <= summary["p999_ms"] < 500
    assert 0.1 <= summary["degraded_share"] <= 0.4  # every 4th answer
    assert summary["degraded_by_stage"].keys() == {"rank"}
    assert 0 < summary["stages"]["rank"]["p99_ms"] <= 4.0
    # The stand-in serves from this very process: found by its listening port, CPU counted.
    # the server is this process; its children (the suite's own redis-servers) count too
    assert summary["server_pids"][0] == os.getpid()
    assert summary["cpu_ms_per_request"] > 0 and summary["loadgen_cpu_ms_per_request"] > 0
    # ... split by thread: the main threads are the event loops; threads that exited before
    # the last reading (this stand-in's per-request threads) can only be missing from it
    by_thread = summary["cpu_ms_per_request_by_thread"]
    assert "event_loop" in by_thread  # stage-* too where earlier tests left stage pools
    assert all(g in ("event_loop", "other") or g.startswith("stage-") for g in by_thread)
    assert 0 < sum(by_thread.values()) <= summary["cpu_ms_per_request"] + 0.01
    # Capacity run without feedback; the feedback run beside it posts ~1 impression per slot.
    assert summary["events"] == {} and summary["feedback"] == 0
    fed = summary["with_feedback"]
    assert fed["feedback"] == 1.0 and fed["event_error_rate"] == 0
    assert fed["events"]["impression"] >= 2 * fed["answered"]  # 2..4 slots per scene
    assert fed["events_per_ad_request"] >= 2
    assert 0 < FakeGateway.counts["event:click"] < FakeGateway.counts["event:impression"]
    users = {k.split(":", 1)[1] for k in FakeGateway.counts if k.startswith("users:")}
    assert users <= {str(u) for u in range(50)}
    # The ceiling ran the same schedule against the trivial app in its own process.
    ceiling = summary["ceiling"]
    assert ceiling["requests"] == summary["requests"] and ceiling["error_rate"] == 0
    assert ceiling["server_pids"] and os.getpid() not in ceiling["server_pids"]
    assert ceiling["cpu_ms_per_request"] > 0
    assert ceiling["workers"] == summary["server_workers"] == 1
    assert summary["vs_ceiling"]["cpu_ms_per_request"] == pytest.approx(
        summary["cpu_ms_per_request"] / ceiling["cpu_ms_per_request"], rel=0.01)


@pytest.mark.slow
def test_a_stalled_server_neither_thins_the_load_nor_hides_the_stall(tmp_path, gateway,
                                                                      users_dir) -> None:
    """Open loop: the same seed sends the same requests at the same due times, stall or not,
    and a request due during the stall counts its wait from its due time."""
    knobs = {"rps": 40, "seconds": 4, "seed": 11}
    calm = load(gateway, tmp_path / "calm", users_dir, **knobs)
    calm_records = read_records(Path(calm["requests_csv"]).read_text())
    reset_gateway(stall_after_s=1.5)
    stalled = load(gateway, tmp_path / "stalled", users_dir, **knobs)
    records = read_records(Path(stalled["requests_csv"]).read_text())

    assert [r.due_s for r in records] == [r.due_s for r in calm_records]
    assert stalled["sent"] == calm["sent"] == len(records) == len(FakeGateway.arrivals)
    # Sends kept to the schedule through the stall (a closed loop would pause them).
    assert max(r.sent_s - r.due_s for r in records) < 0.1
    release = max(r.done_s for r in records if r.done_s - r.sent_s > 0.5)
    held = [r for r in records if r.sent_s < release - 0.01 and r.done_s > release - 0.05]
    assert FakeGateway.held >= 20  # ~40 due in the stalled second
    assert abs(len(held) - FakeGateway.held) <= 2  # (edges: two clocks, one window)
    assert stalled["max_in_flight"] >= len(held) - 2
    for record in held:  # each waited from its due time until the release
        assert record.latency_ms >= (release - record.due_s) * 1000 - 50
    assert max(r.latency_ms for r in held) > 800
    assert stalled["p99_ms"] > 500 > calm["p99_ms"]


@pytest.mark.slow
def test_a_busy_pool_sends_late_but_latency_still_counts_from_the_due_time(
        tmp_path, gateway, users_dir) -> None:
    """Two users against 200 ms answers at 20 rps: sends fall ever further behind; the
    latency includes that wait (a send-time clock would report ~200 ms throughout)."""
    reset_gateway(service_s=0.2)
    summary = load(gateway, tmp_path / "late", users_dir, rps=20, seconds=2, arrivals="uniform",
                   max_users=2, timeout_s=5)
    records = read_records(Path(summary["requests_csv"]).read_text())
    assert summary["requests"] == len(records) == 40 and summary["max_in_flight"] == 2
    assert FakeGateway.max_in_flight == 2
    last = records[-1]
    assert last.sent_s - last.due_s > 1.5  # 40 x 0.2 s of work for 2 users, due within 2 s
    assert last.latency_ms == pytest.approx((last.done_s - last.due_s) * 1000)
    assert last.latency_ms > 1500 + (last.done_s - last.sent_s) * 1000
    assert summary["send_lag_max_ms"] > 1500 and summary["p99_ms"] > 1500


@pytest.mark.slow
def test_burst_mode_sends_n_requests_at_once(tmp_path, gateway, users_dir) -> None:
    reset_gateway(service_s=0.05)
    summary = load(gateway, tmp_path / "burst", users_dir, rps=16, seconds=2, burst=8)
    records = read_records(Path(summary["requests_csv"]).read_text())
    bursts: dict[float, list] = {}
    for record in records:
        bursts.setdefault(record.due_s, []).append(record)
    # 2 s at 16 rps in bursts of 8: one burst every 0.5 s from a random phase, 4 of them.
    assert len(records) == 32 and len(bursts) == 4
    assert all(len(group) == 8 for group in bursts.values())
    for group in bursts.values():  # each burst leaves together
        assert max(r.sent_s for r in group) - min(r.sent_s for r in group) < 0.02
    assert FakeGateway.max_in_flight == 8 and summary["max_in_flight"] == 8
    assert summary["arrivals"] == "burst" and summary["burst"] == 8


@pytest.mark.slow
def test_cli_step_run_writes_the_plot_and_usage_errors_are_one_line(tmp_path, gateway,
                                                                    users_dir) -> None:
    out = tmp_path / "step" / "summary.json"
    env = {**os.environ, "CASCADE_API_KEY": KEY}
    done = subprocess.run(
        [CASCADE, "bench", "e2e", "--out", str(out), "--url", gateway, "--data", str(users_dir),
         "--rps", "10", "--seconds", "2", "--step", "--feedback", "0", "--arrivals", "uniform",
         "--budget-ms", "1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    summary = json.loads(out.read_text())
    # A 1 ms budget breaks at once: one step, plotted, no capacity.
    assert len(summary["steps"]) == 1 and summary["capacity_rps"] is None
    assert Path(summary["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["arrival_cv"] < 0.1  # evenly spaced
    bad = subprocess.run([CASCADE, "bench", "e2e", "--out", str(out), "--arrivals", "bursty"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "--arrivals" in bad.stderr
