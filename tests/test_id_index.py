"""The one id -> row lookup: dense and sorted layouts agree with a dict on any ids."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.id_index import IdIndex, first_occurrences, unique_values


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(-5, 3_000), unique=True, max_size=60),
       st.lists(st.integers(-10, 3_010), max_size=80), st.booleans())
def test_rows_equal_a_dict_lookup(ids: list[int], queries: list[int], sparse: bool) -> None:
    if sparse:  # ids far apart force the sorted layout
        ids = [i * 10**12 for i in ids]
        queries = [q * 10**12 for q in queries]
    index = IdIndex(np.asarray(ids, np.int64))
    row_of = {a: r for r, a in enumerate(ids)}
    got = index.rows(np.asarray(queries, np.int64))
    assert got.tolist() == [row_of.get(q, -1) for q in queries]
    for q in queries[:5]:
        assert index.get(q) == row_of.get(q)
        assert (q in index) == (q in row_of)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(-20, 20), max_size=50))
def test_unique_and_first_occurrences(values: list[int]) -> None:
    array = np.asarray(values, np.int64)
    assert unique_values(array).tolist() == sorted(set(values))
    firsts = first_occurrences(array).tolist()
    seen: dict[int, int] = {}
    for i, v in enumerate(values):
        seen.setdefault(v, i)
    assert firsts == sorted(seen.values())
