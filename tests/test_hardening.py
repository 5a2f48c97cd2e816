"""Start-up and key hardening: weak or shared keys refused, stage services closed to anyone
but the gateway (CASCADE_INTERNAL_KEY), Redis URLs printed without passwords, a stalled body
cut after a read timeout."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from services.common import wire
from services.common.config import Settings, install_url_redaction, redact_url
from services.common.stage_app import Endpoint, create_stage_app, stage_key
from services.gateway.app import check_keys
from services.stack.redis_process import RedisProcess

CASCADE = str(Path(sys.executable).with_name("cascade"))

GOOD = dict(api_key="frontend-key-0123456", admin_key="admin-key-0123456789",
            token_secret="token-secret-0123456789abcdef")


@pytest.mark.parametrize("change, message", [
    ({"api_key": "short-key"}, "CASCADE_API_KEY shorter than 16"),
    ({"admin_key": "admin"}, "CASCADE_ADMIN_KEY shorter than 16"),
    ({"token_secret": "s" * 8}, "CASCADE_TOKEN_SECRET shorter than 16"),
    ({"admin_key": GOOD["api_key"]}, "admin key must differ"),
    ({"rank_url": "http://rank:8003"}, "CASCADE_INTERNAL_KEY not set"),
    ({"rank_url": "http://rank:8003", "internal_key": "tiny"}, "CASCADE_INTERNAL_KEY shorter"),
])
def test_gateway_refuses_weak_or_shared_keys(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_keys(Settings(**{**GOOD, **change}))


def test_gateway_accepts_good_keys_and_auth_off() -> None:
    check_keys(Settings(**GOOD))
    check_keys(Settings(**GOOD, rank_url="http://rank:8003", internal_key="internal-key-01234"))
    check_keys(Settings(auth=False))


def test_stage_refuses_to_start_without_an_internal_key() -> None:
    with pytest.raises(ValueError, match="CASCADE_INTERNAL_KEY not set"):
        stage_key(Settings())
    with pytest.raises(ValueError, match="too short"):
        stage_key(Settings(internal_key="short"))
    assert stage_key(Settings(auth=False)) is None
    assert stage_key(Settings(internal_key="internal-key-01234")) == "internal-key-01234"


class Echo:
    version = "v1"


def _echo(state: Echo, request: wire.PrerankRequest, deadline) -> wire.PrerankResponse:
    return wire.PrerankResponse(ad_ids=request.ad_ids[: request.k],
                                scores=[1.0] * min(request.k, len(request.ad_ids)))


def _bundle(tmp_path: Path) -> str:
    (tmp_path / "manifest.json").write_text(json.dumps({"version": "v1"}))
    return str(tmp_path)


def test_stage_calls_and_admin_need_the_internal_key(tmp_path: Path) -> None:
    key = "internal-key-0123456"
    app = create_stage_app("prerank", lambda p: Echo(), state=Echo(), bundle=_bundle(tmp_path),
                           endpoints=(Endpoint("/v1/prerank", wire.PrerankRequest, _echo),),
                           internal_key=key)
    body = {"scene": "search", "k": 2, "ad_ids": [1, 2, 3]}
    with TestClient(app) as client:
        for headers in ({}, {"X-API-Key": "internal-key-012345X"}, {"X-API-Key": ""}):
            assert client.post("/v1/prerank", json=body, headers=headers).status_code == 401
            assert client.post("/admin/reload", json={}, headers=headers).status_code == 401
        ok = client.post("/v1/prerank", json=body, headers={"X-API-Key": key})
        assert ok.status_code == 200, ok.text
        assert client.post("/admin/reload", json={},
                           headers={"X-API-Key": key}).status_code == 200
        assert client.get("/readyz").status_code == 200  # probes stay open


def test_redact_url_hides_passwords_only() -> None:
    assert redact_url("redis://:s3cret@redis:6379/0") == "redis://:***@redis:6379/0"
    assert redact_url("x rediss://user:p%40ss@h:1/2 y") == "x rediss://user:***@h:1/2 y"
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert "s3cret" not in repr(Settings(redis_url="redis://:s3cret@h:1/0", api_key="k" * 16))


def test_log_lines_never_carry_a_redis_password(caplog: pytest.LogCaptureFixture) -> None:
    install_url_redaction()
    with caplog.at_level(logging.INFO):
        logging.getLogger("cascade.test").info("connecting to %s", "redis://:s3cret@h:1/0")
        logging.getLogger("cascade.test").warning("failed: redis://u:s3cret@h:1/0")
    assert "s3cret" not in caplog.text and caplog.text.count(":***@") == 2


@pytest.mark.slow
def test_load_store_prints_the_redis_url_without_its_password(tiny_data: Path) -> None:
    password = "load-store-password-0123"
    proc = RedisProcess(password=password).start()
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CASCADE_")}
        env.update(REDIS_URL=proc.url, CASCADE_REDIS_PREFIX="redact:")
        done = subprocess.run([CASCADE, "load-store", "--data", str(tiny_data)], env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert password not in done.stdout + done.stderr
        assert ":***@127.0.0.1" in done.stdout
        proc.kill()  # unreachable now: the error line must not show it either
        done = subprocess.run([CASCADE, "load-store", "--data", str(tiny_data)], env=env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and "unreachable" in done.stderr
        assert password not in done.stdout + done.stderr
    finally:
        proc.stop()


def test_a_stalled_request_body_is_cut_with_408() -> None:
    """A client that sends headers and part of the body, then nothing, gets 408 after the read
    timeout instead of holding the connection (a real uvicorn server on a loopback port)."""
    import socket
    import threading
    import time

    import uvicorn

    from services.common.stage_app import StageLimits
    from services.stack.launcher import free_port

    app = create_stage_app("prerank", lambda p: Echo(), state=Echo(),
                           endpoints=(Endpoint("/v1/prerank", wire.PrerankRequest, _echo),),
                           limits=StageLimits(body_timeout_s=0.5))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"POST /v1/prerank HTTP/1.1\r\nHost: x\r\nContent-Type: "
                         b"application/json\r\nContent-Length: 100\r\n\r\n{\"scene\": ")
            started = time.monotonic()
            reply = sock.recv(4096)
            took = time.monotonic() - started
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert took < 3.0
    finally:
        server.should_exit = True
        thread.join(timeout=5)
