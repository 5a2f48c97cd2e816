"""Row-aligned per-ad arrays (vectors, encoded features) behind an ad_id -> row lookup.

Pre-ranking keeps the DQM ad-vector matrix here and ranking the encoded catalog features; both
must find the rows of ~2,000 candidate ids in a few µs, and both must take new ads (catalog
updates) without a rebuild and without blocking readers.

- Lookup is the shared `IdIndex` (dense when ids are compact, sorted otherwise); ads appended
  after load sit in a small dict consulted only for misses.
- Appends write the new row first and publish its id afterwards, so a reader never sees an id
  whose row is not written. Capacity grows by doubling into new arrays (copy-on-write); a reader
  holds the arrays it started with (`snapshot()`), and rows beyond them count as unknown.
- Writers serialise on one lock; readers take none.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from services.common.id_index import IdIndex


@dataclass(frozen=True)
class Snapshot:
    """Arrays a reader works on: each column has `capacity` rows, the first rows are used."""

    columns: dict[str, np.ndarray]
    capacity: int


class AdTable:
    """ad_id -> row into named columns whose first dimension is the ad."""

    def __init__(self, ad_ids: np.ndarray, columns: Mapping[str, np.ndarray],
                 spare: int = 1024) -> None:
        ad_ids = np.ascontiguousarray(ad_ids, dtype=np.int64)
        if ad_ids.size and (ad_ids < 0).any():
            raise ValueError("ad ids must be >= 0")
        if np.unique(ad_ids).size != ad_ids.size:
            raise ValueError("ad ids are not unique")
        n = ad_ids.size
        for name, column in columns.items():
            if column.shape[0] != n:
                raise ValueError(f"column '{name}' has {column.shape[0]} rows for {n} ads")
        capacity = n + spare
        grown = {}
        for name, column in columns.items():
            array = np.zeros((capacity, *column.shape[1:]), dtype=column.dtype)
            array[:n] = column
            grown[name] = array
        self._snapshot = Snapshot(grown, capacity)
        self._used = n
        self._fresh: dict[int, int] = {}
        self._lock = threading.Lock()
        self._index = IdIndex(ad_ids)

    def __len__(self) -> int:
        return self._used

    def snapshot(self) -> Snapshot:
        return self._snapshot

    def rows(self, ad_ids: np.ndarray, snapshot: Snapshot | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
        """(rows, known) for the ids; unknown ids get row 0 and known=False."""
        ids = np.asarray(ad_ids, dtype=np.int64)
        rows = self._index.rows(ids)
        fresh = self._fresh
        if fresh:
            missing = np.flatnonzero(rows < 0)
            for i in missing.tolist():
                rows[i] = fresh.get(int(ids[i]), -1)
        capacity = (snapshot or self._snapshot).capacity
        known = (rows >= 0) & (rows < capacity)
        return np.where(known, rows, 0), known

    def row(self, ad_id: int) -> int | None:
        rows, known = self.rows(np.array([ad_id], dtype=np.int64))
        return int(rows[0]) if known[0] else None

    def upsert(self, ad_id: int, values: Mapping[str, np.ndarray]) -> bool:
        """Write one ad's values (every column); True when the ad was new."""
        with self._lock:
            snap = self._snapshot
            missing = set(snap.columns) - set(values)
            if missing:
                raise ValueError(f"ad {ad_id}: values missing for {sorted(missing)}")
            row = self.row(ad_id)
            if row is not None:  # an existing ad: rewrite its row in place
                for name, value in values.items():
                    snap.columns[name][row] = value
                return False
            row = self._used
            if row >= snap.capacity:
                capacity = max(2 * snap.capacity, 1024)
                grown = {}
                for name, column in snap.columns.items():
                    array = np.zeros((capacity, *column.shape[1:]), dtype=column.dtype)
                    array[:row] = column[:row]
                    grown[name] = array
                snap = Snapshot(grown, capacity)
                self._snapshot = snap
            for name, value in values.items():
                snap.columns[name][row] = value
            self._used = row + 1
            fresh = dict(self._fresh)
            fresh[int(ad_id)] = row
            self._fresh = fresh  # published last: the row is written before its id is visible
            return True
