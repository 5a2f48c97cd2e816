"""Time-ordered train / validation / test split, recorded so that eval reuses it exactly.

Ads data drifts: a random split leaks tomorrow's behaviour into today's training, so every model
trains on the past and is measured on the future.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class TimeSplit:
    """Row ranges by timestamp: train < train_end_ts <= valid < valid_end_ts <= test."""

    train_end_ts: int
    valid_end_ts: int
    kind: str = "time"

    def masks(self, ts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        train = ts < self.train_end_ts
        test = ts >= self.valid_end_ts
        return train, ~train & ~test, test

    def indices(self, ts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return tuple(np.flatnonzero(m) for m in self.masks(ts))  # type: ignore[return-value]

    def to_dict(self, ts: np.ndarray | None = None) -> dict:
        out = asdict(self)
        if ts is not None:
            train, valid, test = self.masks(ts)
            out["rows"] = {"train": int(train.sum()), "valid": int(valid.sum()),
                           "test": int(test.sum())}
        return out

    @classmethod
    def from_dict(cls, data: dict) -> TimeSplit:
        return cls(int(data["train_end_ts"]), int(data["valid_end_ts"]), data.get("kind", "time"))


def time_split(ts: np.ndarray, valid_share: float = 0.1, test_share: float = 0.1) -> TimeSplit:
    """Cut at timestamp quantiles so the last shares of traffic become validation and test."""
    if not 0 < valid_share < 1 or not 0 < test_share < 1 or valid_share + test_share >= 1:
        raise ValueError("split shares must be in (0, 1) and leave rows for training")
    train_end = int(np.quantile(ts, 1 - valid_share - test_share))
    valid_end = int(np.quantile(ts, 1 - test_share))
    if not ts.min() < train_end < valid_end <= ts.max():
        raise ValueError("not enough distinct timestamps for a train/validation/test split")
    return TimeSplit(train_end, valid_end)
