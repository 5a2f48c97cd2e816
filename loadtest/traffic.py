"""The load test's traffic model, without Locust: samplers, the feedback loop, counters.

Kept apart from locustfile.py because importing Locust monkey-patches the whole process with
gevent; tests and the runner import this module instead.

- Users are drawn from the marketplace (`$CASCADE_DATA/users.parquet`) with Zipf popularity over a
  seeded random ranking, so a few heavy users dominate as in real traffic (and caches see it).
- Scenes follow a mix, each with its own slot count (`CASCADE_LOAD_SCENES`).
- Feedback loop: every returned slot gets an impression event; a click follows with probability
  pCTR and a conversion after a click with probability pCVR. The probabilities are the response's
  own pCTR / pCVR, standing in for the simulator's truth: the true values come from the
  simulator's latent marketplace, which is not stored with the data, so the load test cannot
  recompute them. A well-calibrated ranker makes the two close.
"""

from __future__ import annotations

import os
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

DEFAULT_SCENES = "home_feed:0.6:4,search:0.25:3,product_detail:0.15:2"
DEVICES = (("ios", 0.45), ("android", 0.45), ("web", 0.10))


class UserSampler:
    """Zipf(s) popularity over a seeded random ranking of the marketplace's users."""

    def __init__(self, user_ids: list[str], zipf_s: float = 1.1, seed: int = 0) -> None:
        if not user_ids:
            raise ValueError("users.parquet has no users")
        rng = np.random.default_rng(seed)
        self.user_ids = [user_ids[i] for i in rng.permutation(len(user_ids))]
        weights = 1.0 / np.arange(1, len(user_ids) + 1, dtype=np.float64) ** zipf_s
        self.cdf = np.cumsum(weights / weights.sum())
        self.rng = random.Random(seed)

    def sample(self) -> str:
        index = int(np.searchsorted(self.cdf, self.rng.random(), side="right"))
        return self.user_ids[min(index, len(self.user_ids) - 1)]


@dataclass(frozen=True)
class Scene:
    name: str
    weight: float
    slots: int


class SceneMix:
    """Scenes in proportion to their weights, each asking for its own number of slots."""

    def __init__(self, scenes: list[Scene], seed: int = 0) -> None:
        if not scenes or any(s.weight <= 0 or s.slots < 1 for s in scenes):
            raise ValueError("scene mix needs scenes with weight > 0 and slots >= 1")
        self.scenes = scenes
        self.rng = random.Random(seed + 1)

    @classmethod
    def parse(cls, spec: str, seed: int = 0) -> SceneMix:
        """"name:weight:slots,..." (CASCADE_LOAD_SCENES)."""
        scenes = []
        for item in filter(None, (part.strip() for part in spec.split(","))):
            try:
                name, weight, slots = item.split(":")
                scenes.append(Scene(name, float(weight), int(slots)))
            except ValueError:
                raise ValueError(f"bad scene {item!r}: expected name:weight:slots") from None
        return cls(scenes, seed)

    def sample(self) -> Scene:
        return self.rng.choices(self.scenes, weights=[s.weight for s in self.scenes])[0]


def load_user_ids(data_dir: str | Path) -> list[str]:
    """The marketplace's user ids as strings (the API's `user_id` type)."""
    path = Path(data_dir) / "users.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"load test needs the marketplace's users: {path} not found "
                                "(set CASCADE_DATA)")
    return [str(u) for u in pq.read_table(path, columns=["user_id"]).column(0).to_pylist()]


def degraded_stages(body: dict) -> list[str]:
    """The stages a response reports as degraded, whatever shape `stages` takes."""
    named = body.get("degraded")
    if isinstance(named, list):
        return [str(s) for s in named]
    stages = body.get("stages") or {}
    items = stages.items() if isinstance(stages, dict) else (
        (s.get("name") or s.get("stage") or "?", s) for s in stages if isinstance(s, dict))
    found = [str(name) for name, info in items if isinstance(info, dict) and info.get("degraded")]
    if not found and named:
        return [str(named)]
    return found


def feedback_events(slots: list[dict], rng: random.Random) -> list[tuple[str, str]]:
    """(type, token) per response: an impression per slot, clicks at pCTR, conversions at pCVR."""
    out = []
    for slot in slots:
        token = slot.get("token")
        if not token:
            continue
        out.append(("impression", token))
        if rng.random() < float(slot.get("pctr") or 0.0):
            out.append(("click", token))
            pcvr = slot.get("pcvr")
            if pcvr is not None and rng.random() < float(pcvr):
                out.append(("conversion", token))
    return out


class Traffic:
    """Samplers and counters shared by every simulated frontend in this locust process."""

    def __init__(self, users: UserSampler, scenes: SceneMix, feedback: float, seed: int) -> None:
        self.users, self.scenes, self.feedback = users, scenes, feedback
        self.rng = random.Random(seed + 2)
        self.run_id = uuid.uuid4().hex[:12]
        self.sequence = 0
        self.counts: Counter[str] = Counter()
        self.degraded_by_stage: Counter[str] = Counter()

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Traffic:
        env = dict(os.environ if env is None else env)
        seed = int(env.get("CASCADE_LOAD_SEED", "0"))
        data = env.get("CASCADE_DATA")
        if not data:
            raise ValueError("CASCADE_DATA is not set: the load test draws users from the "
                             "marketplace's users.parquet")
        users = UserSampler(load_user_ids(data), float(env.get("CASCADE_LOAD_ZIPF", "1.1")), seed)
        scenes = SceneMix.parse(env.get("CASCADE_LOAD_SCENES", DEFAULT_SCENES), seed)
        return cls(users, scenes, float(env.get("CASCADE_LOAD_FEEDBACK", "1.0")), seed)

    def next_id(self) -> str:
        self.sequence += 1
        return f"{self.run_id}-{self.sequence}"

    def ad_request(self) -> dict:
        scene = self.scenes.sample()
        device = self.rng.choices([d for d, _ in DEVICES], weights=[w for _, w in DEVICES])[0]
        return {"request_id": self.next_id(), "user_id": self.users.sample(),
                "scene": scene.name, "slots": scene.slots,
                "context": {"device": device, "hour": time.gmtime().tm_hour}}

    def reset(self) -> None:
        self.counts.clear()
        self.degraded_by_stage.clear()

    def sidecar(self) -> dict:
        return {"answered": self.counts["answered"], "degraded": self.counts["degraded"],
                "degraded_by_stage": dict(self.degraded_by_stage),
                "slots": self.counts["slots"],
                "events": {kind: self.counts[kind]
                           for kind in ("impression", "click", "conversion") if self.counts[kind]},
                "event_failures": self.counts["event_failures"],
                "clicks": self.counts["click"], "conversions": self.counts["conversion"],
                "truth": "response pctr/pcvr (simulator truth is not recoverable from the data)"}
