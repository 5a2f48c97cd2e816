"""The replayed traffic: requests on a simulated clock and the random draws every arm shares.

Requests are drawn as the load test draws them (loadtest/traffic.py: Zipf-popular users over a
seeded ranking, the scene mix with its slot counts, devices), and placed on a simulated day:
arrival times are sorted uniform draws over [0, 24 h), i.e. a Poisson process conditioned on
the request count, so hour-of-day features and the pacing schedule see the whole day.

Common random numbers: the uniforms that decide clicks and conversions are drawn up front, one
per (request, slot). Every arm sees the same requests and the same uniforms, so the difference
between two arms is the difference of their decisions, not of their luck, and a paired
bootstrap over requests measures it tightly.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from loadtest.traffic import DEFAULT_SCENES, DEVICES, SceneMix, UserSampler, load_user_ids

DAY_S = 86_400.0


@dataclass(frozen=True)
class ReplayRequest:
    """One replayed ad request: who, where, when (simulated), how many slots."""

    index: int
    request_id: str
    user_id: str
    scene: str
    slots: int
    device: str
    sim_s: float  # seconds since the simulated day's midnight

    @property
    def hour(self) -> int:
        return int(self.sim_s // 3600) % 24


@dataclass(frozen=True)
class Traffic:
    """The request sequence and the per-(request, slot) uniforms of one replay."""

    requests: list[ReplayRequest]
    u_click: np.ndarray  # [requests, max slots]
    u_conversion: np.ndarray  # [requests, max slots]
    seed: int

    def prefix(self, n: int) -> Traffic:
        """The first `n` requests with their draws (an arm too costly for all of them)."""
        return Traffic(self.requests[:n], self.u_click[:n], self.u_conversion[:n], self.seed)


def draw_traffic(data_dir: str | Path, n: int, seed: int,
                 scenes: str = DEFAULT_SCENES, zipf_s: float = 1.1) -> Traffic:
    """N requests and their uniforms, a pure function of (dataset users, n, seed, mix)."""
    if n < 1:
        raise ValueError("--requests must be at least 1")
    users = UserSampler(load_user_ids(data_dir), zipf_s, seed)
    mix = SceneMix.parse(scenes, seed)
    rng = random.Random(seed + 2)
    times = np.sort(np.random.default_rng([seed, 3]).random(n)) * DAY_S
    requests = []
    for i in range(n):
        scene = mix.sample()
        device = rng.choices([d for d, _ in DEVICES], weights=[w for _, w in DEVICES])[0]
        requests.append(ReplayRequest(i, f"replay-{seed}-{i}", users.sample(), scene.name,
                                      scene.slots, device, float(times[i])))
    width = max(s.slots for s in mix.scenes)
    draws = np.random.default_rng([seed, 4])
    return Traffic(requests, draws.random((n, width)), draws.random((n, width)), seed)


def midnight_today() -> float:
    """Unix time of today's UTC midnight: the simulated day is laid over the real one, so the
    store's day keys (caps, spend: by wall-clock day) and the pacer's day agree."""
    now = datetime.now(tz=UTC)
    return now.replace(hour=0, minute=0, second=0, microsecond=0).timestamp()
