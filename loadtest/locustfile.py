"""Locust traffic for the gateway: an ad frontend that asks for ads and reports what users did.

The traffic model (Zipf users, scene mix, feedback at pCTR / pCVR) is loadtest/traffic.py.
Pacing: `constant_throughput` per user; `loadtest.run` starts rps / per-user-rate users so the
target rate is offered whatever the latency (a user only falls behind when one iteration takes
longer than 1 / per-user-rate).

Environment: CASCADE_DATA, CASCADE_API_KEY, CASCADE_LOAD_USER_RPS (1.0), CASCADE_LOAD_ZIPF (1.1),
CASCADE_LOAD_SCENES ("home_feed:0.6:4,search:0.25:3,product_detail:0.15:2", name:weight:slots),
CASCADE_LOAD_FEEDBACK (share of answered requests that report events, 1.0),
CASCADE_LOAD_SEED (0), CASCADE_LOAD_SIDECAR (JSON counts written at exit),
CASCADE_LOAD_METRICS_START + CASCADE_LOAD_METRICS_URLS (save the services' /metrics once all
users run, so stage times cover only the offered load).
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import gevent
from locust import FastHttpUser, constant_throughput, events, task

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # locust -f runs this as a script
from loadtest.report import scrape_all  # noqa: E402
from loadtest.traffic import Traffic, degraded_stages, feedback_events  # noqa: E402

ADS_NAME = "/v1/ads"
TRAFFIC: Traffic | None = None


@events.init.add_listener
def _on_init(environment, **_kwargs) -> None:  # noqa: ANN001 - locust's signature
    global TRAFFIC
    TRAFFIC = Traffic.from_env()


@events.spawning_complete.add_listener
def _on_spawned(user_count: int, **_kwargs) -> None:
    """Offered load is reached: zero our counters (as --reset-stats does) and scrape /metrics."""
    if TRAFFIC is not None:
        TRAFFIC.reset()
    target = os.environ.get("CASCADE_LOAD_METRICS_START")
    urls = [u for u in os.environ.get("CASCADE_LOAD_METRICS_URLS", "").split(",") if u]
    if target and urls:
        Path(target).write_text(scrape_all(urls, os.environ.get("CASCADE_API_KEY", "")))


@events.quitting.add_listener
def _on_quit(environment, **_kwargs) -> None:  # noqa: ANN001 - locust's signature
    target = os.environ.get("CASCADE_LOAD_SIDECAR")
    if target and TRAFFIC is not None:
        Path(target).write_text(json.dumps(TRAFFIC.sidecar(), indent=2))


class AdFrontend(FastHttpUser):
    """One ad frontend session: ask for ads, report impressions, clicks and conversions."""

    wait_time = constant_throughput(float(os.environ.get("CASCADE_LOAD_USER_RPS", "1.0")))

    def on_start(self) -> None:
        self.headers = {"X-API-Key": os.environ.get("CASCADE_API_KEY", ""),
                        "Content-Type": "application/json"}
        # Spread the users over one pacing period: users spawned together would otherwise
        # fire in lock-step bursts, each second's requests queueing behind each other, which
        # measures the burst, not the offered rate.
        gevent.sleep(random.random() / float(os.environ.get("CASCADE_LOAD_USER_RPS", "1.0")))

    @task
    def ads_and_feedback(self) -> None:
        traffic = TRAFFIC
        assert traffic is not None, "locustfile init did not run"
        with self.client.post("/v1/ads", json=traffic.ad_request(), headers=self.headers,
                              name=ADS_NAME, catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}")
                return
            try:
                body = response.json()
                slots = list(body.get("slots") or [])
            except (ValueError, TypeError, AttributeError):
                response.failure("response is not the /v1/ads JSON")
                return
            traffic.counts["answered"] += 1
            traffic.counts["slots"] += len(slots)
            degraded = degraded_stages(body)
            if degraded:
                traffic.counts["degraded"] += 1
                traffic.degraded_by_stage.update(degraded)
        if traffic.rng.random() >= traffic.feedback:
            return
        for kind, token in feedback_events(slots, traffic.rng):
            traffic.counts[kind] += 1
            self.client.post("/v1/events", name=f"event:{kind}", headers=self.headers,
                             json={"event_id": traffic.next_id(), "token": token, "type": kind})
