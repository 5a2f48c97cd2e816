"""Several gateways and stage replicas as a local stack: the plan (pure), and a real two-gateway,
two-rank stack under `cascade bench e2e` beside a single-replica one (slow)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

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
