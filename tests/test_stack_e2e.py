"""The real stack: `cascade stack up` with the four services and its own Redis, real requests,
a short load run, `cascade stack down`. Turns on by itself once `cascade serve` exists."""

from __future__ import annotations

import json
import os
import shutil
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from loadtest.run import LoadConfig, run_load
from services.stack.launcher import Stack

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"CASCADE_API_KEY": "e2e-front-key-0123456", "CASCADE_ADMIN_KEY": "e2e-admin-key-0123456",
        "CASCADE_TOKEN_SECRET": "e2e-token-secret-of-32-bytes!!!"}
CONTRACT_KEYS = {"offered_rps", "achieved_rps", "p50_ms", "p95_ms", "p99_ms", "p999_ms",
                 "error_rate", "degraded_share", "stages"}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (ROOT / "cli" / "commands_serve.py").exists(),
                       reason="cli/commands_serve.py does not exist yet (cascade serve)"),
    pytest.mark.skipif(shutil.which("redis-server") is None,
                       reason="redis-server is not installed"),
]


@pytest.fixture(scope="module")
def bundle(default_bundle: Path) -> Path:
    """The bundle `cascade train` makes with its defaults (shared with test_train_eval)."""
    return default_bundle


def _post(url: str, body: dict, key: str) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json",
                                              "X-API-Key": key})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
        return json.loads(response.read())


def test_stack_serves_ads_and_sustains_a_short_load(tmp_path, tiny_data, bundle) -> None:
    stack = Stack(tmp_path / "stack")
    host_env = {**os.environ, **KEYS}
    host_env.pop("REDIS_URL", None)
    state = stack.up(ROOT / "docker-compose.yml", bundle=str(bundle), data=str(tiny_data),
                     free_ports=True, timeout_s=300, host_env=host_env)
    try:
        rows = stack.status()
        assert {r["name"] for r in rows} == {"redis", "retrieval", "prerank", "rank", "gateway"}
        assert all(r["ready"] for r in rows)
        gateway = state["urls"]["gateway"]
        user = str(pq.read_table(tiny_data / "users.parquet").column("user_id")[0].as_py())
        answer = _post(f"{gateway}/v1/ads", {"request_id": "e2e-1", "user_id": user,
                                             "scene": "home_feed", "slots": 3},
                       KEYS["CASCADE_API_KEY"])
        assert 1 <= len(answer["slots"]) <= 3
        assert all(slot["token"] and slot["ecpm"] > 0 for slot in answer["slots"])

        summary = run_load(LoadConfig(url=gateway, out=tmp_path / "load" / "summary.json",
                                      api_key=KEYS["CASCADE_API_KEY"], data=str(tiny_data),
                                      rps=10, seconds=5), say=lambda line: None)
        written = json.loads((tmp_path / "load" / "summary.json").read_text())
        assert CONTRACT_KEYS <= set(written) and written == json.loads(json.dumps(summary))
        assert summary["error_rate"] == 0 and summary["requests"] > 0
        assert summary["with_feedback"]["events"].get("impression", 0) > 0
        assert {"recall", "prerank", "rank"} <= set(summary["stages"]), summary["stages"]
    finally:
        stack.down(say=lambda line: None)
    assert stack.status() == []
