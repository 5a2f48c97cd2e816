"""`loadtest.run` end to end against a stand-in gateway: real Locust, real HTTP, real files.

The stand-in answers /v1/ads like the gateway (every 4th answer degraded), accepts events, and
exposes a stage histogram on /metrics, so the runner's whole path is checked without a bundle.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from loadtest.run import LoadConfig, run_load

KEY = "load-key"


class FakeGateway(BaseHTTPRequestHandler):
    """Just enough of the gateway's API for the load test (keep-alive, like the real one)."""

    protocol_version = "HTTP/1.1"

    counts: Counter = Counter()
    lock = threading.Lock()
    tokens: set = set()

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

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.headers.get("X-API-Key") != KEY:
            return self._reply(401, b'{"detail": "bad key"}')
        if self.path == "/v1/events":
            with self.lock:
                known = body["token"] in self.tokens
                self.counts["event:" + body["type"]] += 1
            return self._reply(200 if known else 422, b"{}")
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


@pytest.fixture
def gateway():
    FakeGateway.counts = Counter()
    FakeGateway.tokens = set()
    server = Server(("127.0.0.1", 0), FakeGateway)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_run_writes_the_contract_summary(tmp_path, gateway) -> None:
    ids = [str(u) for u in range(50)]
    pq.write_table(pa.table({"user_id": pa.array(range(50), pa.int64())}),
                   tmp_path / "users.parquet")
    out = tmp_path / "load" / "summary.json"
    cfg = LoadConfig(url=gateway, out=out, api_key=KEY, data=str(tmp_path), rps=20, seconds=4,
                     user_rps=2.0)
    run_load(cfg, say=lambda line: None)
    summary = json.loads(out.read_text())
    assert {"offered_rps", "achieved_rps", "p50_ms", "p95_ms", "p99_ms", "p999_ms",
            "error_rate", "degraded_share", "stages"} <= set(summary)
    assert summary["offered_rps"] == 20 and summary["users"] == 10
    assert 12 <= summary["achieved_rps"] <= 24  # constant-throughput pacing holds the rate
    assert summary["error_rate"] == 0 and summary["event_error_rate"] == 0
    assert 0 < summary["p50_ms"] <= summary["p99_ms"] <= summary["p999_ms"]
    assert summary["p99_ms"] < 500  # a stand-in answering at once is not slow
    assert 0.1 <= summary["degraded_share"] <= 0.4  # every 4th answer
    assert summary["degraded_by_stage"].keys() == {"rank"}
    assert summary["stages"]["rank"]["count"] > 0
    assert 0 < summary["stages"]["rank"]["p99_ms"] <= 4.0
    counts = FakeGateway.counts
    users = {k.split(":", 1)[1] for k in counts if k.startswith("users:")}
    assert users <= set(ids)
    assert counts["event:impression"] >= 2 * counts["ads"] - 40  # one per slot (2..4 slots)
    assert 0 < counts["event:click"] < counts["event:impression"]
    assert counts["event:conversion"] <= counts["event:click"]
    assert (out.parent / "locust_stats.csv").is_file() and (out.parent / "locust.html").is_file()
