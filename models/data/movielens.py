"""Import MovieLens 100k (GroupLens' public ratings) as a Cascade dataset.

The source is the official `ml-100k` directory: `u.data` (user, item, rating, unix time,
tab-separated), `u.item` (item | title | release date | video date | URL | 19 genre flags,
Latin-1) and `u.user` (user | age | gender | occupation | zip). movielens_schema.yaml documents
which field becomes which feature.

How ratings become ad-serving logs:
- each rating is one request with one impression at position 0, at the rating's time;
- click = rating >= 4 and conversion = rating 5 (conversion implies click): the usual
  "liked" and "loved" thresholds. A rated movie was shown; an unrated one was not, so the
  labels rank what a user thought of what they watched, not what they chose to watch;
- the behaviour sequence is the movies the user clicked strictly before that time, newest
  first (ties in time never leak a label into its own features);
- the split is global by time: ratings before the 80% quantile of time train (validation is
  then the latest 10% of them), the rest test (`split` column, summary `split: "time80"`);
- there is no oracle (true_pctr / true_pcvr are NaN), and every movie is its own CPC campaign
  with `layout.IMPORT_BID_MICROS`, so the serving path can run on it too.
"""

from __future__ import annotations

import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from models.data import layout

SCHEMA_PATH = Path(__file__).with_name("movielens_schema.yaml")
FILES = ("u.data", "u.item", "u.user")
CLICK_RATING, CONVERSION_RATING = 4, 5
TRAIN_SHARE = 0.8  # of ratings by time
GENRES = 19  # u.item's genre flags (the first is "unknown")
AGE_EDGES = (18, 25, 35, 45, 50, 56)  # MovieLens 1M's age groups: <18, 18-24, ..., 56+
FIRST_DECADE = 1920
SCENE = "movies"


class MovieLensError(ValueError):
    """MovieLens input that cannot be imported (names the file and line)."""


def _rows(path: Path, sep: str, min_fields: int) -> list[list[str]]:
    rows = []
    with path.open(encoding="latin-1") as fh:
        for number, line in enumerate(fh, start=1):
            line = line.rstrip("\r\n")
            if not line:
                continue
            fields = line.split(sep)
            if len(fields) < min_fields:
                raise MovieLensError(f"{path.name}:{number}: expected at least {min_fields} "
                                     f"{'tab' if sep == chr(9) else repr(sep)}-separated fields")
            rows.append(fields)
    return rows


