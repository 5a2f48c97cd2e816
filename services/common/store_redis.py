"""RedisStore: the online store on a real Redis or Redis Cluster (redis.asyncio + hiredis).

Reads that one request needs go out as one non-transactional pipeline (one round trip); bulk
writes go out as pipelines of `chunk` commands, so loading 100k ads costs a few dozen round
trips rather than 100k.

Redis Cluster: `redis_client` is the one place a client is made from a URL; a
`redis+cluster://host:port[,host:port...]` URL selects the cluster client. Keys read together
share a hash tag (`user:{id}`, `seq:{id}`, `cap:{id}:{day}` on the user id; the catalog's
`{catalog}:*` keys together) so one request's pipeline and every script stay on one node.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import fields
from itertools import islice
from typing import Any, TypeVar

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.connection import HiredisRespSerializer
from redis.exceptions import ConnectionError as RedisConnectionError

from services.common.store import (
    CAP_TTL_S,
    CHANGED_KEEP_S,
    DEFAULT_SEQUENCE_LEN,
    SPEND_TTL_S,
    Ad,
    Campaign,
    CatalogChanges,
    UserContext,
    UserId,
    UserProfile,
    check_changed_kind,
    check_status,
    decode_profile,
    profile_fields,
    utc_day,
)

T = TypeVar("T")
_HIREDIS_SERIALIZER = HiredisRespSerializer()  # stateless: splits "CONFIG GET", then packs

AD_FIELDS = tuple(f.name for f in fields(Ad) if f.name != "ad_id")
BULK_READ_MIN = 1000  # below this, a pooled pipeline beats opening a bulk connection

_RECORD_CHANGE = """
local version = redis.call('INCR', KEYS[1])
redis.call('ZADD', KEYS[2], version, ARGV[1])
return version
"""


CLUSTER_SCHEME = "redis+cluster://"
CLUSTER_MAX_CONNECTIONS = 256  # per node; `WaitingCluster` waits rather than pass it

_HOLDS_TURN: contextvars.ContextVar[bool] = contextvars.ContextVar("holds_turn", default=False)


class WaitingCluster(RedisCluster):
    """A `RedisCluster` whose callers wait for a free connection instead of failing.

    redis-py's cluster client raises `MaxConnectionsError` once a node's pool is full, and that
    error is a `ConnectionError`, so a pipeline that meets it closes EVERY connection of the
    client (`aclose`) and re-runs: the other pipelines in flight lose their connections
    mid-reply and re-run too, applying their INCRBYs twice (CI: 100 concurrent Qscore
    increments counted 121). A plain client's `BlockingConnectionPool` waits instead; this
    gives the cluster client the same contract: at most `max_connections` commands or
    pipelines in flight (each holds at most one connection per node), the rest wait up to
    `pool_timeout` s, then fail with a clear `ConnectionError` and nothing re-sent.
    """

    def __init__(self, *args: Any, pool_timeout: float = 5.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._turns = asyncio.Semaphore(int(kwargs.get("max_connections")
                                            or CLUSTER_MAX_CONNECTIONS))
        self._pool_timeout = pool_timeout

    async def take_turn(self) -> None:
        try:
            async with asyncio.timeout(self._pool_timeout):
                await self._turns.acquire()
        except TimeoutError:
            raise RedisConnectionError(
                f"no free Redis Cluster connection within {self._pool_timeout} s") from None

    async def in_turn(self, call: Any) -> Any:
        """Run `call()` holding one turn; calls nested inside it (a pipeline's redirected
        commands, a script's reload) reuse the caller's turn, so they cannot deadlock."""
        if _HOLDS_TURN.get():
            return await call()
        await self.take_turn()
        token = _HOLDS_TURN.set(True)
        try:
            return await call()
        finally:
            _HOLDS_TURN.reset(token)
            self._turns.release()

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        return await self.in_turn(lambda: super(WaitingCluster, self).execute_command(
            *args, **kwargs))

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None
                 ) -> ClusterPipeline:
        if shard_hint:
            return super().pipeline(transaction, shard_hint)  # raises, as the base does
        return _WaitingPipeline(self, transaction)


class _WaitingPipeline(ClusterPipeline):
    cluster_client: WaitingCluster

    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True
                      ) -> list[Any]:
        return await self.cluster_client.in_turn(lambda: super(_WaitingPipeline, self).execute(
            raise_on_error, allow_redirections))


RedisClient = aioredis.Redis | RedisCluster


def is_cluster_url(url: str) -> bool:
    return url.lower().startswith(CLUSTER_SCHEME)


def cluster_url_nodes(url: str) -> tuple[list[tuple[str, int]], str | None, str | None]:
    """(host, port) seed nodes, username and password of a `redis+cluster://` URL.

    A cluster has no databases, so a path other than `/` or `/0` is refused."""
    rest = url[len(CLUSTER_SCHEME):]
    rest, _, path = rest.partition("/")
    if path.split("?")[0] not in ("", "0"):
        raise ValueError(f"a Redis Cluster has only database 0 (URL path /{path})")
    user = password = None
    if "@" in rest:
        auth, _, rest = rest.rpartition("@")
        name, sep, secret = auth.partition(":")
        user, password = (name or None, secret or None) if sep else (None, name or None)
    nodes: list[tuple[str, int]] = []
    for part in rest.split(","):
        host, _, port = part.strip().rpartition(":")
        if not host:
            host, port = port, "6379"
        try:
            nodes.append((host or "127.0.0.1", int(port or 6379)))
        except ValueError:
            raise ValueError(f"bad node {part!r} in the Redis Cluster URL") from None
    if not nodes:
        raise ValueError("a redis+cluster:// URL names at least one host:port")
    return nodes, user, password


def redis_client(url: str, *, max_connections: int | None = None,
                 pool_timeout: float = 5.0, **kwargs: Any) -> RedisClient:
    """The one factory that makes an async client (decoded strings) from a URL.

    `redis+cluster://h1:p1,h2:p2` gives a `RedisCluster` seeded from those nodes (it discovers
    the rest); any other URL a plain `Redis`. With `max_connections` a plain client's pool
    blocks (up to `pool_timeout` s) when all are busy rather than failing a request during a
    burst; the cluster client (`WaitingCluster`) waits the same way.
    """
    kwargs.setdefault("decode_responses", True)
    if is_cluster_url(url):
        nodes, user, password = cluster_url_nodes(url)
        return WaitingCluster(startup_nodes=[ClusterNode(h, p) for h, p in nodes],
                              username=user, password=password, pool_timeout=pool_timeout,
                              max_connections=max_connections or CLUSTER_MAX_CONNECTIONS,
                              **kwargs)
    if max_connections is None:
        client = aioredis.Redis.from_url(url, **kwargs)
        pool = client.connection_pool
    else:
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=pool_timeout, **kwargs)
        client = aioredis.Redis(connection_pool=pool)
    pool.connection_class = packed_by_hiredis(pool.connection_class)  # before any connects
    return client


@functools.cache
def packed_by_hiredis(base: type[AbstractConnection]) -> type[AbstractConnection]:
    """`base` (the pool's asyncio connection class: plain, TLS or Unix socket) packing each
    command with `hiredis.pack_command`, as redis-py's sync client already does.

    Why: the asyncio client packs every argument in Python. A served-slot record (an XADD of
    14 fields, one per won slot) took 28 µs to pack that way against 4 µs with hiredis, on the
    event loop of every request. The bytes are identical (tests/test_store.py)."""

    class HiredisPacked(base):  # type: ignore[misc,valid-type]
        def pack_command(self, *args: Any) -> list[bytes]:
            return _HIREDIS_SERIALIZER.pack(*args)

    HiredisPacked.__name__ = HiredisPacked.__qualname__ = f"HiredisPacked{base.__name__}"
    return HiredisPacked


def is_cluster(client: Any) -> bool:
    return isinstance(client, RedisCluster)


def _chunks(rows: Iterable[T], size: int) -> Iterator[list[T]]:
    it = iter(rows)
    while chunk := list(islice(it, size)):
        yield chunk


def parse_sequence(entries: Iterable[str]) -> tuple[list[int], list[int]]:
    """Split "ad_id:category_id" entries into the two id lists (order kept)."""
    ads: list[int] = []
    cats: list[int] = []
    for entry in entries:
        ad, _, cat = entry.partition(":")
        ads.append(int(ad))
        cats.append(int(cat) if cat else -1)
    return ads, cats


class RedisStore:
    """OnlineStore on Redis. Every key starts with `prefix` so tests can share a server."""

    def __init__(self, client: RedisClient, prefix: str = "cascade:",
                 sequence_len: int = DEFAULT_SEQUENCE_LEN, chunk: int = 2000) -> None:
        self.client = client
        self.prefix = prefix
        self.sequence_len = sequence_len
        self.chunk = chunk
        self.cluster = is_cluster(client)
        if self.cluster and ("{" in prefix or "}" in prefix):
            raise ValueError(f"on a Redis Cluster the key prefix {prefix!r} may not hold braces "
                             f"(they would override the keys' own hash tags)")

    @classmethod
    def from_url(cls, url: str, prefix: str = "cascade:",
                 sequence_len: int = DEFAULT_SEQUENCE_LEN, max_connections: int = 64,
                 **pool_kwargs: Any) -> RedisStore:
        """Connect lazily (the first command opens a connection).

        The pool blocks (up to 5 s) when all `max_connections` are busy, rather than failing
        a request during a burst, and keeps the server's client count bounded per process.
        """
        timeout = float(pool_kwargs.pop("timeout", 5))
        client = redis_client(url, max_connections=max_connections, pool_timeout=timeout,
                              **pool_kwargs)
        return cls(client, prefix=prefix, sequence_len=sequence_len)

    def key(self, *parts: object) -> str:
        return self.prefix + ":".join(str(p) for p in parts)

    def tagged(self, kind: str, tag: object, *rest: object) -> str:
        """`kind:{tag}:rest...`. The user's `user:{id}`, `seq:{id}` and `cap:{id}:{day}` share
        the user id as hash tag, so the request's three reads (and the worker's per-user
        writes) stay on one cluster node; `qs:{ad}` and `spend:{campaign}:{day}` are tagged so
        the worker's per-record markers can live in the same slot (apply_redis.py)."""
        return self.key(kind, f"{{{tag}}}", *rest)

    def catalog_key(self, name: str) -> str:
        """`{catalog}:version|changes|bulk`: one slot, so the change script is single-slot."""
        return self.prefix + "{catalog}:" + name

    # -- bulk protocol -----------------------------------------------------------------------
    async def _open_bulk(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """A dedicated plain-TCP connection for bulk traffic, or None (TLS, unix socket).

        Loading a catalog through redis-py's per-command packing and parsing costs ~100 us a
        command in Python; packing with hiredis.pack_command and parsing with hiredis.Reader
        (both C), `redis-cli --pipe` style, makes a 1M-ad load a matter of seconds.
        """
        pool = self.client.connection_pool
        cls = pool.connection_class
        if not issubclass(cls, aioredis.Connection) or issubclass(cls, aioredis.SSLConnection):
            return None
        return await self._connect(pool.connection_kwargs)

    async def _connect(self, kw: Mapping[str, Any]
                       ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(kw.get("host") or "localhost",
                                                       int(kw.get("port") or 6379))
        handshake: list[tuple[Any, ...]] = []
        if kw.get("password"):
            user = kw.get("username")
            handshake.append(("AUTH", user, kw["password"]) if user else ("AUTH", kw["password"]))
        if kw.get("db"):
            handshake.append(("SELECT", int(kw["db"])))
        if handshake:
            await self._exchange(reader, writer, handshake)
        return reader, writer

    @staticmethod
    async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Send `commands` in one write and read exactly as many replies."""
        writer.write(b"".join(hiredis.pack_command(c) for c in commands))
        await writer.drain()
        parser = hiredis.Reader(encoding="utf-8")
        replies: list[Any] = []
        while len(replies) < len(commands):
            data = await reader.read(1 << 18)
            if not data:
                raise ConnectionError("Redis closed the bulk connection")
            parser.feed(data)
            while (reply := parser.gets()) is not False:
                if isinstance(reply, hiredis.ReplyError):
                    raise aioredis.ResponseError(str(reply))
                replies.append(reply)
        return replies

    async def _bulk(self, commands: Iterable[tuple[Any, ...]]) -> list[Any]:
        """Run many commands in chunks on one connection; returns every reply in order."""
        if self.cluster:
            return await self._bulk_cluster(list(commands))
        replies: list[Any] = []
        conn = await self._open_bulk()
        try:
            for chunk in _chunks(commands, self.chunk):
                if conn is not None:
                    replies.extend(await self._exchange(*conn, chunk))
                    continue
                pipe = self.client.pipeline(transaction=False)
                for cmd in chunk:
                    pipe.execute_command(*cmd)
                replies.extend(await pipe.execute())
        finally:
            if conn is not None:
                conn[1].close()
                await conn[1].wait_closed()
        return replies

    async def _bulk_cluster(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """The bulk protocol on a cluster: commands grouped by the node that owns their key
        (every bulk command's key is its first argument), one raw connection per node, the
        nodes in parallel; replies back in the commands' order.

        A slot that moves meanwhile (resharding: MOVED / ASK) makes the whole batch rerun
        through the cluster client's pipeline, which follows redirections; bulk batches are
        idempotent (DEL before each write), so running one twice is harmless.
        """
        if not commands:
            return []
        await self.client.initialize()
        if any(n.connection_class is not aioredis.Connection  # TLS: the client's own path
               for n in self.client.get_nodes()):
            return await self._bulk_pipelined(commands)
        by_node: dict[str, list[int]] = {}
        nodes: dict[str, Any] = {}
        for i, cmd in enumerate(commands):
            node = self.client.get_node_from_key(cmd[1])
            nodes[node.name] = node
            by_node.setdefault(node.name, []).append(i)
        replies: list[Any] = [None] * len(commands)

        async def run(name: str) -> None:
            reader, writer = await self._connect(nodes[name].connection_kwargs)
            try:
                for chunk in _chunks(by_node[name], self.chunk):
                    got = await self._exchange(reader, writer, [commands[i] for i in chunk])
                    for i, reply in zip(chunk, got, strict=True):
                        replies[i] = reply
            finally:
                writer.close()
                await writer.wait_closed()

        try:
            await asyncio.gather(*(run(name) for name in by_node))
        except aioredis.ResponseError as exc:
            if not str(exc).startswith(("MOVED", "ASK")):
                raise
            return await self._bulk_pipelined(commands)
        return replies

    async def _bulk_pipelined(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        replies: list[Any] = []
        for chunk in _chunks(commands, self.chunk):
            pipe = self.client.pipeline(transaction=False)
            for cmd in chunk:
                pipe.execute_command(*cmd)
            replies.extend(await pipe.execute())
        return replies

    # -- users -------------------------------------------------------------------------------
    async def get_user_context(self, user_id: UserId, day: str | None = None) -> UserContext:
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(self.tagged("user", user_id))
        pipe.lrange(self.tagged("seq", user_id), 0, self.sequence_len - 1)
        pipe.hgetall(self.tagged("cap", user_id, day or utc_day()))
        profile, seq, caps = await pipe.execute()
        hist_ad, hist_cat = parse_sequence(seq)
        return UserContext(
            profile=decode_profile(profile) if profile else None,
            hist_ad_id=hist_ad,
            hist_category_id=hist_cat,
            caps={int(c): int(n) for c, n in caps.items()},
        )

    async def push_behaviour(self, user_id: UserId, ad_id: int, category_id: int) -> None:
        key = self.tagged("seq", user_id)
        pipe = self.client.pipeline(transaction=False)
        pipe.lpush(key, f"{int(ad_id)}:{int(category_id)}")
        pipe.ltrim(key, 0, self.sequence_len - 1)
        await pipe.execute()

    async def put_users(self, rows: Iterable[UserProfile | Mapping[str, Any]]) -> int:
        commands: list[tuple[Any, ...]] = []
        for row in rows:
            user_id, mapping = profile_fields(row)
            key = self.tagged("user", user_id)
            commands.append(("DEL", key))
            if mapping:
                commands.append(("HSET", key, *(x for kv in mapping.items() for x in kv)))
        await self._bulk(commands)
        return sum(1 for c in commands if c[0] == "DEL")

    async def put_sequences(
            self, rows: Iterable[tuple[UserId, Iterable[int], Iterable[int]]]) -> int:
        """Replace users' sequences (newest first), e.g. from a marketplace's last requests."""
        commands: list[tuple[Any, ...]] = []
        written = 0
        for user_id, ads, cats in rows:
            key = self.tagged("seq", user_id)
            entries = [f"{a}:{c}" for a, c in zip(ads, cats, strict=False)
                       if a >= 0 or c >= 0][: self.sequence_len]
            commands.append(("DEL", key))
            if entries:
                commands.append(("RPUSH", key, *entries))
            written += 1
        await self._bulk(commands)
        return written

    # -- catalog -----------------------------------------------------------------------------
    async def _bulk_put(self, kind: str, rows: Iterable[Ad] | Iterable[Campaign]) -> int:
        commands: list[tuple[Any, ...]] = []
        ids: list[int] = []
        for rec in rows:
            rid = rec.ad_id if isinstance(rec, Ad) else rec.campaign_id
            ids.append(rid)
            hkey = self.key(kind, rid)
            commands.append(("DEL", hkey))  # a bulk put replaces the record
            commands.append(("HSET", hkey, *(x for kv in rec.to_fields().items() for x in kv)))
        for chunk in _chunks(ids, self.chunk):
            commands.append(("SADD", self.key(kind + "s"), *chunk))
        await self._bulk(commands)
        written = len(ids)
        if written:
            version = await self.client.incr(self.catalog_key("version"))
            await self.client.set(self.catalog_key("bulk"), version)
        return written

    async def put_ads(self, rows: Iterable[Ad]) -> int:
        return await self._bulk_put("ad", rows)

    async def put_campaigns(self, rows: Iterable[Campaign]) -> int:
        return await self._bulk_put("campaign", rows)

    async def get_ads(self, ad_ids: Iterable[int]) -> dict[int, Ad]:
        ids = [int(a) for a in ad_ids]
        commands = [("HMGET", self.key("ad", ad_id), *AD_FIELDS) for ad_id in ids]
        if len(ids) >= BULK_READ_MIN:
            replies = await self._bulk(commands)
        else:
            pipe = self.client.pipeline(transaction=False)
            for cmd in commands:
                pipe.execute_command(*cmd)
            replies = await pipe.execute() if commands else []
        out: dict[int, Ad] = {}
        for ad_id, values in zip(ids, replies, strict=True):
            if values[0] is not None:  # campaign_id is always written
                out[ad_id] = Ad.from_fields(ad_id, dict(zip(AD_FIELDS, values, strict=True)))
        return out

    async def iter_ads(self, batch: int = 5000) -> AsyncIterator[list[Ad]]:
        """Every ad, in batches; SSCAN keeps Redis responsive while a 1M-ad snapshot builds."""
        seen: set[int] = set()
        pending: list[int] = []
        async for member in self.client.sscan_iter(self.key("ads"), count=batch):
            ad_id = int(member)
            if ad_id in seen:  # SSCAN may repeat a member during a rehash
                continue
            seen.add(ad_id)
            pending.append(ad_id)
            if len(pending) >= batch:
                yield list((await self.get_ads(pending)).values())
                pending = []
        if pending:
            yield list((await self.get_ads(pending)).values())

    async def all_ads(self) -> list[Ad]:
        return [ad async for chunk in self.iter_ads() for ad in chunk]

    async def get_campaigns(self, campaign_ids: Iterable[int] | None = None
                            ) -> dict[int, Campaign]:
        if campaign_ids is None:
            campaign_ids = [int(c) for c in await self.client.smembers(self.key("campaigns"))]
        ids = [int(c) for c in campaign_ids]
        out: dict[int, Campaign] = {}
        for chunk in _chunks(ids, self.chunk):
            pipe = self.client.pipeline(transaction=False)
            for cid in chunk:
                pipe.hgetall(self.key("campaign", cid))
            for cid, raw in zip(chunk, await pipe.execute(), strict=True):
                if raw:
                    out[cid] = Campaign.from_fields(cid, raw)
        return out

    async def _write_and_record(self, member: str, write: Any) -> None:
        """Run `write(pipe)` and bump the catalog version with `member` logged as changed.

        Single Redis: one MULTI, so a reader never sees a version whose change is not logged or
        not written yet. Cluster: the record's keys and the `{catalog}` keys live in different
        slots, so the record is written first and the version bumped after (one single-slot
        script): a reader that sees the version finds the write; a crash between the two leaves
        a written record whose change is logged by its next edit.
        """
        record = (_RECORD_CHANGE, 2, self.catalog_key("version"), self.catalog_key("changes"),
                  member)
        if not self.cluster:
            pipe = self.client.pipeline(transaction=True)
            pipe.eval(*record)
            write(pipe)
            await pipe.execute()
            return
        pipe = self.client.pipeline(transaction=False)
        write(pipe)
        await pipe.execute()
        await self.client.eval(*record)

    async def upsert_ad(self, ad: Ad) -> None:
        check_status(ad.status)
        key = self.key("ad", ad.ad_id)

        def write(pipe: Any) -> None:
            pipe.delete(key)
            pipe.hset(key, mapping=ad.to_fields())
            pipe.sadd(self.key("ads"), ad.ad_id)
        await self._write_and_record(f"ad:{ad.ad_id}", write)

    async def upsert_campaign(self, campaign: Campaign) -> None:
        check_status(campaign.status)
        key = self.key("campaign", campaign.campaign_id)

        def write(pipe: Any) -> None:
            pipe.delete(key)
            pipe.hset(key, mapping=campaign.to_fields())
            pipe.sadd(self.key("campaigns"), campaign.campaign_id)
        await self._write_and_record(f"campaign:{campaign.campaign_id}", write)

    async def _set_status(self, kind: str, rid: int, status: str) -> bool:
        check_status(status)
        key = self.key(kind, rid)
        if not await self.client.exists(key):
            return False
        await self._write_and_record(f"{kind}:{rid}", lambda pipe: pipe.hset(key, "status",
                                                                             status))
        return True

    async def set_ad_status(self, ad_id: int, status: str) -> bool:
        return await self._set_status("ad", int(ad_id), status)

    async def set_campaign_status(self, campaign_id: int, status: str) -> bool:
        return await self._set_status("campaign", int(campaign_id), status)

    async def catalog_version(self) -> int:
        return int(await self.client.get(self.catalog_key("version")) or 0)

    async def catalog_baseline(self) -> int:
        return int(await self.client.get(self.catalog_key("bulk")) or 0)

    async def catalog_changes(self, since: int) -> CatalogChanges:
        pipe = self.client.pipeline(transaction=False)
        pipe.get(self.catalog_key("version"))
        pipe.get(self.catalog_key("bulk"))
        pipe.zrangebyscore(self.catalog_key("changes"), f"({int(since)}", "+inf")
        version, bulk, members = await pipe.execute()
        ads = tuple(int(m[3:]) for m in members if m.startswith("ad:"))
        camps = tuple(int(m[9:]) for m in members if m.startswith("campaign:"))
        return CatalogChanges(int(version or 0), ads, camps, int(bulk or 0) > since)

    # -- counters ----------------------------------------------------------------------------
    async def incr_qscore(self, ad_id: int, impressions: int = 0, clicks: int = 0) -> None:
        key = self.tagged("qs", int(ad_id))
        pipe = self.client.pipeline(transaction=False)
        pipe.hincrby(key, "impressions", int(impressions))
        pipe.hincrby(key, "clicks", int(clicks))
        pipe.zadd(self.key("changed", "qs"), {str(int(ad_id)): time.time()})
        await pipe.execute()

    async def get_qscores(self, ad_ids: Iterable[int]) -> dict[int, tuple[int, int]]:
        ids = [int(a) for a in ad_ids]
        out: dict[int, tuple[int, int]] = {}
        for chunk in _chunks(ids, self.chunk):
            pipe = self.client.pipeline(transaction=False)
            for ad_id in chunk:
                pipe.hmget(self.tagged("qs", int(ad_id)), "impressions", "clicks")
            for ad_id, (imp, clk) in zip(chunk, await pipe.execute(), strict=True):
                out[ad_id] = (int(imp or 0), int(clk or 0))
        return out

    async def incr_cap(self, user_id: UserId, day: str, campaign_id: int, n: int = 1) -> int:
        key = self.tagged("cap", user_id, day)
        pipe = self.client.pipeline(transaction=False)
        pipe.hincrby(key, str(int(campaign_id)), int(n))
        pipe.expire(key, CAP_TTL_S)
        count, _ = await pipe.execute()
        return int(count)

    async def incr_spend(self, campaign_id: int, day: str, micros: int) -> int:
        key = self.tagged("spend", int(campaign_id), day)
        pipe = self.client.pipeline(transaction=False)
        pipe.incrby(key, int(micros))
        pipe.expire(key, SPEND_TTL_S)
        pipe.zadd(self.key("changed", "spend"), {str(int(campaign_id)): time.time()})
        total, *_ = await pipe.execute()
        return int(total)

    async def changed_since(self, kind: str, since: float) -> list[int]:
        key = self.key("changed", check_changed_kind(kind))
        pipe = self.client.pipeline(transaction=False)
        pipe.zremrangebyscore(key, "-inf", time.time() - CHANGED_KEEP_S)
        pipe.zrangebyscore(key, f"({since}", "+inf")
        _, ids = await pipe.execute()
        return [int(i) for i in ids]

    async def get_spend(self, campaign_ids: Iterable[int], day: str) -> dict[int, int]:
        ids = [int(c) for c in campaign_ids]
        if not ids:
            return {}
        keys = [self.tagged("spend", c, day) for c in ids]
        values = await (self.client.mget_nonatomic(keys) if self.cluster
                        else self.client.mget(keys))
        return {c: int(v or 0) for c, v in zip(ids, values, strict=True)}

    async def dedupe_event(self, event_id: str, window_s: float) -> bool:
        ms = max(1, int(window_s * 1000))
        return bool(await self.client.set(self.key("evt", event_id), 1, nx=True, px=ms))

    async def claim_slot(self, event_type: str, request_id: str, ad_id: int,
                         window_s: float) -> bool:
        ms = max(1, int(window_s * 1000))
        key = self.key("slot", event_type, request_id, int(ad_id))
        return bool(await self.client.set(key, 1, nx=True, px=ms))

    async def ping(self) -> bool:
        return bool(await self.client.ping())

    async def close(self) -> None:
        if self.cluster:
            await self.client.aclose()
        else:
            await self.client.aclose(close_connection_pool=True)
