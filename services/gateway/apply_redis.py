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


class RedisApplier:
    """Applies events with one script per event (see the module docstring)."""

    def __init__(self, store: RedisStore, labels: RedisRecordLog) -> None:
        self.store, self.labels = store, labels
        self._script = store.client.register_script(_APPLY)

    @staticmethod
    def usable(store: Any, labels: Any) -> bool:
        """Both on the same Redis connection (one script can only touch one server)."""
        return (isinstance(store, RedisStore) and isinstance(labels, RedisRecordLog)
                and labels.client is store.client)

    async def apply(self, event: Event, window_s: float, budget_micros: int | None
                    ) -> int | None:
        """Micros charged (0 for impressions and conversions), or None when already applied."""
        c = event.claims
        key = self.store.key
        day = utc_day(event.ts_ms / 1000)
        price = max(0, int(c.price_micros))
        cap = -1 if budget_micros is None else budget_micros + overspend_allowance(
            price, budget_micros)
        label = {"event_id": event.event_id, "type": event.type.value,
                 "request_id": c.request_id, "ad_id": c.ad_id, "campaign_id": c.campaign_id,
                 "user_id": c.user_id, "scene": c.scene, "position": c.position,
                 "ts_ms": event.ts_ms}
        keys = [key("slot", event.type.value, c.request_id, int(c.ad_id)), key("qs", c.ad_id),
                key("changed", "qs"), key("cap", c.user_id, day), key("spend", c.campaign_id, day),
                key("changed", "spend"), key("seq", c.user_id), self.labels.key]
        argv: list[Any] = [max(1, int(window_s * 1000)), event.type.value, int(c.ad_id),
                           int(c.campaign_id), price, cap, CAP_TTL_S, SPEND_TTL_S, time.time(),
                           f"{int(c.ad_id)}:{int(c.category_id)}", self.store.sequence_len,
                           self.labels.maxlen]
        for name, value in label.items():
            argv += [name, str(value)]
        result = int(await self._script(keys=keys, args=argv))
        return None if result < 0 else result if event.type is EventType.CLICK else 0
