"""One event's effects on Redis as ONE script: the slot claim, the counters, the spend and the
label record commit together or not at all.

The worker used to claim the slot (SET NX) and then apply the effects with separate commands.
Redis dying between the two (killed, restarted from its AOF) left the claim without the effects:
the reclaimed entry then found its slot claimed and was skipped, so a click accepted by the
gateway was never counted or charged (`cascade bench chaos`, "Redis restarted from AOF": 1 event
lost). A Lua script runs atomically and is written to the AOF as one unit, so after any crash
either everything of the event is there (the retry is then a no-op) or nothing is (the retry
applies it).

The charge is computed inside the script from the spend it reads, so no give-back is needed:
`charged = min(price, cap - spend_before)` with `cap = budget + overspend allowance`, as
`services.gateway.pacing.billable_micros` computes it (-1: no campaign, charge the price).

Redis Cluster: one script may only touch one slot, and an event touches the ad's Qscore, the
user's cap or sequence, the campaign's spend and the label stream, which live on different
nodes. There the event is applied as up to four single-slot scripts (spend, ad, user, label),
each guarded by its OWN marker in its record's slot (`spend:{campaign}:applied:...`,
`qs:{ad}:applied:...`, `user:{id}:applied:...`, `{<labels key>}:applied:...`), all named by the
served slot (type, request, ad). A part whose marker is set is skipped, so a crash between parts
leaves the entry pending, and the reclaimed retry applies exactly the parts still missing: each
effect still happens once. The spend marker stores the micros charged, so a retry writes the
same `charged_micros` into the label. The `changed:*` marks are idempotent and are written after
the parts, unconditionally.
"""

from __future__ import annotations

import time
from typing import Any

from services.common.events import Event, EventType, RedisRecordLog
from services.common.store import CAP_TTL_S, SPEND_TTL_S, utc_day
from services.common.store_redis import RedisStore
from services.gateway.pacing import overspend_allowance

# KEYS: 1 slot, 2 qs, 3 changed:qs, 4 cap, 5 spend, 6 changed:spend, 7 seq, 8 labels
# ARGV: 1 window ms, 2 type, 3 ad id, 4 campaign id, 5 price, 6 cap (-1: none), 7 cap ttl,
#       8 spend ttl, 9 now (s), 10 seq entry, 11 seq len, 12 labels maxlen, 13.. label fields
# Returns -1 when the slot was already claimed, else the micros charged.
_APPLY = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then return -1 end
local kind = ARGV[2]
if kind == 'impression' then
  redis.call('HINCRBY', KEYS[2], 'impressions', 1)
  redis.call('HINCRBY', KEYS[2], 'clicks', 0)
  redis.call('ZADD', KEYS[3], ARGV[9], ARGV[3])
  redis.call('HINCRBY', KEYS[4], ARGV[4], 1)
  redis.call('EXPIRE', KEYS[4], ARGV[7])
  return 0
end
local charged = 0
if kind == 'click' then
  redis.call('HINCRBY', KEYS[2], 'impressions', 0)
  redis.call('HINCRBY', KEYS[2], 'clicks', 1)
  redis.call('ZADD', KEYS[3], ARGV[9], ARGV[3])
  local price = tonumber(ARGV[5])
  if price > 0 then
    local cap = tonumber(ARGV[6])
    if cap < 0 then
      charged = price
    else
      local before = tonumber(redis.call('GET', KEYS[5]) or '0')
      charged = math.max(0, math.min(price, cap - before))
    end
    redis.call('INCRBY', KEYS[5], charged)
    redis.call('EXPIRE', KEYS[5], ARGV[8])
    redis.call('ZADD', KEYS[6], ARGV[9], ARGV[4])
  end
  redis.call('LPUSH', KEYS[7], ARGV[10])
  redis.call('LTRIM', KEYS[7], 0, tonumber(ARGV[11]) - 1)
end
local label = {'XADD', KEYS[8], 'MAXLEN', '~', ARGV[12], '*'}
for i = 13, #ARGV do label[#label + 1] = ARGV[i] end
label[#label + 1] = 'charged_micros'
label[#label + 1] = tostring(charged)
redis.call(unpack(label))
return charged
"""


# Cluster parts. Each: KEYS[1] = the part's marker (same slot as its other keys), ARGV[1] =
# window ms; returns 1 when applied now, 0 when the marker was already set.
_SPEND_PART = """
local prior = redis.call('GET', KEYS[1])
if prior then return {0, tonumber(prior)} end
local price = tonumber(ARGV[2])
local cap = tonumber(ARGV[3])
local charged = price
if cap >= 0 then
  local before = tonumber(redis.call('GET', KEYS[2]) or '0')
  charged = math.max(0, math.min(price, cap - before))
end
redis.call('INCRBY', KEYS[2], charged)
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('SET', KEYS[1], charged, 'PX', ARGV[1])
return {1, charged}
"""
_AD_PART = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then return 0 end
redis.call('HINCRBY', KEYS[2], 'impressions', tonumber(ARGV[2]))
redis.call('HINCRBY', KEYS[2], 'clicks', tonumber(ARGV[3]))
return 1
"""
# KEYS: marker, cap, seq; ARGV: window ms, kind, campaign id, cap ttl, seq entry, seq len
_USER_PART = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then return 0 end
if ARGV[2] == 'impression' then
  redis.call('HINCRBY', KEYS[2], ARGV[3], 1)
  redis.call('EXPIRE', KEYS[2], ARGV[4])
else
  redis.call('LPUSH', KEYS[3], ARGV[5])
  redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[6]) - 1)
