"""deploy/k8s checked without a cluster: every manifest against the Kubernetes API schema
(kubernetes-validate bundles the schemas: no network), and against docker-compose.yml on
commands, ports, probes, environment keys, secrets and the bundle mount, as tests/test_compose.py
checks compose itself; plus the sizing the resources and autoscalers come from."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from services.stack import sizing
from services.stack.compose import ComposeService, load_compose

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
SERVERS = ("retrieval", "prerank", "rank", "gateway")
VERSIONS = ("1.30.0", "1.37.0")  # an old supported minor, and the newest bundled
K8S_ONLY_OPTIONS = {"--workers"}  # a pod's os.cpu_count() is the node's, so the gateway says


def _docs(*parts: str) -> list[dict]:
    files = sorted((K8S.joinpath(*parts)).glob("*.yaml")) if parts else [
        *sorted((K8S / "base").glob("*.yaml")), *sorted((K8S / "gpu").glob("*.yaml")),
        K8S / "secret.example.yaml"]
    return [d for f in files for d in yaml.safe_load_all(f.read_text()) if d]


def _by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


@pytest.fixture(scope="module")
def base() -> list[dict]:
    return _docs("base")


@pytest.fixture(scope="module")
def compose() -> dict[str, ComposeService]:
    return load_compose(ROOT / "docker-compose.yml")


def _container(workload: dict) -> dict:
    """The one container of a Deployment or Job."""
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    return container


def _errors(doc: dict, version: str) -> str | None:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return f"{doc['kind']}/{doc['metadata']['name']}: {list(exc.path)}: {exc.message}"
    return None


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_follows_the_kubernetes_api_schema(version: str) -> None:
    docs = _docs()
    assert len(docs) >= 20
    errors = [e for e in (_errors(d, version) for d in docs) if e]
    assert not errors, "\n".join(errors)


def test_schema_validation_can_fail(base) -> None:
    """A misspelt field, a string where a number goes, and an unknown kind are all caught."""
    gateway = _by_kind(base, "Deployment")["gateway"]
    bad = yaml.safe_load(yaml.safe_dump(gateway))
    bad["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    assert "readinesProbe" in (_errors(bad, VERSIONS[-1]) or "")
    bad = yaml.safe_load(yaml.safe_dump(gateway))
    bad["spec"]["replicas"] = "three"
    assert _errors(bad, VERSIONS[-1])
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate({**gateway, "kind": "Deplyment"}, VERSIONS[-1], strict=True)


@pytest.mark.skipif(shutil.which("unshare") is None, reason="unshare is not installed")
def test_validation_needs_no_network() -> None:
    """The same validation in a network namespace with no interfaces up: nothing is fetched."""
    probe = subprocess.run(["unshare", "-rn", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("user namespaces are not allowed here")
    code = ("import sys, yaml, kubernetes_validate as kv; from pathlib import Path\n"
            "docs = [d for f in sorted(Path(sys.argv[1]).rglob('*.yaml'))"
            " for d in yaml.safe_load_all(f.read_text()) if d]\n"
            f"[kv.validate(d, {VERSIONS[-1]!r}, strict=True) for d in docs]\n"
            "import socket\n"
            "try:\n    socket.create_connection(('1.1.1.1', 443), timeout=2)\n"
            "except OSError:\n    print('offline', len(docs))\n")
    done = subprocess.run(["unshare", "-rn", sys.executable, "-c", code, str(K8S)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.fullmatch(r"offline \d+\n", done.stdout), done.stdout


def test_each_server_has_deployment_service_pdb_and_cpu_autoscaler(base) -> None:
    deployments, services = _by_kind(base, "Deployment"), _by_kind(base, "Service")
    pdbs, hpas = _by_kind(base, "PodDisruptionBudget"), _by_kind(base, "HorizontalPodAutoscaler")
    for name in SERVERS:
        labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        assert deployments[name]["spec"]["selector"]["matchLabels"].items() <= labels.items()
        service = services[name if name == "gateway" else f"{name}-headless"]
        assert service["spec"]["selector"].items() <= labels.items()
        # stages: headless, so DNS lists every ready pod and the gateway balances over them
        assert (service["spec"].get("clusterIP") == "None") == (name != "gateway"), name
        assert not service["spec"].get("publishNotReadyAddresses")
        assert pdbs[name]["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert pdbs[name]["spec"].get("maxUnavailable") == 1
        hpa = hpas[name]
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                                 "name": name}
        (metric,) = hpa["spec"]["metrics"]
        assert metric["resource"]["name"] == "cpu"
        assert metric["resource"]["target"] == {
            "type": "Utilization",
            "averageUtilization": round(sizing.TARGET_UTILIZATION * 100)}


def test_commands_ports_and_probes_agree_with_compose(base, compose) -> None:
    deployments, services = _by_kind(base, "Deployment"), _by_kind(base, "Service")
    for name in SERVERS:
        spec, container = compose[name], _container(deployments[name])
        command = list(container["command"])
        for option in K8S_ONLY_OPTIONS & set(command):
            del command[command.index(option):command.index(option) + 2]
        assert tuple(command) == spec.command, name
        (port,) = container["ports"]
        assert port["containerPort"] == spec.port, name
        service = services[name if name == "gateway" else f"{name}-headless"]
        assert [p["port"] for p in service["spec"]["ports"]] == [spec.port]
        assert container["readinessProbe"]["httpGet"]["path"] == spec.readiness_path == "/readyz"
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            assert container[probe]["httpGet"]["port"] == port["name"], (name, probe)
    jobs = _by_kind(base, "Job")
    assert tuple(_container(jobs["load-store"])["command"]) == compose["load-store"].command


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def test_environment_keys_and_secrets_agree_with_compose(base, compose) -> None:
    deployments, jobs = _by_kind(base, "Deployment"), _by_kind(base, "Job")
    pods = {**{n: _container(deployments[n]) for n in SERVERS},
            "load-store": _container(jobs["load-store"])}
    secret = _by_kind(_docs(), "Secret")["cascade-secrets"]
    for name, container in pods.items():
        env, wanted = _env(container), compose[name].environment
        assert set(env) == set(wanted), name
        for key, value in wanted.items():
            # a value made of a host secret (${..._KEY:?}, a URL with ${..._PASSWORD}) comes
            # from the Secret; everything else is plain config
            secretive = re.search(r"\$\{[A-Z_]*(_KEY|_SECRET|_PASSWORD)\b", value) is not None
            ref = env[key].get("valueFrom", {}).get("secretKeyRef")
            assert bool(ref) == secretive, (name, key)
            if ref:
                assert ref == {"name": "cascade-secrets", "key": key}
                assert key in secret["stringData"]
    gateway = _env(pods["gateway"])
    for stage in ("retrieval", "prerank", "rank"):
        key = f"CASCADE_{stage.upper()}_URL"
        assert compose["gateway"].environment[key] == f"http://{stage}:{compose[stage].port}"
        assert gateway[key]["value"] == f"http://{stage}-headless:{compose[stage].port}"


def test_bundles_are_mounted_read_only_where_compose_mounts_them(base, compose) -> None:
    deployments = _by_kind(base, "Deployment")
    for name in SERVERS:
        pod = deployments[name]["spec"]["template"]["spec"]
        target = next(m.target for m in compose[name].mounts if m.target == "/bundles")
        (mount,) = [m for m in _container(deployments[name])["volumeMounts"]
                    if m["mountPath"] == target]
        assert mount["readOnly"] is True
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        assert volume["persistentVolumeClaim"] == {"claimName": "cascade-bundles",
                                                   "readOnly": True}
        assert _env(_container(deployments[name]))["CASCADE_BUNDLE"]["value"].startswith(
            target + "/")


def test_resources_and_autoscaling_come_from_the_sizing(base) -> None:
    deployments = _by_kind(base, "Deployment")
    hpas = _by_kind(base, "HorizontalPodAutoscaler")
    low = {r.service: r.pods for r in sizing.size(min(sizing.RATES))}
    high = {r.service: r.pods for r in sizing.size(max(sizing.RATES))}
    for name in SERVERS:
        resources = _container(deployments[name])["resources"]
        cores = str(sizing.POD_CPU[name])
        assert resources["requests"]["cpu"] == resources["limits"]["cpu"] == cores, name
        assert hpas[name]["spec"]["minReplicas"] == low[name]
        assert hpas[name]["spec"]["maxReplicas"] == high[name]
        assert deployments[name]["spec"]["replicas"] == low[name]
    workers = _container(deployments["gateway"])["command"]
    assert workers[workers.index("--workers") + 1] == str(sizing.POD_CPU["gateway"])


def test_sizing_splits_the_measured_stack_cpu_and_the_readme_shows_its_table() -> None:
    per_service = sizing.cpu_ms_per_request()
    assert sum(per_service.values()) == pytest.approx(sizing.STACK_CPU_MS)
    assert min(per_service, key=per_service.get) == "prerank"
    readme = (ROOT / "README.md").read_text()
    assert sizing.markdown_table() in readme


def test_gpu_overlay_replaces_only_rank_and_asks_for_one_gpu(base) -> None:
    gpu = _docs("gpu")
    assert [(d["kind"], d["metadata"]["name"]) for d in gpu] == [("Deployment", "rank")]
    container = _container(gpu[0])
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in yaml.safe_dump(base)  # base starts on CPU-only clusters
    cpu_rank = _container(_by_kind(base, "Deployment")["rank"])
    assert container["command"] == cpu_rank["command"] and container["ports"] == cpu_rank["ports"]
    assert _env(container) == _env(cpu_rank)
