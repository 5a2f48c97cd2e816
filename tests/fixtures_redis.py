"""Real-Redis fixtures (never a mock): a server URL, a per-test key prefix, and `store`.

`redis_url` finds a server in this order: REDIS_TEST_URL, REDIS_URL, 127.0.0.1:6379 if it
answers, else a private `redis-server` on a free loopback port for the session. Each test gets
its own key prefix and its keys are deleted afterwards, so tests (and engineers) can share one
server. `store` runs the same test body against a MemoryStore, a RedisStore on one server and
a RedisStore on a real 3-master Redis Cluster.

`redis_cluster_url` starts that cluster once per session (three `redis-server
--cluster-enabled yes` processes on free loopback ports, joined by `redis-cli --cluster
create`), and `any_redis_url` parametrizes a test over the single server and the cluster.

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
from services.common.store_redis import RedisStore, cluster_url_nodes, is_cluster_url

CLUSTER_MASTERS = 3


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


def stop_cluster(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()


def _cluster_ok(port: int) -> bool:
    try:
        with redis.Redis(port=port, socket_timeout=1, decode_responses=True) as client:
            info = client.cluster("INFO")
    except redis.RedisError:
        return False
    if isinstance(info, dict):  # redis-py parses CLUSTER INFO into a dict
        return info.get("cluster_state") == "ok"
    return "cluster_state:ok" in str(info)


def _free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free and in range too."""
    for _ in range(100):
        port = _free_port()
        if port + 10_000 > 65_535:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 10_000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


def start_cluster(workdir: str, masters: int = CLUSTER_MASTERS, *, appendonly: bool = False
                  ) -> tuple[str, list[subprocess.Popen]]:
    """Start `masters` cluster-enabled redis-servers and join them; (URL, processes).

    `appendonly` runs them with `--appendonly yes --appendfsync always`, so a node killed and
    started again (`restart_cluster_node`) comes back with every write it acknowledged.
    Raises RuntimeError (after stopping what it started) when the cluster does not form."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server is None or cli is None:
        raise RuntimeError("redis-server and redis-cli are needed for the Redis Cluster tests")
    ports = [_free_cluster_port() for _ in range(masters)]
    procs: list[subprocess.Popen] = []
    try:
        for port in ports:
            node_dir = os.path.join(workdir, str(port))
            os.makedirs(node_dir)
            procs.append(subprocess.Popen(
                [server, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                 "--cluster-config-file", os.path.join(node_dir, "nodes.conf"),
                 "--save", "", "--daemonize", "no", "--dir", node_dir,
                 *(["--appendonly", "yes", "--appendfsync", "always"] if appendonly
                   else ["--appendonly", "no"])],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 30
        for port, proc in zip(ports, procs, strict=True):
            while not redis_answers(f"redis://127.0.0.1:{port}", timeout=0.5):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"cluster node on port {port} did not start "
                                       f"(exit code {proc.poll()})")
                time.sleep(0.05)
        subprocess.run([cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
                        "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, capture_output=True, timeout=30)
        deadline = time.monotonic() + 20
        while not all(_cluster_ok(p) for p in ports):
            if time.monotonic() > deadline:
                raise RuntimeError("the Redis Cluster did not reach cluster_state:ok")
            time.sleep(0.1)
    except BaseException:
        stop_cluster(procs)
        raise
    return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports), procs


def _port_of(proc: subprocess.Popen) -> int:
    args = list(proc.args)  # type: ignore[arg-type]
    return int(args[args.index("--port") + 1])


def restart_cluster_node(procs: list[subprocess.Popen], i: int, timeout_s: float = 20) -> None:
    """SIGKILL node `i` and start it again with the same arguments (port, nodes.conf, AOF);
    returns once the cluster reports cluster_state:ok again."""
    proc = procs[i]
    proc.kill()
    proc.wait()
    procs[i] = subprocess.Popen(proc.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout_s
    while not all(_cluster_ok(_port_of(p)) for p in procs):
        if time.monotonic() > deadline:
            raise RuntimeError(f"cluster not ok {timeout_s} s after restarting node {i}")
        time.sleep(0.05)


@pytest.fixture(scope="session")
def redis_cluster_url() -> Iterator[str]:
    """URL (`redis+cluster://...`) of a real 3-master Redis Cluster for the whole session:
    REDIS_TEST_CLUSTER_URL when set (an existing cluster), else one started here."""
    existing = os.environ.get("REDIS_TEST_CLUSTER_URL")
    if existing:
        yield existing
        return
    workdir = tempfile.mkdtemp(prefix="cascade-cluster-")
    try:
        url, procs = start_cluster(workdir)
    except (RuntimeError, subprocess.SubprocessError) as exc:
        shutil.rmtree(workdir, ignore_errors=True)
        pytest.fail(f"could not start a Redis Cluster: {exc}")
    try:
        yield url
    finally:
        stop_cluster(procs)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(params=["single", "cluster"])
def any_redis_url(request: pytest.FixtureRequest) -> str:
    """The single server's URL, then the cluster's: a test using it runs on both."""
    name = "redis_url" if request.param == "single" else "redis_cluster_url"
    return str(request.getfixturevalue(name))


def sync_client(url: str) -> redis.Redis | redis.RedisCluster:
    """A synchronous client (decoded strings) for either kind of URL."""
    if is_cluster_url(url):
        nodes, user, password = cluster_url_nodes(url)
        return redis.RedisCluster(
            startup_nodes=[redis.cluster.ClusterNode(h, p) for h, p in nodes],
            username=user, password=password, decode_responses=True)
    return redis.Redis.from_url(url, decode_responses=True)


def _unlink_prefix(client: redis.Redis | redis.RedisCluster, prefix: str) -> None:
    """Delete every key under `prefix` (on a cluster, node by node: keys of one UNLINK must
    share a slot there, so each key gets its own, pipelined)."""
    if isinstance(client, redis.RedisCluster):
        for node in client.get_primaries():
            keys = list(client.scan_iter(match=prefix + "*", count=1000, target_nodes=node))
            pipe = client.pipeline()  # one UNLINK per key, sent in one round trip per node
            for key in keys:
                pipe.unlink(key)
            pipe.execute()
        return
    batch: list[str] = []
    for key in client.scan_iter(match=prefix + "*", count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            client.unlink(*batch)
            batch = []
    if batch:
        client.unlink(*batch)


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
    _unlink_prefix(redis_client, prefix)


@pytest.fixture
def cluster_prefix(redis_cluster_url: str) -> Iterator[str]:
    """Like `redis_prefix`, on the cluster."""
    prefix = f"test:{uuid4().hex[:8]}:"
    yield prefix
    client = sync_client(redis_cluster_url)
    _unlink_prefix(client, prefix)
    client.close()


def prefix_for(request: pytest.FixtureRequest, url: str) -> str:
    """The per-test prefix fixture that cleans up on the server `url` points at."""
    name = "cluster_prefix" if is_cluster_url(url) else "redis_prefix"
    return str(request.getfixturevalue(name))


@pytest.fixture(params=["memory", "redis", "cluster"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[OnlineStore]:
    """The same tests run on every implementation: MemoryStore, and a RedisStore under a
    unique prefix on a real server and on a real Redis Cluster."""
    if request.param == "memory":
        mem = MemoryStore()
        yield mem
        await mem.close()
        return
    url = request.getfixturevalue("redis_url" if request.param == "redis"
                                  else "redis_cluster_url")
    real = RedisStore.from_url(url, prefix=prefix_for(request, url))
    yield real
    await real.close()