end
return 1
"""
_LABEL_PART = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then return 0 end
local label = {'XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*'}
for i = 3, #ARGV do label[#label + 1] = ARGV[i] end
redis.call(unpack(label))
return 1
"""


_PART_NAMES = ("spend", "ad", "user", "label")


class PartsStopped(RuntimeError):
    """`apply(..., parts=n)` stopped after n parts (a simulated crash between two parts)."""


class RedisApplier:
    """Applies events with one script per event (see the module docstring)."""

    def __init__(self, store: RedisStore, labels: RedisRecordLog) -> None:
        self.store, self.labels = store, labels
        register = store.client.register_script
        self._script = register(_APPLY)
        texts = (_SPEND_PART, _AD_PART, _USER_PART, _LABEL_PART)
        self._parts = ({name: register(text) for name, text in zip(_PART_NAMES, texts,
                                                                   strict=True)}
                       if store.cluster else {})

    @staticmethod
    def usable(store: Any, labels: Any) -> bool:
        """Both on the same Redis connection (one script can only touch one server)."""
        return (isinstance(store, RedisStore) and isinstance(labels, RedisRecordLog)
                and labels.client is store.client)

    async def apply(self, event: Event, window_s: float, budget_micros: int | None,
                    *, parts: int | None = None) -> int | None:
        """Micros charged (0 for impressions and conversions), or None when already applied.

        `parts` (cluster only) stops after that many single-slot parts, as a worker killed
        between two of them would: what the fault tests use to check the retry completes it."""
        c = event.claims
        key, tagged = self.store.key, self.store.tagged
        day = utc_day(event.ts_ms / 1000)
        price = max(0, int(c.price_micros))
        cap = -1 if budget_micros is None else budget_micros + overspend_allowance(
            price, budget_micros)
        if self.store.cluster:
            return await self._apply_parts(event, window_s, price, cap, day, parts)
        label = self._label(event)
        keys = [key("slot", event.type.value, c.request_id, int(c.ad_id)),
                tagged("qs", int(c.ad_id)), key("changed", "qs"), tagged("cap", c.user_id, day),
                tagged("spend", int(c.campaign_id), day), key("changed", "spend"),
                tagged("seq", c.user_id), self.labels.key]
        argv: list[Any] = [max(1, int(window_s * 1000)), event.type.value, int(c.ad_id),
                           int(c.campaign_id), price, cap, CAP_TTL_S, SPEND_TTL_S, time.time(),
                           f"{int(c.ad_id)}:{int(c.category_id)}", self.store.sequence_len,
                           self.labels.maxlen]
        for name, value in label.items():
            argv += [name, str(value)]
        result = int(await self._script(keys=keys, args=argv))
        return None if result < 0 else result if event.type is EventType.CLICK else 0

    async def _apply_parts(self, event: Event, window_s: float, price: int, cap: int,
                           day: str, limit: int | None) -> int | None:
        """The cluster path (see the module docstring): single-slot parts, each once."""
        c = event.claims
        budget = [len(_PART_NAMES) if limit is None else limit]

        async def part(name: str, keys: list[str], args: list[Any]) -> Any:
            if budget[0] <= 0:
                raise PartsStopped(f"stopped before the {name} part")
            budget[0] -= 1
            return await self._parts[name](keys=keys, args=args)

        kind = event.type.value
        tagged = self.store.tagged
        slot = (kind, c.request_id, int(c.ad_id))
        window_ms = max(1, int(window_s * 1000))
        applied = False
        charged = 0
        marks: list[tuple[str, int]] = []
        campaign, ad = int(c.campaign_id), int(c.ad_id)
        if event.type is EventType.CLICK and price > 0:
            new, charged = await part(
                "spend", [tagged("spend", campaign, "applied", *slot),
                          tagged("spend", campaign, day)],
                [window_ms, price, cap, SPEND_TTL_S])
            applied |= bool(new)
            charged = int(charged)
            marks.append(("spend", campaign))
        if event.type is not EventType.CONVERSION:
            clicks = int(event.type is EventType.CLICK)
            applied |= bool(await part(
                "ad", [tagged("qs", ad, "applied", *slot), tagged("qs", ad)],
                [window_ms, 1 - clicks, clicks]))
            marks.append(("qs", ad))
            applied |= bool(await part(
                "user", [tagged("user", c.user_id, "applied", *slot),
                         tagged("cap", c.user_id, day), tagged("seq", c.user_id)],
                [window_ms, kind, campaign, CAP_TTL_S, f"{ad}:{int(c.category_id)}",
                 self.store.sequence_len]))
        if event.type is not EventType.IMPRESSION:
            argv: list[Any] = [window_ms, self.labels.maxlen]
            for name, value in self._label(event).items():
                argv += [name, str(value)]
            argv += ["charged_micros", str(charged)]
            marker = "{" + self.labels.key + "}:applied:" + ":".join(str(p) for p in slot)
            applied |= bool(await part("label", [marker, self.labels.key], argv))
        if marks:  # idempotent hints for the replicas' snapshot refresh: always (re)written
            pipe = self.store.client.pipeline(transaction=False)
            now = time.time()
            for what, rid in marks:
                pipe.zadd(self.store.key("changed", what), {str(rid): now})
            await pipe.execute()
        if not applied:
            return None
        return charged if event.type is EventType.CLICK else 0

    @staticmethod
    def _label(event: Event) -> dict[str, Any]:
        c = event.claims
        return {"event_id": event.event_id, "type": event.type.value,
                "request_id": c.request_id, "ad_id": c.ad_id, "campaign_id": c.campaign_id,
                "user_id": c.user_id, "scene": c.scene, "position": c.position,
                "ts_ms": event.ts_ms}
