"""A circuit breaker per stage client: stop waiting on a stage that keeps failing, probe it again.

A stopped (SIGSTOP) or overloaded stage does not refuse connections: each call waits for the
whole remaining budget before it times out, so every request pays the full budget before the
cascade falls back. After `failures` consecutive failures the breaker OPENS: calls fail at once
(the cascade degrades without waiting). After `open_s` one call is let through as a probe
(HALF-OPEN); its success closes the breaker, its failure opens it for another `open_s`. While a
probe is in flight, other calls still fail fast.

A call that ends for lack of budget before it was sent is not the stage's fault and is not
counted; a call that timed out in flight is.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


@dataclass(frozen=True)
class BreakerConfig:
    failures: int = 5  # consecutive failures that open the breaker
    open_s: float = 2.0  # how long it stays open before one probe


class BreakerOpen(RuntimeError):
    """The stage is skipped without a call: its breaker is open."""


class CircuitBreaker:
    """Consecutive-failure breaker (not thread-safe: one per event loop, like the clients)."""

    def __init__(self, name: str, config: BreakerConfig | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.config = config or BreakerConfig()
        self._clock = clock
        self._failures = 0
        self._opened_at = 0.0
        self._state = CLOSED
        self._probing = False
        self.opened = 0  # times it opened (metrics, tests)
        self.rejected = 0  # calls refused while open

    @property
    def state(self) -> str:
        if self._state == OPEN and self._clock() - self._opened_at >= self.config.open_s:
            return HALF_OPEN
        return self._state

    def before_call(self) -> None:
        """Raise BreakerOpen unless this call may go to the stage."""
        state = self.state
        if state == CLOSED:
            return
        if state == HALF_OPEN and not self._probing:
            self._probing = True  # this call is the probe
            self._state = HALF_OPEN
            return
        self.rejected += 1
        raise BreakerOpen(f"{self.name}: circuit breaker open after {self._failures} failures")

    def success(self) -> None:
        self._failures = 0
        self._probing = False
        self._state = CLOSED

    def failure(self) -> None:
        self._failures += 1
        was_probe = self._probing
        self._probing = False
        if was_probe or self._failures >= self.config.failures:
            if self._state != OPEN:
                self.opened += 1
            self._state = OPEN
            self._opened_at = self._clock()

    def release(self) -> None:
        """A call that ended without saying anything about the stage (no budget to send)."""
        self._probing = False
        if self._state == HALF_OPEN:
            self._state = OPEN  # let the next call probe (the open time has already passed)


class BreakerGroup:
    """The breakers of one stage's replicas, read as one: what /readyz and the gauges show.

    The stage is OPEN (skipped, the cascade falls back) only when every replica's breaker is
    open; one closed replica keeps it CLOSED, since calls go to that one.
    """

    def __init__(self, breakers: Callable[[], list[CircuitBreaker]]) -> None:
        self._breakers = breakers

    @property
    def state(self) -> str:
        states = {b.state for b in self._breakers()}
        if not states or CLOSED in states:
            return CLOSED
        return HALF_OPEN if HALF_OPEN in states else OPEN

    @property
    def opened(self) -> int:
        return sum(b.opened for b in self._breakers())

    @property
    def rejected(self) -> int:
        return sum(b.rejected for b in self._breakers())

    def states(self) -> dict[str, str]:
        """Each replica's breaker state, by replica name (its URL)."""
        return {b.name: b.state for b in self._breakers()}