def _int(value: str, path: Path, number: int, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise MovieLensError(f"{path.name}:{number}: {what} {value!r} is not an integer") from None


def read_ratings(src: Path) -> np.ndarray:
    """[n, 4] int64: user, item, rating, unix seconds."""
    path = src / "u.data"
    rows = _rows(path, "\t", 4)
    out = np.empty((len(rows), 4), dtype=np.int64)
    for i, fields in enumerate(rows):
        for j, what in enumerate(("user id", "item id", "rating", "timestamp")):
            out[i, j] = _int(fields[j], path, i + 1, what)
    bad = (out[:, 2] < 1) | (out[:, 2] > 5)
    if bad.any():
        raise MovieLensError(f"u.data:{int(np.flatnonzero(bad)[0]) + 1}: rating outside 1-5")
    return out


def read_items(src: Path) -> dict[int, tuple[int, int]]:
    """Item -> (category: 1 + its first genre flag set, 0 when none; decade: 0 for the 1920s
    and before, -1 when the release date is unknown)."""
    path = src / "u.item"
    items = {}
    for number, fields in enumerate(_rows(path, "|", 5 + GENRES), start=1):
        flags = fields[5:5 + GENRES]
        genre = next((g for g, flag in enumerate(flags) if flag.strip() == "1"), -1)
        year = fields[2].strip()[-4:]  # "01-Jan-1995"; empty when unknown
        decade = max(0, (int(year) - FIRST_DECADE) // 10) if year.isdigit() else -1
        items[_int(fields[0], path, number, "item id")] = (genre + 1, decade)
    return items


def age_bucket(age: int) -> int:
    return int(np.searchsorted(AGE_EDGES, age, side="right"))


def read_users(src: Path) -> dict[int, tuple[int, str, int, int]]:
    """User -> (age bucket, gender, occupation index, zip region)."""
    path = src / "u.user"
    occupations: dict[str, int] = {}
    users = {}
    for number, fields in enumerate(_rows(path, "|", 5), start=1):
        zip_code = fields[4].strip()
        region = int(zip_code[0]) if zip_code[:1].isdigit() else 10
        occupation = occupations.setdefault(fields[3].strip(), len(occupations))
        users[_int(fields[0], path, number, "user id")] = (
            age_bucket(_int(fields[1], path, number, "age")), fields[2].strip(), occupation,
            region)
    return users


def _histories(ratings: np.ndarray, categories: dict[int, int],
               max_len: int) -> tuple[list[list[int]], list[list[int]]]:
    """Per rating (in `ratings` order): the user's clicked items strictly before its time,
    newest first, and their categories."""
    hist_ads: list[list[int]] = [[] for _ in range(len(ratings))]
    hist_cats: list[list[int]] = [[] for _ in range(len(ratings))]
    order = np.lexsort((ratings[:, 1], ratings[:, 3], ratings[:, 0]))  # user, time, item
    clicked: dict[int, list[int]] = defaultdict(list)  # user -> clicked items, oldest first
    i = 0
    while i < order.size:  # one (user, time) group at a time: a group sees only earlier ones
        j = i
        user, ts = ratings[order[i], 0], ratings[order[i], 3]
        while j < order.size and ratings[order[j], 0] == user and ratings[order[j], 3] == ts:
            j += 1
        seen = clicked[int(user)][-max_len:][::-1]
        seen_cats = [categories.get(item, 0) for item in seen]
        for k in order[i:j]:
            hist_ads[k], hist_cats[k] = seen, seen_cats
        for k in order[i:j]:
            if ratings[k, 2] >= CLICK_RATING:
                clicked[int(user)].append(int(ratings[k, 1]))
        i = j
    return hist_ads, hist_cats


def import_movielens(src: str | Path, out: str | Path) -> dict[str, Any]:
    """Import the `ml-100k` directory `src` into the dataset directory `out`; the summary."""
    started = time.perf_counter()
    src_dir, out_dir = Path(src), Path(out)
    if not src_dir.is_dir():
        raise MovieLensError(f"MovieLens directory not found: {src_dir}")
    missing = [name for name in FILES if not (src_dir / name).is_file()]
    if missing:
        raise MovieLensError(f"{src_dir} is not an ml-100k directory: {', '.join(missing)} "
                             "missing")
    from models.features import load_schema

    schema = load_schema(SCHEMA_PATH)
    ratings = read_ratings(src_dir)
    items, users = read_items(src_dir), read_users(src_dir)
    unknown = sorted(set(ratings[:, 1].tolist()) - set(items))
    if unknown:
        raise MovieLensError(f"u.data rates item {unknown[0]}, which u.item does not list")
    unknown = sorted(set(ratings[:, 0].tolist()) - set(users))
    if unknown:
        raise MovieLensError(f"u.data has user {unknown[0]}, whom u.user does not list")

    order = np.lexsort((ratings[:, 1], ratings[:, 0], ratings[:, 3]))  # by time
    ratings = ratings[order]
    categories = {item: cat for item, (cat, _) in items.items()}
    hist_ads, hist_cats = _histories(ratings, categories, schema.sequence_len)
    ts_ms = ratings[:, 3] * 1000
    cut = ratings[min(len(ratings) - 1, int(TRAIN_SHARE * len(ratings))), 3]
    split = np.where(ratings[:, 3] < cut, "train", "test")
    hour = (ratings[:, 3] // 3600) % 24  # UTC: Unix time has no leap seconds
    click = (ratings[:, 2] >= CLICK_RATING).astype(np.int8)
    conversion = (ratings[:, 2] >= CONVERSION_RATING).astype(np.int8)
    n = len(ratings)
    request_id = np.arange(n, dtype=np.int64)

    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in (layout.REQUESTS_DIR, layout.IMPRESSIONS_DIR):
        shutil.rmtree(out_dir / stale, ignore_errors=True)
        (out_dir / stale).mkdir()
    common = {"request_id": request_id, "ts": ts_ms, "user_id": ratings[:, 0],
              "scene": pa.array([SCENE] * n), "hour": hour,
              "device": pa.array([""] * n)}
    part = "part-00000.parquet"
    pq.write_table(pa.table({
        **common, "hist_ad_id": pa.array(hist_ads, type=pa.list_(pa.int64())),
        "hist_category_id": pa.array(hist_cats, type=pa.list_(pa.int64())),
        "split": pa.array(split.tolist())}), out_dir / layout.REQUESTS_DIR / part)
    nan = np.full(n, np.nan, dtype=np.float32)
    pq.write_table(pa.table({
        **common, "position": np.zeros(n, np.int64), "ad_id": ratings[:, 1],
        "click": click, "conversion": conversion, "true_pctr": nan, "true_pcvr": nan,
        "split": pa.array(split.tolist())}), out_dir / layout.IMPRESSIONS_DIR / part)

    user_ids = np.array(sorted(users), dtype=np.int64)
    profile = [users[u] for u in user_ids.tolist()]
    pq.write_table(pa.table({
        "user_id": user_ids, "age_bucket": np.array([p[0] for p in profile], np.int64),
        "gender": pa.array([p[1] for p in profile]),
        "occupation": np.array([p[2] for p in profile], np.int64),
        "zip_region": np.array([p[3] for p in profile], np.int64)}), out_dir / layout.USERS_FILE)

    ad_ids = np.array(sorted(items), dtype=np.int64)
    m = ad_ids.size
    pq.write_table(pa.table({
        "ad_id": ad_ids, "campaign_id": ad_ids, "advertiser_id": ad_ids,
        "category_id": np.array([items[a][0] for a in ad_ids.tolist()], np.int64),
        "category_l1": np.zeros(m, np.int64), "brand_id": np.zeros(m, np.int64),
        "price_micros": np.zeros(m, np.int64), "price_bucket": np.zeros(m, np.int64),
        "bid_type": pa.array(["cpc"] * m),
        "bid_micros": np.full(m, layout.IMPORT_BID_MICROS, np.int64),
        "target_cpa_micros": np.zeros(m, np.int64),
        "scenes": pa.array([[SCENE]] * m, type=pa.list_(pa.string())),
        "creative_id": pa.array([f"movielens-{a}" for a in ad_ids.tolist()]),
        "status": pa.array(["active"] * m),
        "decade": np.array([items[a][1] for a in ad_ids.tolist()], np.int64)}),
        out_dir / layout.ADS_FILE)
    pq.write_table(pa.table({
        "campaign_id": ad_ids, "advertiser_id": ad_ids,
        "daily_budget_micros": np.full(m, layout.IMPORT_BUDGET_MICROS, np.int64),
        "status": pa.array(["active"] * m)}), out_dir / layout.CAMPAIGNS_FILE)
    shutil.copyfile(SCHEMA_PATH, out_dir / layout.SCHEMA_FILE)

    clicks, conversions = int(click.sum()), int(conversion.sum())
    train = int((split == "train").sum())
    summary: dict[str, Any] = {
        "source": "movielens-100k", "split": "time80", "ads": int(m), "users": len(users),
        "requests": n, "impressions": n, "train_impressions": train,
        "test_impressions": n - train, "clicks": clicks, "conversions": conversions,
        "ctr": round(clicks / n, 6) if n else None,
        "cvr": round(conversions / clicks, 6) if clicks else None,
        "labels": {"click": f"rating >= {CLICK_RATING}",
                   "conversion": f"rating >= {CONVERSION_RATING}"},
    }
    return layout.write_import_summary(
        out_dir, summary, schema_sha256=schema.sha256, seconds=time.perf_counter() - started)
