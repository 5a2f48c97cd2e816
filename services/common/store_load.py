"""Fill an online store from a marketplace dataset directory (models/data/layout.py).

Used by `cascade load-store` (Redis), by `cascade serve all --data` (in-process store) and by
the stack launcher. Files are read in Arrow record batches and written in pipelined chunks, so
a 1M-ad catalog streams through without holding Python objects for all of it at once.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from models.data import layout
from services.common.store import Ad, Campaign, OnlineStore, ProgressFn

BATCH_ROWS = 20_000


@dataclass(frozen=True, slots=True)
class LoadCounts:
    ads: int
    campaigns: int
    users: int
    sequences: int
    seconds: float


def _batches(path: Path, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    yield from pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS, columns=columns)


def _rows(path: Path) -> int:
    return pq.ParquetFile(path).metadata.num_rows if path.is_file() else 0


def _ads_from_batch(batch: pa.RecordBatch) -> list[Ad]:
    cols = {name: batch.column(name).to_pylist() for name in batch.schema.names}
    n = batch.num_rows

    def col(name: str, default: object) -> list:
        return cols.get(name) or [default] * n

    return [
        Ad(ad_id=int(a), campaign_id=int(c), advertiser_id=int(adv), category_id=int(cat),
           category_l1=int(l1), brand_id=int(br), price_micros=int(pm), price_bucket=int(pb),
           bid_type=str(bt), bid_micros=int(bm), target_cpa_micros=int(tc),
           scenes=tuple(sc or ()), creative_id=str(cr or ""), status=str(st or "active"))
        for a, c, adv, cat, l1, br, pm, pb, bt, bm, tc, sc, cr, st in zip(
            cols["ad_id"], col("campaign_id", 0), col("advertiser_id", 0),
            col("category_id", 0), col("category_l1", 0), col("brand_id", 0),
            col("price_micros", 0), col("price_bucket", 0), col("bid_type", "cpc"),
            col("bid_micros", 0), col("target_cpa_micros", 0), col("scenes", ()),
            col("creative_id", ""), col("status", "active"), strict=True)
    ]


def _campaigns_from_batch(batch: pa.RecordBatch) -> list[Campaign]:
    d = batch.to_pydict()
    n = batch.num_rows
    return [Campaign(int(c), int(a), int(b), str(s)) for c, a, b, s in zip(
        d["campaign_id"], d.get("advertiser_id") or [0] * n,
        d.get("daily_budget_micros") or [0] * n, d.get("status") or ["active"] * n,
        strict=True)]


def _last_request_rows(files: list[Path]) -> dict[int, np.ndarray]:
    """For each requests file, the row numbers holding some user's latest request.

    Only user_id and ts are read for the whole log (16 bytes a request), so a 20M-impression
    marketplace finds its winners in memory before touching the sequence columns.
    """
    users, ts, file_idx, row_idx = [], [], [], []
    for i, path in enumerate(files):
        table = pq.read_table(path, columns=["user_id", "ts"])
        users.append(table.column("user_id").to_numpy())
        ts.append(table.column("ts").to_numpy())
        file_idx.append(np.full(table.num_rows, i, dtype=np.int32))
        row_idx.append(np.arange(table.num_rows, dtype=np.int64))
    if not users:
        return {}
    u, t = np.concatenate(users), np.concatenate(ts)
    f, r = np.concatenate(file_idx), np.concatenate(row_idx)
    order = np.lexsort((r, f, t, u))  # by user, then time, then position in the log
    last = order[np.r_[u[order][1:] != u[order][:-1], True]]
    return {i: np.sort(r[last][f[last] == i]) for i in range(len(files))}


async def load_marketplace(store: OnlineStore, data_dir: str | Path,
                           progress: ProgressFn | None = None) -> LoadCounts:
    """Load ads, campaigns, users and each user's latest behaviour sequence into `store`.

    The sequence is the one stored with the user's last request (newest first, as it stood
    before that request). Raises layout.DatasetError when `data_dir` is not a dataset.
    """
    started = time.perf_counter()
    root = layout.require_dataset(data_dir)
    report = progress or (lambda what, n, total: None)
    ads_path, camp_path = root / layout.ADS_FILE, root / layout.CAMPAIGNS_FILE
    users_path = root / layout.USERS_FILE
    req_files = sorted((root / layout.REQUESTS_DIR).glob("*.parquet"))

    n_ads = n_camps = n_users = n_seqs = 0
    total = _rows(ads_path)
    for batch in _batches(ads_path):
        n = await store.put_ads(_ads_from_batch(batch))
        n_ads += n
        report("ads", n, total)
    total = _rows(camp_path)
    if camp_path.is_file():
        for batch in _batches(camp_path):
            n = await store.put_campaigns(_campaigns_from_batch(batch))
            n_camps += n
            report("campaigns", n, total)
    total = _rows(users_path)
    for batch in _batches(users_path):
        n = await store.put_users(batch.to_pylist())
        n_users += n
        report("users", n, total)

    winners = _last_request_rows(req_files)
    total = int(sum(len(rows) for rows in winners.values()))
    for i, path in enumerate(req_files):
        rows = winners.get(i)
        if rows is None or not len(rows):
            continue
        table = pq.read_table(path, columns=["user_id", "hist_ad_id", "hist_category_id"])
        for start in range(0, len(rows), BATCH_ROWS):
            part = table.take(pa.array(rows[start:start + BATCH_ROWS]))
            d = part.to_pydict()
            n = await store.put_sequences(zip(
                d["user_id"], d["hist_ad_id"], d["hist_category_id"], strict=True))
            n_seqs += n
            report("sequences", n, total)
    return LoadCounts(n_ads, n_camps, n_users, n_seqs, round(time.perf_counter() - started, 3))
