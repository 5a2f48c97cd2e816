"""docker-compose.yml and its GPU override, checked without Docker: against the vendored Compose
Specification schema, and for the properties the stack relies on (readiness probes, the load
profile, a GPU reservation that never reaches CPU-only hosts)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "vendor" / "compose-spec" / "compose-spec.json"
STAGES = ("retrieval", "prerank", "rank", "gateway")


def _load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


@pytest.fixture(scope="module")
def validator() -> jsonschema.protocols.Validator:
    schema = json.loads(SCHEMA.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def _merge(base: dict, override: dict) -> dict:
    """Compose's merge for mappings (enough for our override: no sequences are overridden)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def test_vendored_schema_is_the_noted_upstream_file() -> None:
    source = (SCHEMA.parent / "SOURCE.md").read_text()
    assert "compose-spec/compose-spec" in source and "schema/compose-spec.json" in source
    import hashlib

    digest = hashlib.sha256(SCHEMA.read_bytes()).hexdigest()
    assert digest in source, "compose-spec.json changed without updating SOURCE.md"


@pytest.mark.parametrize("files", [("docker-compose.yml",), ("docker-compose.gpu.yml",),
                                   ("docker-compose.yml", "docker-compose.gpu.yml")])
def test_compose_files_follow_the_compose_specification(validator, files) -> None:
    doc: dict = {}
    for name in files:
        doc = _merge(doc, _load(name))
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, "; ".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_schema_rejects_a_malformed_compose_file(validator) -> None:
    """The validation above can fail: a misspelt key and a bad healthcheck are both caught."""
    doc = _load("docker-compose.yml")
    doc["services"]["gateway"]["helthcheck"] = doc["services"]["gateway"].pop("healthcheck")
    doc["services"]["rank"]["healthcheck"]["retries"] = {"many": True}
    paths = {tuple(e.path) for e in validator.iter_errors(doc)}
    assert ("services", "gateway") in paths or ("services", "gateway", "helthcheck") in paths
    assert any(p[:3] == ("services", "rank", "healthcheck") for p in paths)


def test_every_stage_probes_readyz_on_its_own_port() -> None:
    services = _load("docker-compose.yml")["services"]
    assert set(STAGES) | {"redis", "locust"} <= set(services)
    for name in STAGES:
        service = services[name]
        command = service["command"]
        port = command[command.index("--port") + 1]
        probe = " ".join(service["healthcheck"]["test"])
        assert f"127.0.0.1:{port}/readyz" in probe, name
        if name == "gateway":
            assert any(str(p).endswith(f":{port}") for p in service["ports"]), name
        else:  # only the gateway is published; the stages are reachable inside the network
            assert "ports" not in service and str(port) in service["expose"], name
    assert "ping" in " ".join(services["redis"]["healthcheck"]["test"])


def test_gateway_waits_for_healthy_stages_and_a_loaded_store() -> None:
    depends = _load("docker-compose.yml")["services"]["gateway"]["depends_on"]
    for stage in ("retrieval", "prerank", "rank", "redis"):
        assert depends[stage]["condition"] == "service_healthy"
    assert depends["load-store"]["condition"] == "service_completed_successfully"


def test_configuration_comes_from_the_environment() -> None:
    services = _load("docker-compose.yml")["services"]
    gateway = services["gateway"]["environment"]
    assert gateway["CASCADE_RETRIEVAL_URL"] == "http://retrieval:8001"
    assert gateway["CASCADE_PRERANK_URL"] == "http://prerank:8002"
    assert gateway["CASCADE_RANK_URL"] == "http://rank:8003"
    gateway_only = ("CASCADE_API_KEY", "CASCADE_ADMIN_KEY", "CASCADE_TOKEN_SECRET")
    for name in STAGES:
        env = services[name]["environment"]
        assert env["CASCADE_BUNDLE"] == "/bundles/current"
        assert env["CASCADE_INTERNAL_KEY"].startswith("${CASCADE_INTERNAL_KEY:?"), name
        # every service reaches Redis: the stages to catch up on catalog changes
        assert env["REDIS_URL"].startswith("redis://:${CASCADE_REDIS_PASSWORD:?"), name
        for secret in gateway_only:  # each service gets only the secrets it needs
            assert (secret in env) == (name == "gateway"), (name, secret)
        mounts = {v["target"]: v for v in services[name]["volumes"] if isinstance(v, dict)}
        assert mounts["/bundles"]["read_only"] is True  # one shared bundle tree
    for secret in ("CASCADE_API_KEY", "CASCADE_ADMIN_KEY", "CASCADE_TOKEN_SECRET"):
        assert gateway[secret].startswith("${" + secret + ":?"), secret  # host env
    assert gateway["REDIS_URL"].startswith("redis://:${CASCADE_REDIS_PASSWORD:?")


def test_redis_persists_and_requires_a_password() -> None:
    redis = _load("docker-compose.yml")["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--requirepass") + 1].startswith("${CASCADE_REDIS_PASSWORD:?")
    assert "ports" not in redis and any(str(v).endswith(":/data") for v in redis["volumes"])


def test_locust_runs_only_under_the_load_profile() -> None:
    services = _load("docker-compose.yml")["services"]
    assert services["locust"]["profiles"] == ["load"]
    assert [n for n, s in services.items() if s.get("profiles")] == ["locust"]


def test_gpu_reservation_lives_only_in_the_override() -> None:
    base = _load("docker-compose.yml")
    assert "deploy" not in yaml.safe_dump(base), "the default stack must start on CPU-only hosts"
    override = _load("docker-compose.gpu.yml")["services"]
    assert set(override) == {"rank"}
    devices = override["rank"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]


def test_one_dockerfile_installs_cpu_torch_before_the_project() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert dockerfile.startswith("#") and "FROM python:3.11-slim" in dockerfile
    torch_at = dockerfile.index('pip install "torch==')
    assert "download.pytorch.org/whl/cpu" in dockerfile
    assert torch_at < dockerfile.index("RUN pip install .")
    builds = [s.get("build") for s in _load("docker-compose.yml")["services"].values()]
    assert {b["dockerfile"] for b in builds if b} == {"Dockerfile"}
