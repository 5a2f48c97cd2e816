"""One vectorised id -> row lookup for every table keyed by ad or campaign id.

The catalog, the Qscore table, pacing, pre-ranking, ranking and retrieval all turn ~2,000
candidate ids into row numbers per request. They share this one class, so the lookup (and its
edge cases: unknown ids, negative ids, ids past the table) is written once.

- A dense table (`row_of[id]`) when ids are compact, the usual case: ~5 µs for 2k ids.
- A sorted search otherwise (~0.3 ms for 2k ids among 1M): ids may be any int64.

An index is immutable once built; tables that take new ids build a new index and swap it
whole, so a reader holding the old one stays consistent.
"""

from __future__ import annotations

import numpy as np

DENSE_SLACK = 4  # dense while max id < 4·N + 1M entries (≤ 8 bytes × that)
DENSE_FLOOR = 1 << 20


class IdIndex:
    """Rows of ids (`-1` for ids it does not hold); see the module docstring."""

    __slots__ = ("ids", "_dense", "_order", "_sorted")

    def __init__(self, ids: np.ndarray) -> None:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        self.ids = ids
        self._dense: np.ndarray | None = None
        self._order = self._sorted = np.empty(0, np.int64)
        top = int(ids.max()) + 1 if ids.size else 0
        if ids.size and int(ids.min()) >= 0 and top <= DENSE_SLACK * ids.size + DENSE_FLOOR:
            self._dense = np.full(top, -1, dtype=np.int64)
            self._dense[ids] = np.arange(ids.size, dtype=np.int64)
        else:
            self._order = np.argsort(ids, kind="stable").astype(np.int64)
            self._sorted = ids[self._order]

    def __len__(self) -> int:
        return int(self.ids.size)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Row of each id; -1 where the index does not hold it."""
        ids = np.asarray(ids, dtype=np.int64)
        if self._dense is not None:
            inside = (ids >= 0) & (ids < self._dense.size)
            return np.where(inside, self._dense[np.where(inside, ids, 0)], -1)
        if not self._sorted.size:
            return np.full(ids.shape, -1, np.int64)
        pos = np.searchsorted(self._sorted, ids).clip(0, self._sorted.size - 1)
        return np.where(self._sorted[pos] == ids, self._order[pos], -1)

    def get(self, id_: int) -> int | None:
        """One id's row, or None."""
        row = int(self.rows(np.array([id_], np.int64))[0])
        return row if row >= 0 else None

    def __contains__(self, id_: object) -> bool:
        return isinstance(id_, int | np.integer) and self.get(int(id_)) is not None


def unique_values(values: np.ndarray) -> np.ndarray:
    """Sorted distinct values: `np.unique` without its overhead (numpy 2's `np.unique` takes
    ~0.5 ms for 2,000 ids, a sort and a neighbour compare ~0.05 ms)."""
    ordered = np.sort(np.asarray(values))
    if ordered.size < 2:
        return ordered
    keep = np.empty(ordered.size, bool)
    keep[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=keep[1:])
    return ordered[keep]


def first_occurrences(keys: np.ndarray) -> np.ndarray:
    """Positions of the first occurrence of each distinct key, in their original order (e.g.
    the best ad of each campaign in a list sorted best first)."""
    keys = np.asarray(keys)
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    first = np.ones(ordered.size, bool)
    if ordered.size > 1:
        np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    return np.sort(order[first])
