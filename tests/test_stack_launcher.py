"""The launcher with real processes: a compose file of tiny stand-in servers, a real redis-server.

Stand-ins keep this fast and independent of `cascade serve`; tests/test_stack_e2e.py runs the
real services once they exist.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import textwrap
import urllib.request
from pathlib import Path

import pytest
import redis

from services.stack.launcher import Stack, StackError, is_ours, proc_start_ticks

SERVER = textwrap.dedent("""
    import json, os, sys
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    port = int(sys.argv[sys.argv.index("--port") + 1])
    host = sys.argv[sys.argv.index("--host") + 1]
    if os.environ.get("FAKE_EXIT"):
        sys.exit(int(os.environ["FAKE_EXIT"]))
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/readyz" and os.environ.get("FAKE_NEVER_READY"):
                code, body = 503, b"loading"
            elif self.path == "/env":
                code, body = 200, json.dumps(dict(os.environ)).encode()
            else:
                code, body = 200, b"ok"
            self.send_response(code); self.end_headers(); self.wfile.write(body)
        def log_message(self, *args):
            pass
    ThreadingHTTPServer((host, port), Handler).serve_forever()
""")

LOADER = textwrap.dedent("""
    import os, socket, sys
    data = sys.argv[sys.argv.index("--data") + 1]
    url = os.environ["REDIS_URL"].split("://")[1].split("/")[0]
    host, port = url.split(":")
    s = socket.create_connection((host, int(port)))
    s.sendall(("SET stack:loaded_from " + data + "\\r\\n").encode())
    assert s.recv(8).startswith(b"+OK")
""")


def _compose(tmp_path: Path, extra_env: dict[str, dict[str, str]] | None = None) -> Path:
    (tmp_path / "server.py").write_text(SERVER)
    (tmp_path / "loader.py").write_text(LOADER)
    (tmp_path / "data").mkdir(exist_ok=True)
    py = sys.executable
    env = extra_env or {}

    def service(name: str, port: int, depends: list[str], more: dict[str, str]) -> dict:
        return {"build": ".", "command": [py, "server.py", "--host", "0.0.0.0", "--port",
                                          str(port)],
                "environment": {"REDIS_URL": "redis://redis:6379/0", **more,
                                **env.get(name, {})},
                "ports": [f"{port}:{port}"], "depends_on": {d: {"condition": "service_healthy"}
                                                            for d in depends},
                "healthcheck": {"test": ["CMD", "curl", f"http://127.0.0.1:{port}/readyz"]}}

    doc = {"services": {
        "redis": {"image": "redis:7-alpine"},
        "loader": {"build": ".", "command": [py, "loader.py", "--data", "/data"],
                   "environment": {"REDIS_URL": "redis://redis:6379/0"}, "restart": "no",
                   "volumes": ["./data:/data:ro"], "depends_on": ["redis"]},
        "stage": service("stage", 18001, ["redis"], {"CASCADE_API_KEY": "${CASCADE_API_KEY:?}"}),
        "front": service("front", 18000, ["stage", "loader"],
                         {"STAGE_URL": "http://stage:18001/x", "CASCADE_API_KEY":
                          "${CASCADE_API_KEY:?}"}),
        "gen": {"build": ".", "command": ["true"], "profiles": ["load"]},
    }}
    path = tmp_path / "docker-compose.yml"
    path.write_text(json.dumps(doc))  # JSON is YAML
    return path


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read()


def _alive_under(tmp_path: Path) -> list[int]:
    """Live processes whose command line mentions tmp_path (what these tests started)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if str(tmp_path).encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


needs_redis_server = pytest.mark.skipif(shutil.which("redis-server") is None,
                                        reason="redis-server is not installed")


@needs_redis_server
def test_up_status_down_with_its_own_redis(tmp_path) -> None:
    stack = Stack(tmp_path / "run")
    lines: list[str] = []
    state = stack.up(_compose(tmp_path), free_ports=True, timeout_s=30, host_env={},
                     say=lines.append)
    try:
        redis_port = int(state["redis_url"].rsplit(":", 1)[1].split("/")[0])
        assert redis_port != 6379 and state["own_redis"]
        client = redis.Redis.from_url(state["redis_url"])
        assert client.get("stack:loaded_from") == str((tmp_path / "data").resolve()).encode()
        rows = {r["name"]: r for r in stack.status()}
        assert set(rows) == {"redis", "stage", "front"}  # the profile service stays out
        assert all(r["ready"] for r in rows.values())
        front_env = json.loads(_get(f"{state['urls']['front']}/env"))
        assert front_env["STAGE_URL"] == f"http://127.0.0.1:{rows['stage']['port']}/x"
        assert front_env["REDIS_URL"] == state["redis_url"]
        generated = state["secrets"]["CASCADE_API_KEY"]
        assert front_env["CASCADE_API_KEY"] == generated  # one made-up key, shared
        assert oct(stack.state_path.stat().st_mode & 0o777) == "0o600"
        assert lines[-1].startswith("front") and "ready" in lines[-1]
        with pytest.raises(StackError, match="already running"):
            stack.up(_compose(tmp_path), free_ports=True, host_env={})
    finally:
        stopped = stack.down(say=lambda line: None)
    assert stopped == ["front", "stage", "redis"]
    assert not stack.state_path.exists() and not _alive_under(tmp_path)
    assert stack.status() == []


def test_external_redis_skips_loading(tmp_path, redis_url) -> None:
    stack = Stack(tmp_path / "run")
    state = stack.up(_compose(tmp_path), redis_url=redis_url, free_ports=True, timeout_s=30,
                     host_env={"CASCADE_API_KEY": "k"})
    try:
        assert [p["name"] for p in state["processes"]] == ["stage", "front"]
        assert not state["own_redis"] and state["secrets"] == {}
    finally:
        stack.down(say=lambda line: None)
    assert not _alive_under(tmp_path)


def test_a_service_that_never_gets_ready_names_itself_and_its_log(tmp_path, redis_url) -> None:
    compose = _compose(tmp_path, {"front": {"FAKE_NEVER_READY": "1"}})
    stack = Stack(tmp_path / "run")
    with pytest.raises(StackError, match=r"front not ready after 2s \(see .*logs/front\.log\)"):
        stack.up(compose, redis_url=redis_url, free_ports=True, timeout_s=2, host_env={})
    assert not _alive_under(tmp_path) and not stack.state_path.exists()


def test_a_service_that_crashes_is_reported_at_once(tmp_path, redis_url) -> None:
    compose = _compose(tmp_path, {"stage": {"FAKE_EXIT": "3"}})
    with pytest.raises(StackError, match=r"stage exited with code 3 during start-up"):
        Stack(tmp_path / "run").up(compose, redis_url=redis_url, free_ports=True,
                                   timeout_s=30, host_env={})
    assert not _alive_under(tmp_path)


def test_down_never_signals_a_process_that_reused_a_recorded_pid(tmp_path) -> None:
    """A recorded pid now belonging to another process (here: this test) is left alone."""
    stack = Stack(tmp_path)
    me = {"name": "gateway", "pid": os.getpid(), "start_ticks": proc_start_ticks(os.getpid()) + 1,
          "argv": ["cascade"], "port": 1, "log": "x"}
    stack.state_path.write_text(json.dumps({"processes": [me]}))
    assert stack.down(say=lambda line: None) == []
    assert not is_ours(stack.processes({"processes": [me]})[0])
