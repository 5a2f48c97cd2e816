"""Request deadlines: one absolute point in time, fixed when the request arrives.

The gateway creates a `Deadline` from the request's budget_ms; every stage call gets what is
left (`remaining_ms()`), and an HTTP stage call carries it in the header `X-Cascade-Budget-Ms`,
so a remote stage knows when its answer stops being useful and can refuse or cut work short.
Monotonic time, because wall clocks jump; a budget crosses process boundaries as a duration,
never as a timestamp, because the two processes' clocks need not agree.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping

BUDGET_HEADER = "X-Cascade-Budget-Ms"


class DeadlineExceeded(TimeoutError):
    """The request's time budget ran out before (or while) this work could be done."""


class Deadline:
    """An absolute monotonic deadline; `Deadline.none()` never expires."""

    __slots__ = ("_at",)

    def __init__(self, at: float):
        self._at = at  # time.monotonic() seconds; math.inf for no deadline

    @classmethod
    def after_ms(cls, budget_ms: float) -> Deadline:
        return cls(time.monotonic() + max(0.0, float(budget_ms)) / 1000.0)

    @classmethod
    def none(cls) -> Deadline:
        return cls(math.inf)

    @classmethod
    def from_header(cls, headers: Mapping[str, str] | None,
                    default_ms: float | None = None) -> Deadline:
        """From `X-Cascade-Budget-Ms` (case-insensitive mappings such as Starlette's headers).

        Missing -> `default_ms` (None: no deadline). Unparseable or negative -> already expired:
        a caller that sends a budget it cannot express has no time to spare either.
        """
        raw = None
        if headers is not None:  # Starlette headers are case-insensitive, plain dicts are not
            raw = headers.get(BUDGET_HEADER)
            raw = headers.get(BUDGET_HEADER.lower()) if raw is None else raw
        if raw is None:
            return cls.none() if default_ms is None else cls.after_ms(default_ms)
        try:
            budget = float(raw)
        except ValueError:
            return cls(time.monotonic())
        if math.isnan(budget):
            return cls(time.monotonic())
        return cls.after_ms(budget)

    @property
    def at(self) -> float:
        return self._at

    def remaining_ms(self) -> float:
        """Milliseconds left, never negative; inf when there is no deadline."""
        if self._at == math.inf:
            return math.inf
        return max(0.0, (self._at - time.monotonic()) * 1000.0)

    def remaining_s(self) -> float:
        return self.remaining_ms() / 1000.0

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self._at

    def check(self, what: str = "request") -> None:
        """Raise DeadlineExceeded if the budget is spent (call between units of work)."""
        if self.expired:
            raise DeadlineExceeded(f"deadline exceeded before {what}")

    def child(self, budget_ms: float | None) -> Deadline:
        """A sub-deadline: at most `budget_ms` from now, never later than this one."""
        if budget_ms is None:
            return self
        return Deadline(min(self._at, time.monotonic() + max(0.0, budget_ms) / 1000.0))

    def header(self) -> dict[str, str]:
        """The header to send with a stage call ({} when there is no deadline)."""
        if self._at == math.inf:
            return {}
        return {BUDGET_HEADER: f"{self.remaining_ms():.3f}"}

    def __repr__(self) -> str:
        return f"Deadline(remaining_ms={self.remaining_ms():.3f})"
