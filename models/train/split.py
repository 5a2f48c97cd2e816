"""Train / validation / test split, recorded in the manifest so that eval reuses it exactly.

Two kinds:
- `ColumnSplit`: the dataset's own split, from the impressions' `split` column (train | test,
  optionally valid). A public dataset's published test rows are what its figures are
  compared on, so they are honoured as given. Without valid rows, validation is the latest
  share of the train rows by time.
- `TimeSplit`: without a `split` column, the latest shares of traffic by time. Ads data
  drifts: a random split leaks tomorrow's behaviour into today's training, so every model
  trains on the past and is measured on the future.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np

# Codes of the `split` column once read (models.data.dataset.SPLIT_CODES maps the names).
TRAIN, VALID, TEST = 0, 1, 2


class SplitRows(Protocol):
    """What a split reads of a log: timestamps and, when the dataset has one, its split."""

    ts: np.ndarray
    split: np.ndarray | None


def _cut_at_share(ts: np.ndarray, share: float) -> int:
    """The timestamp before which `share` of the rows lie: with distinct timestamps,
    `ts < cut` holds exactly round(share * n) rows (no truncated quantile, no off-by-one)."""
    ordered = np.sort(ts, kind="stable")
    k = int(round(share * ordered.shape[0]))
    if k <= 0 or k >= ordered.shape[0]:
        raise ValueError("not enough rows for a train/validation/test split")
    return int(ordered[k])


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

    def indices(self, rows: SplitRows | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ts = rows if isinstance(rows, np.ndarray) else rows.ts
        return tuple(np.flatnonzero(m) for m in self.masks(ts))  # type: ignore[return-value]

    def to_dict(self, rows: SplitRows | np.ndarray | None = None) -> dict:
        out = asdict(self)
        if rows is not None:
            out["rows"] = _counts(self.indices(rows))
        return out

    @classmethod
    def from_dict(cls, data: dict) -> TimeSplit:
        return cls(int(data["train_end_ts"]), int(data["valid_end_ts"]), "time")


@dataclass(frozen=True)
class ColumnSplit:
    """The dataset's own split. `valid_start_ts` is set when validation was carved from the
    latest train rows (ts >= it); None when the dataset names its validation rows."""

    valid_start_ts: int | None
    kind: str = "column"

    def masks(self, rows: SplitRows) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if rows.split is None:
            raise ValueError("the bundle was trained on the dataset's own split, but this "
                             "dataset has no `split` column")
        test = rows.split == TEST
        if self.valid_start_ts is None:
            return rows.split == TRAIN, rows.split == VALID, test
        given = rows.split == TRAIN
        late = rows.ts >= self.valid_start_ts
        return given & ~late, given & late, test

    def indices(self, rows: SplitRows) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return tuple(np.flatnonzero(m) for m in self.masks(rows))  # type: ignore[return-value]

    @property
    def valid_end_ts(self) -> int:
        """Compatibility for readers that sample "the future" by time (the funnel): a column
        split has no such cut, so this is -1 (every row); use `indices` instead."""
        return -1

    def to_dict(self, rows: SplitRows | None = None) -> dict:
        out = asdict(self)
        if rows is not None:
            out["rows"] = _counts(self.indices(rows))
        return out

    @classmethod
    def from_dict(cls, data: dict) -> ColumnSplit:
        start = data.get("valid_start_ts")
        return cls(None if start is None else int(start), "column")


Split = TimeSplit | ColumnSplit


def _counts(parts: tuple[np.ndarray, np.ndarray, np.ndarray]) -> dict[str, int]:
    return {name: int(len(p)) for name, p in zip(("train", "valid", "test"), parts, strict=True)}


def split_from_dict(data: dict) -> Split:
    """The split a manifest recorded (`kind` "time" when absent: older bundles)."""
    return ColumnSplit.from_dict(data) if data.get("kind") == "column" else TimeSplit.from_dict(
        data)


def time_split(ts: np.ndarray, valid_share: float = 0.1, test_share: float = 0.1) -> TimeSplit:
    """Cut so the last shares of traffic by time become validation and test."""
    if not 0 < valid_share < 1 or not 0 < test_share < 1 or valid_share + test_share >= 1:
        raise ValueError("split shares must be in (0, 1) and leave rows for training")
    if ts.shape[0] < 3:
        raise ValueError("not enough rows for a train/validation/test split")
    train_end = _cut_at_share(ts, 1 - valid_share - test_share)
    valid_end = _cut_at_share(ts, 1 - test_share)
    if not ts.min() < train_end < valid_end <= ts.max():
        raise ValueError("not enough distinct timestamps for a train/validation/test split")
    return TimeSplit(train_end, valid_end)


def column_split(rows: SplitRows, valid_share: float = 0.1) -> ColumnSplit:
    """The dataset's own split; validation, when it names none, is the latest `valid_share`
    of its train rows by time."""
    if rows.split is None:
        raise ValueError("the dataset has no `split` column")
    if not (rows.split == TRAIN).any() or not (rows.split == TEST).any():
        raise ValueError("the dataset's `split` column needs both train and test rows")
    if (rows.split == VALID).any():
        return ColumnSplit(None)
    train_ts = rows.ts[rows.split == TRAIN]
    if train_ts.shape[0] < 2:
        raise ValueError("too few train rows to carve a validation share from")
    return ColumnSplit(_cut_at_share(train_ts, 1 - valid_share))


def choose_split(rows: SplitRows, valid_share: float = 0.1, test_share: float = 0.1) -> Split:
    """The dataset's own split when it has one, else the time split."""
    if rows.split is not None:
        return column_split(rows, valid_share)
    return time_split(rows.ts, valid_share, test_share)
