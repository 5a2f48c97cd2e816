"""MovieLens 100k importer: a small fixture in the official ml-100k layout becomes a dataset
that the feature schema reads, with leak-free behaviour sequences and a time split."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from cli.main import run as cli_run
from models.data import layout
from models.data.movielens import MovieLensError, import_movielens
from models.features import load_schema
from services.common.store_load import load_marketplace
from services.common.store_memory import MemoryStore

# u.data rows: user, item, rating, unix seconds (file order is not time order)
RATINGS = [
    (1, 10, 5, 1000), (1, 11, 4, 2000), (1, 12, 2, 2000), (1, 13, 4, 3000),
    (2, 10, 3, 1500), (2, 12, 5, 1500), (2, 11, 4, 2500), (1, 14, 5, 4000),
    (2, 13, 1, 5000), (2, 14, 4, 6000),
]
ITEMS = {10: ("01-Jan-1995", 3), 11: ("12-Mar-1977", 8), 12: ("", -1),  # -1: no genre
         13: ("01-Jan-1931", 0), 14: ("05-May-1998", 18)}
USERS = [(1, 24, "M", "technician", "85711"), (2, 53, "F", "other", "T8H1N")]


def write_ml100k(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in RATINGS))
    lines = []
    for item, (released, genre) in ITEMS.items():
        flags = ["1" if g == genre else "0" for g in range(19)]
        lines.append("|".join([str(item), f"Movie {item}", released, "", "url", *flags]))
    (root / "u.item").write_text("\n".join(lines) + "\n", encoding="latin-1")
    (root / "u.user").write_text("".join("|".join(map(str, u)) + "\n" for u in USERS))
    return root


@pytest.fixture
def imported(tmp_path: Path) -> tuple[Path, dict]:
    out = tmp_path / "out"
    return out, import_movielens(write_ml100k(tmp_path / "ml-100k"), out)


def _impressions(out: Path) -> dict[str, list]:
    return pq.read_table(out / layout.IMPRESSIONS_DIR).to_pydict()


def test_labels_come_from_ratings_and_rows_are_in_time_order(imported) -> None:
    out, summary = imported
    rows = _impressions(out)
    assert rows["ts"] == sorted(rows["ts"])
    by_key = {(u, a, t // 1000): (c, v) for u, a, t, c, v in zip(
        rows["user_id"], rows["ad_id"], rows["ts"], rows["click"], rows["conversion"],
        strict=True)}
    for user, item, rating, ts in RATINGS:
        assert by_key[(user, item, ts)] == (int(rating >= 4), int(rating == 5))
    assert summary["impressions"] == len(RATINGS) and summary["clicks"] == 7
    assert summary["conversions"] == 3 and np.isnan(rows["true_pctr"]).all()


def test_behaviours_are_earlier_clicks_newest_first_never_the_same_time(imported) -> None:
    out, _ = imported
    requests = pq.read_table(out / layout.REQUESTS_DIR).to_pydict()
    hist = {(u, t // 1000): (a, c) for u, t, a, c in zip(
        requests["user_id"], requests["ts"], requests["hist_ad_id"],
        requests["hist_category_id"], strict=True)}
    assert hist[(1, 1000)] == ([], [])
    assert hist[(1, 2000)] == ([10], [4])  # item 11 (rated 4 at the same time) is not seen
    assert hist[(1, 3000)] == ([11, 10], [9, 4])  # item 12 was rated 2: not a click
    assert hist[(1, 4000)] == ([13, 11, 10], [1, 9, 4])
    assert hist[(2, 1500)] == ([], [])  # both of user 2's first ratings share a time
    assert hist[(2, 6000)] == ([11, 12], [9, 0])  # item 12 has no genre: category 0


def test_global_time_split_keeps_the_latest_fifth_for_test(imported) -> None:
    out, summary = imported
    rows = _impressions(out)
    train = [t for t, s in zip(rows["ts"], rows["split"], strict=True) if s == "train"]
    test = [t for t, s in zip(rows["ts"], rows["split"], strict=True) if s == "test"]
    assert max(train) < min(test)
    assert (summary["train_impressions"], summary["test_impressions"]) == (len(train),
                                                                          len(test)) == (8, 2)


def test_the_schema_encodes_the_tables_and_the_store_loads_them(imported) -> None:
    out, _ = imported
    schema = load_schema(out / layout.SCHEMA_FILE)
    users = pq.read_table(out / layout.USERS_FILE).to_pydict()
    assert users["age_bucket"] == [1, 5] and users["zip_region"] == [8, 10]
    assert users["occupation"] == [0, 1]
    ads = pq.read_table(out / layout.ADS_FILE).to_pydict()
    assert ads["category_id"] == [4, 9, 0, 1, 19]
    assert ads["decade"] == [7, 5, -1, 1, 7]
    assert schema["decade"].encode(np.array(ads["decade"])).tolist() == [8, 6, 0, 2, 8]
    assert schema["gender"].encode(np.array(users["gender"], dtype=object)).tolist() == [2, 1]
    store = MemoryStore()
    asyncio.run(load_marketplace(store, out))
    ad = asyncio.run(store.get_ads([14]))[14]
    assert ad.bid_type == "cpc" and ad.campaign_id == 14


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, capsys) -> None:
    src = write_ml100k(tmp_path / "ml")
    (src / "u.user").unlink()
    with pytest.raises(MovieLensError, match="u.user missing"):
        import_movielens(src, tmp_path / "out")
    write_ml100k(src)
    (src / "u.data").write_text("1\t10\t7\t100\n")
    try:
        cli_run(["import-movielens", "--src", str(src), "--out", str(tmp_path / "out")])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rating outside 1-5" in err[0]
