"""The event log: impression / click / conversion events between the gateway and the worker.

One interface (`EventLog`), two implementations with the same semantics, so the SAME consumer code
(`services.gateway.worker`) runs on both:

- `RedisEventLog`: Redis Streams at `{prefix}events:{tag}`, one per shard. XADD with `MAXLEN ~`;
  a consumer group made by `XGROUP CREATE ... MKSTREAM` on every shard; `XREADGROUP` hands new
  entries to one consumer and keeps them *pending* until `XACK`; `XAUTOCLAIM` moves entries
  pending longer than `min_idle_ms` (their consumer crashed) to another consumer.
- `MemoryEventLog`: the embedded default (no `REDIS_URL`): the same pending / ack / reclaim state
  machine in process, so a crash-and-reclaim test means the same thing on both.

Idempotency: `append` is "SET NX evt:{tag}:{event_id} + XADD events:{tag}" as ONE step (a Lua
script on Redis), so a duplicate event id within the window never enters the log and a failed XADD
never leaves a marker behind that would reject the client's retry.

Shards (Redis Cluster): one stream would pin every event, and every de-duplication marker, to one
node. The log is `shards` streams instead; an event id always hashes (CRC32) to the same shard,
and its marker carries that shard's hash tag, so the append script stays single-slot and both
streams and markers spread over the cluster. The tags are chosen so the shards' slots are evenly
spaced over the 16384 slots (any evenly split cluster gets its share). Consumers read every shard
with the same group; an entry id handed out is `<stream id>@<shard>` when there is more than one
shard. Default: 1 shard on a single Redis (the old behaviour, one blocking XREADGROUP), 8 on a
cluster (`CASCADE_EVENT_SHARDS` overrides). Gateways and workers must agree on the count, and
changing it means draining the log first (events left in a dropped shard are not read).

A slow or unreachable Redis: `append` gives up after `append_timeout_s` and raises
`EventLogUnavailable` (the gateway answers 503 + Retry-After). The script carries a deadline
(`write_deadline_s` after sending, by the wall clock, which Redis checks with TIME) and refuses
to write after it, so a command that sat in a frozen server's socket buffer cannot land once the
client has been told it failed: an event reported as failed is never applied. The client waits
longer than the script's deadline, so a write that did land is almost always reported; in the
rare case where its reply is lost, the client's retry of the same event id answers "duplicate",
which means "already counted". (Assumes gateway and Redis clocks agree to well under
`append_timeout_s - write_deadline_s`; NTP does.)

The worker's own per-slot markers live apart (`slot:...`, `claim_slot`).

`RecordLog` is a plain append-only stream (no groups) for the learning loop: the worker appends
click / conversion *label* records to `{prefix}labels`; the gateway may log served features to its
own stream the same way. Records are flat string fields (no pickle).
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from enum import StrEnum
from typing import Any, Protocol

from services.common.config import Settings

EVENTS_KEY = "events"
LABELS_KEY = "labels"
DEFAULT_GROUP = "workers"
DEFAULT_MAXLEN = 1_000_000
DEFAULT_DEDUPE_WINDOW_S = 86_400.0
CLUSTER_SHARDS = 8
CLUSTER_SLOTS = 16_384
SHARD_POLL_S = 0.05  # with several shards, how often an idle blocking read sweeps them


def shard_tags(shards: int) -> list[str]:
    """One hash tag per shard, tag i hashing into the i-th of `shards` even slot ranges, so
    the shards land on different nodes of any evenly split cluster. Deterministic."""
    from redis.crc import key_slot

    tags: list[str] = []
    for i in range(shards):
        low, high = i * CLUSTER_SLOTS // shards, (i + 1) * CLUSTER_SLOTS // shards
        candidates = (str(i) if j == 0 else f"{i}.{j}" for j in range(1_000_000))
        tags.append(next(t for t in candidates if low <= key_slot(t.encode()) < high))
    return tags


def shard_of(event_id: str, shards: int) -> int:
    """The shard an event id always goes to (so its de-duplication marker is found again)."""
    return zlib.crc32(event_id.encode()) % shards if shards > 1 else 0


class EventType(StrEnum):
    IMPRESSION = "impression"
    CLICK = "click"
    CONVERSION = "conversion"


class EventLogUnavailable(RuntimeError):
    """The log could not take the event in time; it was NOT appended (retry later)."""


class EventDecodeError(ValueError):
    """A log entry that does not decode to an `Event` (names the field)."""


@dataclass(frozen=True, slots=True)
class TokenClaims:
    """What the gateway signed when it served one slot (see `services.gateway.tokens`).

    It lives here, in `common`, because events carry the verified claims and `common` must not
    import the gateway. `user_id` is always a string (the API coerces numbers) so claims survive a
    round trip through the log unchanged. `expires_at` is Unix seconds.
    """

    request_id: str
    ad_id: int
    campaign_id: int
    user_id: str
    scene: str
    price_micros: int
    category_id: int
    position: int
    expires_at: int


_CLAIM_INTS = ("ad_id", "campaign_id", "price_micros", "category_id", "position", "expires_at")


@dataclass(frozen=True, slots=True)
class Event:
    """One tracking event. `ts_ms` is when the gateway accepted it (it decides the UTC day)."""

    event_id: str
    type: EventType
    claims: TokenClaims
    ts_ms: int

    def to_fields(self) -> dict[str, str]:
        """Flat stream fields: readable with redis-cli, no pickle."""
        out = {"event_id": self.event_id, "type": self.type.value, "ts_ms": str(self.ts_ms)}
        for f in fields(TokenClaims):
            out[f.name] = str(getattr(self.claims, f.name))
        return out

    @classmethod
    def from_fields(cls, raw: Mapping[str, Any]) -> Event:
        def text(name: str) -> str:
            value = raw.get(name)
            if value is None:
                raise EventDecodeError(f"event entry has no {name!r}")
            return value.decode() if isinstance(value, bytes) else str(value)

        try:
            claims = TokenClaims(**{
                f.name: int(text(f.name)) if f.name in _CLAIM_INTS else text(f.name)
                for f in fields(TokenClaims)
            })
            return cls(text("event_id"), EventType(text("type")), claims, int(text("ts_ms")))
        except (TypeError, ValueError) as exc:
            if isinstance(exc, EventDecodeError):
                raise
            raise EventDecodeError(f"malformed event entry: {exc}") from exc


@dataclass(frozen=True, slots=True)
class Delivery:
    """One log entry handed to a consumer. `event` is None when the entry does not decode; the
    consumer should ack it (and count it) rather than let it be reclaimed forever."""

    entry_id: str
    event: Event | None
    error: str = ""


def _delivery(entry_id: str, raw: Mapping[str, Any]) -> Delivery:
    try:
        return Delivery(entry_id, Event.from_fields(raw))
    except EventDecodeError as exc:
        return Delivery(entry_id, None, str(exc))


class EventLog(Protocol):
    """Append, read through a consumer group, ack, reclaim (Redis Streams semantics)."""

    async def append(self, event: Event,
                     dedupe_window_s: float = DEFAULT_DEDUPE_WINDOW_S) -> str | None:
        """Append unless this event id was seen within the window; the entry id, or None."""
        ...

    async def ensure_group(self, group: str = DEFAULT_GROUP) -> None:
        """Create the consumer group (reading from the start of the log) if it is missing."""
        ...

    async def read(self, group: str, consumer: str, count: int = 100,
                   block_ms: int | None = None) -> list[Delivery]:
        """New entries for `consumer`; they stay pending until acked. None = do not block."""
        ...

    async def ack(self, group: str, entry_ids: Sequence[str]) -> int: ...

    async def reclaim(self, group: str, consumer: str, min_idle_ms: int,
                      count: int = 100) -> list[Delivery]:
        """Move entries pending longer than `min_idle_ms` (a crashed consumer's) to `consumer`."""
        ...

    async def pending(self, group: str = DEFAULT_GROUP) -> int: ...
    async def length(self) -> int: ...
    async def close(self) -> None: ...


class RecordLog(Protocol):
    """An append-only stream of flat records (label and served-feature logs)."""

    async def append(self, record: Mapping[str, str | int | float]) -> str: ...
    async def append_many(self, records: list[Mapping[str, str | int | float]]) -> None: ...
    async def range(self, after: str | None = None, count: int = 1000
                    ) -> list[tuple[str, dict[str, str]]]: ...
    async def length(self) -> int: ...


# -- in-process --------------------------------------------------------------------------------
class _EntryIds:
    """Stream-style ids "<ms>-<seq>", strictly increasing even if the clock stands still."""

    def __init__(self) -> None:
        self._last = (0, 0)

    def next(self) -> tuple[int, int]:
        ms = int(time.time() * 1000)
        last_ms, last_seq = self._last
        self._last = (ms, 0) if ms > last_ms else (last_ms, last_seq + 1)
        return self._last


@dataclass(slots=True)
class _Pending:
    consumer: str
    delivered_at: float  # monotonic seconds
    deliveries: int


@dataclass(slots=True)
class _Group:
    last_delivered: tuple[int, int]
    pending: dict[tuple[int, int], _Pending]


def _fmt(key: tuple[int, int]) -> str:
    return f"{key[0]}-{key[1]}"


def _parse(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class MemoryEventLog:
    """`EventLog` in process: the same pending / ack / reclaim behaviour as a Redis Stream group.

    Like `MAXLEN ~`, trimming drops the oldest entries even if pending; a reclaim then skips them.
    """

    def __init__(self, maxlen: int = DEFAULT_MAXLEN,
                 clock: Any = time.monotonic) -> None:
        self.maxlen = maxlen
        self._clock = clock
        self._entries: dict[tuple[int, int], dict[str, str]] = {}
        self._order: deque[tuple[int, int]] = deque()
        self._groups: dict[str, _Group] = {}
        self._seen: dict[str, float] = {}  # event id -> marker expiry (monotonic s)
        self._ids = _EntryIds()
        self._wakeup = asyncio.Event()

    async def append(self, event: Event,
                     dedupe_window_s: float = DEFAULT_DEDUPE_WINDOW_S) -> str | None:
        now = self._clock()
        if self._seen.get(event.event_id, 0.0) > now:
            return None
        if len(self._seen) > 4 * self.maxlen:  # sweep expired markers now and then
            self._seen = {k: v for k, v in self._seen.items() if v > now}
        self._seen[event.event_id] = now + max(0.001, dedupe_window_s)
        key = self._ids.next()
        self._entries[key] = event.to_fields()
        self._order.append(key)
        while len(self._order) > self.maxlen:
            self._entries.pop(self._order.popleft(), None)
        self._wakeup.set()
        return _fmt(key)

    async def ensure_group(self, group: str = DEFAULT_GROUP) -> None:
        self._groups.setdefault(group, _Group((0, 0), {}))

    def _group(self, group: str) -> _Group:
        if group not in self._groups:
            raise KeyError(f"no consumer group {group!r} (call ensure_group first)")
        return self._groups[group]

    async def read(self, group: str, consumer: str, count: int = 100,
                   block_ms: int | None = None) -> list[Delivery]:
        state = self._group(group)
        fresh = [k for k in self._order if k > state.last_delivered][:count]
        if not fresh and block_ms:
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), block_ms / 1000)
            except TimeoutError:
                return []
            fresh = [k for k in self._order if k > state.last_delivered][:count]
        now = self._clock()
        out = []
        for key in fresh:
            state.last_delivered = key
            state.pending[key] = _Pending(consumer, now, 1)
            out.append(_delivery(_fmt(key), self._entries[key]))
        return out

    async def ack(self, group: str, entry_ids: Sequence[str]) -> int:
        state = self._group(group)
        return sum(state.pending.pop(_parse(e), None) is not None for e in entry_ids)

    async def reclaim(self, group: str, consumer: str, min_idle_ms: int,
                      count: int = 100) -> list[Delivery]:
        state = self._group(group)
        now = self._clock()
        out: list[Delivery] = []
        for key in sorted(state.pending):
            if len(out) >= count:
                break
            entry = state.pending[key]
            if (now - entry.delivered_at) * 1000 < min_idle_ms:
                continue
            if key not in self._entries:  # trimmed away: Redis drops it from the PEL too
                del state.pending[key]
                continue
            state.pending[key] = _Pending(consumer, now, entry.deliveries + 1)
            out.append(_delivery(_fmt(key), self._entries[key]))
        return out

    async def pending(self, group: str = DEFAULT_GROUP) -> int:
        return len(self._group(group).pending)

    async def length(self) -> int:
        return len(self._order)

    async def close(self) -> None:
        return None


