"""Real-Redis fixtures (never a mock): a server URL, a per-test key prefix, and `store`.

`redis_url` finds a server in this order: REDIS_TEST_URL, REDIS_URL, 127.0.0.1:6379 if it
answers, else a private `redis-server` on a free loopback port for the session. Each test gets
its own key prefix and its keys are deleted afterwards, so tests (and engineers) can share one
server. `store` runs the same test body against a RedisStore and a MemoryStore.

Async tests use the anyio pytest plugin (`@pytest.mark.anyio`, asyncio backend).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from uuid import uuid4

import pytest
import redis

from services.common.store import OnlineStore
from services.common.store_memory import MemoryStore
from services.common.store_redis import RedisStore


def redis_answers(url: str, timeout: float = 1.0) -> bool:
    """True when a Redis server answers PING at `url`."""
    parts = urllib.parse.urlparse(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379),
                                      timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a real Redis for the whole session (started privately if none is running)."""
    for name in ("REDIS_TEST_URL", "REDIS_URL"):
        url = os.environ.get(name)
        if url:
            if not redis_answers(url):
                pytest.fail(f"{name}={url} does not answer PING")
            yield url
            return
    default = "redis://127.0.0.1:6379/0"
    if redis_answers(default):
        yield default
        return
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("no Redis answers and redis-server is not installed (run `make test`, "
                    "which installs it, or set REDIS_TEST_URL)")
    port = _free_port()
    workdir = tempfile.mkdtemp(prefix="cascade-redis-")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", workdir],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 10
        while not redis_answers(url, timeout=0.2):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"private redis-server on port {port} did not start")
            time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A synchronous client (decoded strings) for arranging and inspecting keys in tests."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def redis_prefix(redis_client: redis.Redis) -> Iterator[str]:
    """A key prefix unique to this test; every key under it is deleted afterwards."""
    prefix = f"test:{uuid4().hex[:8]}:"
    yield prefix
    batch: list[str] = []
    for key in redis_client.scan_iter(match=prefix + "*", count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            redis_client.unlink(*batch)
            batch = []
    if batch:
        redis_client.unlink(*batch)


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[OnlineStore]:
    """The same tests run on both implementations: MemoryStore and a RedisStore on a real
    server under a unique prefix."""
    if request.param == "memory":
        mem = MemoryStore()
        yield mem
        await mem.close()
        return
    url = request.getfixturevalue("redis_url")
    prefix = request.getfixturevalue("redis_prefix")
    real = RedisStore.from_url(url, prefix=prefix)
    yield real
    await real.close()
