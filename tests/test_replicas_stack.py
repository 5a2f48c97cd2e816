"""Several gateways and stage replicas as a local stack: the plan (pure), and a real two-gateway,
two-rank stack under `cascade bench e2e` beside a single-replica one (slow)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from services.stack.compose import ComposeError
from services.stack.plan import parse_replicas, plan_stack

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
REDIS = "redis://127.0.0.1:45678/0"
KEYS = {"CASCADE_API_KEY": "front-key-0123456789", "CASCADE_ADMIN_KEY": "admin-key-0123456789",
        "CASCADE_TOKEN_SECRET": "token-secret-of-32-bytes-long!!!",
        "CASCADE_INTERNAL_KEY": "internal-key-012345", "CASCADE_REDIS_PASSWORD": "pw"}


def test_replicas_option_parses_and_refuses_bad_items() -> None:
    assert parse_replicas("rank=2, gateway=3,") == {"rank": 2, "gateway": 3}
    assert parse_replicas("") == {}
    for bad in ("rank", "rank=0", "rank=two", "=2"):
        with pytest.raises(ValueError, match="--replicas"):
            parse_replicas(bad)
    with pytest.raises(ComposeError, match="no service redis"):
        plan_stack(COMPOSE, redis_url=REDIS, host_env=KEYS, replicas={"redis": 2})


def test_two_gateways_two_ranks_share_redis_and_list_every_rank() -> None:
    plan = plan_stack(COMPOSE, redis_url=REDIS, host_env=KEYS,
                      replicas={"rank": 2, "gateway": 2}).by_name()
    assert {"rank-1", "rank-2", "gateway-1", "gateway-2", "retrieval", "prerank"} <= set(plan)
    assert "rank" not in plan and "gateway" not in plan
    assert [plan[n].port for n in ("rank-1", "rank-2", "gateway-1", "gateway-2")] == [
        8003, 8103, 8000, 8100]
    for name in ("rank-1", "rank-2"):  # each replica listens where its URL says
        argv = plan[name].argv
        assert argv[argv.index("--port") + 1] == str(plan[name].port)
        assert plan[name].service == "rank"
    for name in ("gateway-1", "gateway-2"):
        env = plan[name].env
        assert env["CASCADE_RANK_URL"] == "http://127.0.0.1:8003,http://127.0.0.1:8103"
        assert env["CASCADE_PRERANK_URL"] == "http://127.0.0.1:8002"
        assert env["REDIS_URL"] == REDIS  # one shared Redis: one event stream, one group
        assert {"rank-1", "rank-2", "prerank", "retrieval"} <= set(plan[name].depends_on)
    ports = [p.port for p in plan.values() if p.port]
    assert len(ports) == len(set(ports))


def _qscore_totals(redis_url: str, ad_ids: list[int]) -> tuple[int, int]:
    """(impressions, clicks) summed over every ad, read through the store's own API."""
    import asyncio

    from services.common.config import Settings
    from services.common.store import make_store

    async def read() -> tuple[int, int]:
        store = make_store(Settings(redis_url=redis_url, redis_prefix="cascade:"))
        try:
            counts = await store.get_qscores(ad_ids)
        finally:
            await store.close()
        return (sum(i for i, _ in counts.values()), sum(c for _, c in counts.values()))

    return asyncio.run(read())


def _stream_consumers(redis_url: str) -> set[str]:
    """Every consumer of every group on the stack's event stream(s)."""
    import redis

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        names = set()
        for key in client.scan_iter(match="cascade:*", _type="STREAM"):
            for group in client.xinfo_groups(key):
                names |= {c["name"] for c in client.xinfo_consumers(key, group["name"])}
        return names
    finally:
        client.close()