class MemoryRecordLog:
    """`RecordLog` in process (bounded like `MAXLEN ~`)."""

    def __init__(self, maxlen: int = DEFAULT_MAXLEN) -> None:
        self._records: deque[tuple[tuple[int, int], dict[str, str]]] = deque(maxlen=maxlen)
        self._ids = _EntryIds()

    async def append(self, record: Mapping[str, str | int | float]) -> str:
        key = self._ids.next()
        self._records.append((key, {k: str(v) for k, v in record.items()}))
        return _fmt(key)

    async def append_many(self, records: list[Mapping[str, str | int | float]]) -> None:
        for record in records:
            await self.append(record)

    async def range(self, after: str | None = None, count: int = 1000
                    ) -> list[tuple[str, dict[str, str]]]:
        start = _parse(after) if after else (-1, -1)
        return [(_fmt(k), dict(r)) for k, r in self._records if k > start][:count]

    async def length(self) -> int:
        return len(self._records)


# -- Redis -------------------------------------------------------------------------------------
# KEYS[1] = evt marker, KEYS[2] = stream;
# ARGV = write deadline (Unix ms), window ms, maxlen, field, value, field, value...
# Returns the entry id, false for a duplicate, or -1 when the deadline had passed (nothing written).
_APPEND_ONCE = """
local now = redis.call('TIME')
if tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) > tonumber(ARGV[1]) then
  return -1
end
if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[2]) then return false end
local args = {'XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*'}
for i = 4, #ARGV do args[#args + 1] = ARGV[i] end
return redis.call(unpack(args))
"""
APPEND_TIMEOUT_S = 1.0  # how long /v1/events waits for the log before answering 503
WRITE_DEADLINE_S = 0.5  # after this, the script refuses to write (see the module docstring)


