"""Open-loop arrival schedules: when each ad request is due, fixed before the run starts.

The schedule does not depend on how fast the server answers: the Locust users take the next due
time from it, and a request's latency counts from that due time, so a slow answer can neither
thin out the offered load nor hide its own queueing (coordinated omission).

- `poisson`: exponential gaps at the offered rate (what many independent frontends produce);
  the gaps' coefficient of variation is 1. The count is fixed at rate x seconds.
- `uniform`: evenly spaced at the offered rate, from a random phase; coefficient of variation 0.
- `burst`: N requests due at the same instant, once per period N / rate: burst tolerance,
  measured on purpose.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

ARRIVALS = ("poisson", "uniform")


def arrival_schedule(rate: float, seconds: float, arrivals: str = "poisson", seed: int = 0,
                     burst: int = 0) -> list[float]:
    """Due times in seconds from the start of the run, ascending, all within [0, seconds)."""
    if rate <= 0 or seconds <= 0:
        raise ValueError("rate and seconds must be > 0")
    rng = np.random.default_rng(seed)
    if burst > 0:
        period = burst / rate
        phase = rng.uniform(0.0, period)
        starts = np.arange(phase, seconds, period)
        return np.repeat(starts, burst).tolist()
    if arrivals == "uniform":
        gap = 1.0 / rate
        return np.arange(rng.uniform(0.0, gap), seconds, gap).tolist()
    if arrivals == "poisson":
        # A Poisson process given its count: that many uniform points, sorted (order
        # statistics). The gaps are exponential as in the open process (CV 1), but a run offers
        # exactly rate x seconds requests, so "achieved vs offered" compares like with like
        # instead of with a count that is itself +-sqrt(n) noise.
        count = max(1, round(rate * seconds))
        return np.sort(rng.uniform(0.0, seconds, size=count)).tolist()
    raise ValueError(f"unknown arrivals {arrivals!r} (choose from {', '.join(ARRIVALS)})")


def coefficient_of_variation(times: Sequence[float]) -> float:
    """std / mean of the gaps between consecutive times (sorted first); NaN under 3 times."""
    if len(times) < 3:
        return math.nan
    gaps = np.diff(np.sort(np.asarray(times, dtype=np.float64)))
    mean = float(gaps.mean())
    return float(gaps.std() / mean) if mean > 0 else math.nan


def pool_size(rate: float, latency_bound_s: float, burst: int = 0, cap: int = 1000) -> int:
    """Locust users enough that one is free whenever a request falls due.

    A user is busy for one answer (plus its feedback posts), so rate x a generous latency bound
    covers the steady state; a burst needs its N users at once, twice over so the next burst
    finds them free even if the last one was slow. Capped: past the cap requests go late, and
    their latency still counts from the due time.
    """
    steady = math.ceil(rate * latency_bound_s) + 4
    return max(1, min(cap, max(steady, 2 * burst)))
