"""The `cascade` arm against a running gateway over HTTP (`cascade replay --url`).

The gateway's store is its own, so the truth needs the behaviour sequences it serves from: the
replay keeps a mirror (an in-process store loaded from the same dataset, to which each click
it sends is appended, as the gateway's worker appends it). This holds when the gateway was
loaded from this dataset and serves no other traffic meanwhile; the README says so.

Over HTTP the stages' candidate sets are not visible, so the funnel is not measured (null), and
realised revenue is the clicked slots' prices (the worker's overspend guard is not visible).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from models.data.truth import Truth
from services.common.store_load import load_marketplace
from services.common.store_memory import MemoryStore
from services.replay.engine import ArmLog, ReplayConfig
from services.replay.traffic import ReplayRequest, Traffic

TIMEOUT_S = 30.0


class HttpArm:
    """Sends the replay's requests and events to `url` (POST /v1/ads, POST /v1/events)."""

    def __init__(self, url: str, data_dir: Path, truth: Truth, cfg: ReplayConfig,
                 traffic: Traffic) -> None:
        self.url, self.data_dir, self.truth, self.cfg = url.rstrip("/"), data_dir, truth, cfg
        self.traffic = traffic
        self.log = ArmLog(len(traffic.requests))
        self.run_id = uuid.uuid4().hex[:8]  # a rerun against the same gateway is not a dupe
        key = os.environ.get("CASCADE_API_KEY")
        self.headers = {"X-API-Key": key} if key else {}
        self.errors = 0
        self.click_spend: dict[int, int] = {}

    def run(self, progress: Callable[[str], None] | None = None) -> ArmLog:
        return asyncio.run(self._run(progress))

    async def _run(self, progress: Callable[[str], None] | None) -> ArmLog:
        self.mirror = MemoryStore()
        await load_marketplace(self.mirror, self.data_dir)
        async with httpx.AsyncClient(base_url=self.url, headers=self.headers,
                                     timeout=TIMEOUT_S) as client:
            try:
                await client.get("/healthz")
            except httpx.HTTPError as exc:
                raise ValueError(f"--url {self.url}: gateway not reachable ({exc})") from None
            for req in self.traffic.requests:
                await self._step(client, req)
                if progress:
                    progress("cascade")
        await self._budgets()
        return self.log

    async def _step(self, client: httpx.AsyncClient, req: ReplayRequest) -> None:
        col, r = self.log.columns, req.index
        user = await self.mirror.get_user_context(req.user_id)
        body = {"request_id": f"{req.request_id}-{self.run_id}", "user_id": req.user_id,
                "scene": req.scene, "slots": req.slots,
                "context": {"device": req.device, "hour": req.hour}}
        col["slots"][r] = req.slots
        answer = await client.post("/v1/ads", json=body)
        if answer.status_code != 200:
            self.errors += 1
            col["degraded"][r] = 1.0
            return
        data = answer.json()
        col["degraded"][r] = float(bool(data.get("degraded")))
        slots = data.get("slots") or []
        if not slots:
            return
        ads = np.asarray([s["ad_id"] for s in slots], np.int64)
        positions = np.asarray([s["position"] for s in slots], np.int64)
        prices = np.asarray([s["price_micros"] for s in slots], np.float64)
        click, conversion = self.log.draw_outcomes(self.truth, self.traffic, req,
                                                   user.hist_ad_id, ads, positions, prices)
        col["revenue"][r] = float((prices * click).sum())
        for i, slot in enumerate(slots):
            self.log.served_campaigns.add(int(slot["campaign_id"]))
            kinds = ["impression"] + ["click"] * bool(click[i]) \
                + ["conversion"] * bool(conversion[i])
            for kind in kinds:
                await client.post("/v1/events", json={
                    "event_id": f"{body['request_id']}:{slot['position']}:{kind}",
                    "token": slot["token"], "type": kind})
            if click[i]:
                campaign = int(slot["campaign_id"])
                self.click_spend[campaign] = self.click_spend.get(campaign, 0) + int(prices[i])
                category = int(self.truth.market.ads["category_id"][int(ads[i])])
                await self.mirror.push_behaviour(req.user_id, int(ads[i]), category)

    async def _budgets(self) -> None:
        ids = sorted(self.log.served_campaigns)
        campaigns = await self.mirror.get_campaigns(ids)
        budgets: dict[int, Any] = {c: campaigns[c].daily_budget_micros for c in ids
                                   if c in campaigns}
        self.log.spend_micros = int(sum(self.click_spend.get(c, 0) for c in budgets))
        self.log.budget_micros = int(sum(budgets.values()))
        self.log.campaigns_at_budget = sum(self.click_spend.get(c, 0) >= b
                                           for c, b in budgets.items())