def _redis_commands(redis_url: str) -> int:
    """Commands the stack's Redis has processed (INFO stats)."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        return int(client.info("stats")["total_commands_processed"])
    finally:
        client.close()


def _refused(run_dir: Path) -> Counter[str]:
    """Events Locust saw refused (shed 503s on this shared box), by type."""
    refused: Counter[str] = Counter()
    with (run_dir / "locust_failures.csv").open() as rows:
        for row in csv.DictReader(rows):
            if row["Name"].startswith("event:"):
                refused[row["Name"].split(":", 1)[1]] += int(row["Occurrences"])
    return refused


def _bench(state: dict, out: Path, data: Path, api_key: str) -> dict:
    """`cascade bench e2e` against the stack's gateways: a short capacity run + feedback run."""
    urls = ",".join(state["gateways"])
    subprocess.run([sys.executable, "-m", "cli.main", "bench", "e2e", "--url", urls,
                    "--rps", str(RPS), "--seconds", str(SECONDS), "--feedback", "1",
                    "--data", str(data), "--out", str(out)],
                   cwd=ROOT, check=True, timeout=600,
                   env={**os.environ, "CASCADE_API_KEY": api_key})
    return json.loads(out.read_text())


RPS, SECONDS = 15, 6


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_two_gateways_two_ranks_under_load_count_every_event_once(tmp_path, tiny_data,
                                                                 tiny_bundle) -> None:
    import time

    from services.stack.launcher import Stack

    host_env = {**os.environ, **KEYS, "CASCADE_BUDGET_MS": "500"}  # a shared, busy box
    ad_ids = pq.read_table(tiny_data / "ads.parquet", columns=["ad_id"]).column(0).to_pylist()
    host_env.pop("REDIS_URL", None)  # each stack starts its own redis-server on a free port
    figures = {}
    for label, replicas in (("single", {}), ("replicated", {"rank": 2, "gateway": 2})):
        stack = Stack(tmp_path / label)
        state = stack.up(COMPOSE, bundle=str(tiny_bundle), data=str(tiny_data), free_ports=True,
                         timeout_s=300, host_env=host_env, replicas=replicas)
        try:
            gateways = state["gateways"]
            assert len(gateways) == (2 if replicas else 1)
            before = _qscore_totals(state["redis_url"], ad_ids)
            commands = _redis_commands(state["redis_url"])
            summary = _bench(state, tmp_path / label / "bench.json", tiny_data,
                             KEYS["CASCADE_API_KEY"])
            commands = _redis_commands(state["redis_url"]) - commands  # during the runs
            fed = summary["with_feedback"]
            assert summary["error_rate"] == 0 and fed["error_rate"] == 0, summary
            assert summary["gateways"] == len(gateways)
            refused = _refused(tmp_path / label / "with_feedback")
            sent = {kind: fed["events"].get(kind, 0) for kind in ("impression", "click")}
            accepted = {kind: n - refused[kind] for kind, n in sent.items()}
            assert accepted["impression"] > 0.8 * sent["impression"] > 0, (accepted, sent)
            # every accepted event is applied exactly once, by whichever gateway read it
            expected = (before[0] + accepted["impression"], before[1] + accepted["click"])
            deadline = time.monotonic() + 60
            while _qscore_totals(state["redis_url"], ad_ids) != expected:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            time.sleep(1.0)  # a double count would show as more than accepted
            after = _qscore_totals(state["redis_url"], ad_ids)
            assert after == expected, (before, after, accepted, refused)
            answered = summary["answered"] + fed["answered"]
            consumers = _stream_consumers(state["redis_url"])
            # every gateway process reads the one stream through the one group
            assert len(consumers) >= len(gateways), consumers
            figures[label] = {k: summary[k] for k in ("offered_rps", "achieved_rps", "p50_ms",
                                                      "p99_ms", "degraded_share",
                                                      "cpu_ms_per_request")}
            figures[label].update(redis_commands_per_ad_request=round(commands / answered, 1),
                                  events_sent=sent, events_refused=dict(refused),
                                  stream_consumers=len(consumers))
        finally:
            stack.down(say=lambda line: None)
    print(f"\nthroughput at {RPS} rps offered for {SECONDS} s (tiny data, shared 2-core box):")
    for label, row in figures.items():
        print(f"  {label:<10} {json.dumps(row)}")
