"""`cascade stack up` and docker-compose.yml describe the same stack (pure: no processes)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from services.stack.compose import ComposeError, interpolate, load_compose
from services.stack.plan import plan_stack, process_environment

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
REDIS = "redis://127.0.0.1:45678/0"
KEYS = {"CASCADE_API_KEY": "front", "CASCADE_ADMIN_KEY": "admin", "CASCADE_TOKEN_SECRET": "s",
        "CASCADE_INTERNAL_KEY": "internal", "CASCADE_REDIS_PASSWORD": "pw"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def test_launcher_runs_every_compose_service_but_redis_and_the_load_profile(compose) -> None:
    plan = plan_stack(COMPOSE, redis_url=REDIS, host_env=KEYS)
    expected = {n for n, s in compose.items() if not s.get("profiles") and "build" in s}
    assert {p.name for p in plan.processes} == expected
    assert {"retrieval", "prerank", "rank", "gateway", "load-store"} == expected
    assert plan.redis_service == "redis"
    names = [p.name for p in plan.processes]
    assert names.index("gateway") > max(names.index(s) for s in ("retrieval", "prerank", "rank"))


def test_same_commands_and_ports_as_compose(compose) -> None:
    plan = plan_stack(COMPOSE, redis_url=REDIS, host_env=KEYS).by_name()
    for name, spec in plan.items():
        command = compose[name]["command"]
        assert spec.argv[:3] == (sys.executable, "-m", "cli.main")
        assert spec.argv[3:5] == tuple(command[1:3]), name  # serve <role> / load-store --data
        if spec.oneshot:
            continue
        listed = compose[name].get("ports") or compose[name]["expose"]  # only gateway publishes
        published = {int(str(p).rsplit(":", 1)[-1]) for p in listed}
        assert {spec.port} == published == {int(command[command.index("--port") + 1])}
        assert spec.argv[spec.argv.index("--host") + 1] == "127.0.0.1"
        assert spec.readiness_path == "/readyz"
    assert {plan[s].port for s in ("gateway", "retrieval", "prerank", "rank")} == {
        8000, 8001, 8002, 8003}


def test_same_environment_keys_with_host_side_values(compose) -> None:
    plan = plan_stack(COMPOSE, redis_url=REDIS, host_env=KEYS).by_name()
    for name, spec in plan.items():
        assert set(spec.env) == set(compose[name]["environment"]), name
        if "REDIS_URL" in spec.env:  # the compose URL (with its password) -> our Redis
            assert spec.env["REDIS_URL"] == REDIS
    gateway = plan["gateway"].env
    assert gateway["CASCADE_RETRIEVAL_URL"] == "http://127.0.0.1:8001"
    assert gateway["CASCADE_PRERANK_URL"] == "http://127.0.0.1:8002"
    assert gateway["CASCADE_RANK_URL"] == "http://127.0.0.1:8003"
    assert gateway["CASCADE_API_KEY"] == "front" and gateway["CASCADE_ADMIN_KEY"] == "admin"
    assert gateway["CASCADE_BUNDLE"] == str(ROOT / "bundles" / "current")  # the bind mount
    assert plan["load-store"].argv[-1] == str(ROOT / "data")
    assert not plan_stack(COMPOSE, redis_url=REDIS, host_env=KEYS).generated


def test_free_ports_reach_every_url_that_names_the_service() -> None:
    ports = {"retrieval": 41001, "prerank": 41002, "rank": 41003, "gateway": 41000}
    plan = plan_stack(COMPOSE, redis_url=REDIS, host_env=KEYS, ports=ports).by_name()
    assert plan["gateway"].env["CASCADE_RANK_URL"] == "http://127.0.0.1:41003"
    assert plan["rank"].argv[plan["rank"].argv.index("--port") + 1] == "41003"
    assert plan["gateway"].url == "http://127.0.0.1:41000"


def test_options_override_bundle_and_data(tmp_path) -> None:
    plan = plan_stack(COMPOSE, redis_url=REDIS, host_env=KEYS, bundle=str(tmp_path / "b"),
                      data=str(tmp_path / "d")).by_name()
    assert {plan[s].env["CASCADE_BUNDLE"] for s in ("gateway", "rank")} == {str(tmp_path / "b")}
    assert plan["load-store"].argv[-2:] == ("--data", str(tmp_path / "d"))


def test_external_redis_is_not_reloaded() -> None:
    plan = plan_stack(COMPOSE, redis_url=REDIS, host_env=KEYS, load_store=False).by_name()
    assert "load-store" not in plan
    assert plan["gateway"].depends_on == ("retrieval", "prerank", "rank")


def test_missing_keys_are_generated_once_and_shared() -> None:
    plan = plan_stack(COMPOSE, redis_url=REDIS, host_env={})
    assert set(plan.generated) == set(KEYS)
    secrets = {p.env["CASCADE_INTERNAL_KEY"] for p in plan.processes if not p.oneshot}
    assert secrets == {plan.generated["CASCADE_INTERNAL_KEY"]}  # gateway and stages agree
    assert all(len(v) >= 16 for v in plan.generated.values())


def test_host_settings_cannot_override_the_topology() -> None:
    spec = plan_stack(COMPOSE, redis_url=REDIS, host_env=KEYS).by_name()["retrieval"]
    env = process_environment(spec, {"PATH": "/bin", "CASCADE_RANK_URL": "http://elsewhere:1",
                                     "REDIS_URL": "redis://other:6379/0"})
    assert env["PATH"] == "/bin" and "CASCADE_RANK_URL" not in env
    # a stage reads the catalog's change log from the stack's own Redis, never the host's
    assert env["REDIS_URL"] == REDIS


def test_compose_interpolation_rules() -> None:
    env = {"SET": "v", "EMPTY": ""}
    assert interpolate("${SET}-${UNSET:-d}-${EMPTY:-e}-${EMPTY-f}-$$", env) == "v-d-e--$"
    with pytest.raises(ComposeError, match="NEEDED is not set: give it"):
        interpolate("${NEEDED:?give it}", env)


def test_unusable_compose_files_fail_with_the_service_named(tmp_path) -> None:
    bad = tmp_path / "docker-compose.yml"
    bad.write_text("services:\n  api:\n    build: .\n    command: cascade serve gateway\n")
    with pytest.raises(ComposeError, match="service api: `command` must be a list"):
        load_compose(bad)
    bad.write_text("services:\n  api:\n    build: .\n    command: [cascade, serve, gateway]\n")
    with pytest.raises(ComposeError, match="service api: its command has no --port"):
        plan_stack(bad, redis_url=REDIS, host_env={})
    bad.write_text("services:\n  api:\n    build: .\n    command: [x, --port, '1']\n"
                   "    environment: {HOST: '${HOSTNAME_OF_DB:?set it}'}\n")
    with pytest.raises(ComposeError, match="service api: HOSTNAME_OF_DB is not set"):
        plan_stack(bad, redis_url=REDIS, host_env={})