class RedisEventLog:
    """`EventLog` on sharded Redis Streams (see the module docstring for the commands used)."""

    def __init__(self, client: Any, prefix: str = "cascade:",
                 maxlen: int = DEFAULT_MAXLEN, key: str = EVENTS_KEY, *,
                 shards: int | None = None, append_timeout_s: float = APPEND_TIMEOUT_S,
                 write_deadline_s: float = WRITE_DEADLINE_S) -> None:
        from services.common.store_redis import is_cluster

        self.client = client  # redis.asyncio.Redis or RedisCluster, decode_responses=True
        self.prefix = prefix
        self.shards = max(1, shards or (CLUSTER_SHARDS if is_cluster(client) else 1))
        tags = shard_tags(self.shards)
        self.keys = [f"{prefix}{key}:{{{tag}}}" for tag in tags]
        self.markers = [f"{prefix}evt:{{{tag}}}:" for tag in tags]
        self.key = self.keys[0]
        self.maxlen = max(1, -(-maxlen // self.shards))  # per shard
        self.append_timeout_s = append_timeout_s
        self.write_deadline_s = min(write_deadline_s, append_timeout_s)
        self._append_once = client.register_script(_APPEND_ONCE)
        self._rotor = 0  # which shard a sweep starts at, so no shard waits behind the others

    @classmethod
    def from_url(cls, url: str, prefix: str = "cascade:", **kwargs: Any) -> RedisEventLog:
        from services.common.store_redis import redis_client

        return cls(redis_client(url), prefix, **kwargs)

    def _entry(self, shard: int, stream_id: str) -> str:
        return stream_id if self.shards == 1 else f"{stream_id}@{shard}"

    def _split(self, entry_id: str) -> tuple[int, str]:
        if self.shards == 1:
            return 0, entry_id
        stream_id, _, shard = entry_id.rpartition("@")
        return int(shard), stream_id

    async def append(self, event: Event,
                     dedupe_window_s: float = DEFAULT_DEDUPE_WINDOW_S) -> str | None:
        import redis.exceptions

        shard = shard_of(event.event_id, self.shards)
        write_by_ms = int((time.time() + self.write_deadline_s) * 1000)
        argv: list[str | int] = [write_by_ms, max(1, int(dedupe_window_s * 1000)), self.maxlen]
        for name, value in event.to_fields().items():
            argv += [name, value]
        try:
            entry = await asyncio.wait_for(
                self._append_once(keys=[self.markers[shard] + event.event_id, self.keys[shard]],
                                  args=argv), self.append_timeout_s)
        except (TimeoutError, OSError, redis.exceptions.ConnectionError,
                redis.exceptions.TimeoutError) as exc:
            raise EventLogUnavailable(f"event log unreachable: {type(exc).__name__}") from None
        except redis.exceptions.ResponseError as exc:  # LOADING, BUSY, MISCONF, ...
            raise EventLogUnavailable(f"event log refused the write: {exc}") from None
        except redis.exceptions.RedisClusterException as exc:  # no node reachable for the slot
            raise EventLogUnavailable(f"event log unreachable: {exc}") from None
        if entry == -1:
            raise EventLogUnavailable("event log too slow: the write deadline passed unwritten")
        return self._entry(shard, str(entry)) if entry else None

    async def ensure_group(self, group: str = DEFAULT_GROUP) -> None:
        import redis.exceptions

        for key in self.keys:
            try:
                await self.client.xgroup_create(key, group, id="0", mkstream=True)
            except redis.exceptions.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def _fan_out(self, count: int, ask: Callable[[Any, str, int], None],
                       entries_of: Callable[[Any], list[Any]]) -> list[Delivery]:
        """Up to `count` entries from all shards: `count` is shared over the shards (from a
        rotating start, so none waits behind the others), one pipelined command each (one
        round trip per node), then what is left is shared again over the shards not asked yet
        and those that filled their share, until `count` is reached or no shard has more."""
        start, self._rotor = self._rotor, (self._rotor + 1) % self.shards
        shards = [(start + j) % self.shards for j in range(self.shards)]
        out: list[Delivery] = []
        while shards and len(out) < count:
            base, extra = divmod(count - len(out), len(shards))
            pairs = [(shard, base + (1 if j < extra else 0)) for j, shard in enumerate(shards)]
            pairs, shards = [p for p in pairs if p[1] > 0], [p[0] for p in pairs if p[1] == 0]
            pipe = self.client.pipeline(transaction=False)
            for shard, n in pairs:
                ask(pipe, self.keys[shard], n)
            for (shard, n), reply in zip(pairs, await pipe.execute(), strict=True):
                entries = entries_of(reply)
                out += [_delivery(self._entry(shard, entry_id), raw)
                        for entry_id, raw in entries if raw is not None]
                if len(entries) >= n:
                    shards.append(shard)
        return out

    async def _sweep(self, group: str, consumer: str, count: int) -> list[Delivery]:
        """Non-blocking XREADGROUP over every shard."""
        def ask(pipe: Any, key: str, n: int) -> None:
            pipe.xreadgroup(group, consumer, {key: ">"}, count=n)

        return await self._fan_out(count, ask, lambda reply: reply[0][1] if reply else [])

    async def read(self, group: str, consumer: str, count: int = 100,
                   block_ms: int | None = None) -> list[Delivery]:
        if self.shards == 1:
            # Redis reads BLOCK 0 as "forever": never send it.
            reply = await self.client.xreadgroup(group, consumer, {self.key: ">"}, count=count,
                                                 block=block_ms or None)
            out: list[Delivery] = []
            for _stream, entries in reply or []:
                out += [_delivery(entry_id, raw) for entry_id, raw in entries if raw is not None]
            return out
        # A blocking read cannot span shards on a cluster (one command, one slot), and holding
        # a blocked connection per shard costs more than sweeping every SHARD_POLL_S.
        deadline = time.monotonic() + (block_ms or 0) / 1000
        while True:
            out = await self._sweep(group, consumer, count)
            remaining = deadline - time.monotonic()
            if out or remaining <= 0:
                return out
            await asyncio.sleep(min(SHARD_POLL_S, remaining))

    async def ack(self, group: str, entry_ids: Sequence[str]) -> int:
        if not entry_ids:
            return 0
        by_shard: dict[int, list[str]] = {}
        for entry_id in entry_ids:
            shard, stream_id = self._split(entry_id)
            by_shard.setdefault(shard, []).append(stream_id)
        if len(by_shard) == 1:
            [(shard, ids)] = by_shard.items()
            return int(await self.client.xack(self.keys[shard], group, *ids))
        pipe = self.client.pipeline(transaction=False)
        for shard, ids in by_shard.items():
            pipe.xack(self.keys[shard], group, *ids)
        return sum(int(n) for n in await pipe.execute())

    async def reclaim(self, group: str, consumer: str, min_idle_ms: int,
                      count: int = 100) -> list[Delivery]:
        def ask(pipe: Any, key: str, n: int) -> None:
            pipe.xautoclaim(key, group, consumer, min_idle_ms, start_id="0-0", count=n)

        # XAUTOCLAIM answers [next start, claimed entries, deleted ids (Redis >= 7)]
        return await self._fan_out(count, ask, lambda reply: reply[1])

    async def pending(self, group: str = DEFAULT_GROUP) -> int:
        pipe = self.client.pipeline(transaction=False)
        for key in self.keys:
            pipe.xpending(key, group)
        return sum(int(summary["pending"]) for summary in await pipe.execute())

    async def length(self) -> int:
        pipe = self.client.pipeline(transaction=False)
        for key in self.keys:
            pipe.xlen(key)
        return sum(int(n) for n in await pipe.execute())

    async def close(self) -> None:
        await self.client.aclose()


class RedisRecordLog:
    """`RecordLog` on a Redis Stream without consumer groups (readers page with XRANGE)."""

    def __init__(self, client: Any, prefix: str = "cascade:", key: str = LABELS_KEY,
                 maxlen: int = DEFAULT_MAXLEN) -> None:
        self.client = client
        self.key = prefix + key
        self.maxlen = maxlen

    async def append(self, record: Mapping[str, str | int | float]) -> str:
        values = {k: str(v) for k, v in record.items()}
        return str(await self.client.xadd(self.key, values, maxlen=self.maxlen,
                                          approximate=True))

    async def append_many(self, records: list[Mapping[str, str | int | float]]) -> None:
        """Several records in one round trip (one request's slots)."""
        pipe = self.client.pipeline(transaction=False)
        for record in records:
            pipe.xadd(self.key, {k: str(v) for k, v in record.items()}, maxlen=self.maxlen,
                      approximate=True)
        await pipe.execute()

    async def range(self, after: str | None = None, count: int = 1000
                    ) -> list[tuple[str, dict[str, str]]]:
        start = f"({after}" if after else "-"
        return [(i, dict(r)) for i, r in await self.client.xrange(self.key, start, "+", count)]

    async def length(self) -> int:
        return int(await self.client.xlen(self.key))


def make_event_log(settings: Settings, client: Any = None) -> EventLog:
    """A Redis Stream when `REDIS_URL` is set, else the in-process log.

    Pass `client` (e.g. `RedisStore.client`) to share one connection pool with the store.
    """
    if not settings.redis_url:
        return MemoryEventLog()
    shards = settings.event_shards or None
    if client is None:
        return RedisEventLog.from_url(settings.redis_url, settings.redis_prefix, shards=shards)
    return RedisEventLog(client, settings.redis_prefix, shards=shards)


def make_label_log(settings: Settings, client: Any = None, key: str = LABELS_KEY) -> RecordLog:
    """The append-only label stream (`{prefix}labels`), or an in-process one."""
    if not settings.redis_url:
        return MemoryRecordLog()
    if client is None:
        from services.common.store_redis import redis_client

        client = redis_client(settings.redis_url)
    return RedisRecordLog(client, settings.redis_prefix, key)
