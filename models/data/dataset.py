"""Readers for a dataset directory: the catalog tables and the schema-encoded impression log.

Training and evaluation read the same `EncodedLog`: every feature already mapped to embedding
rows by the schema, so a model never sees a raw id and cannot drift from serving. Behaviour
sequences stay per request ([requests, L]) and are gathered per batch; copying them per
impression would multiply their memory by the slot count.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from models.data import layout
from models.features.schema import PAD, Feature, FeatureSchema, load_schema

LABELS = ("click", "conversion", "true_pctr", "true_pcvr")
# Per-row columns read for evaluation and splitting only; batches never carry them.
LEARNABLE = ("true_pctr_learnable", "true_pcvr_learnable")
SPLIT_COLUMN = "split"
SPLIT_CODES = {"train": 0, "valid": 1, "test": 2}


@dataclass
class MarketplaceTables:
    """The catalog of a dataset: columns as numpy arrays (strings and lists as object arrays)."""

    ads: dict[str, np.ndarray]
    campaigns: dict[str, np.ndarray]
    users: dict[str, np.ndarray]
    summary: dict[str, Any]
    schema: FeatureSchema


def dataset_schema(path: str | Path) -> FeatureSchema:
    """The schema a dataset was written with (DIR/schema.yaml), else the built-in one."""
    own = Path(path) / layout.SCHEMA_FILE
    return load_schema(own if own.is_file() else None)


def _columns(table: pa.Table) -> dict[str, np.ndarray]:
    return {name: table.column(name).to_numpy() for name in table.column_names}


def open_marketplace(path: str | Path) -> MarketplaceTables:
    """Read ads, campaigns, users, summary and schema of a dataset directory."""
    root = layout.require_dataset(path)
    campaigns = root / layout.CAMPAIGNS_FILE
    summary = root / layout.SUMMARY_FILE
    return MarketplaceTables(
        ads=_columns(pq.read_table(root / layout.ADS_FILE)),
        campaigns=_columns(pq.read_table(campaigns)) if campaigns.is_file() else {},
        users=_columns(pq.read_table(root / layout.USERS_FILE)),
        summary=json.loads(summary.read_text()) if summary.is_file() else {},
        schema=dataset_schema(root),
    )


@dataclass
class EncodedLog:
    """Impressions in time order with schema-encoded features (rows of embedding tables).

    `features[name]` is int64 [n] for every non-behaviour feature of the schema.
    `sequences[name]` is int32 [n_requests, L] (0 = padding) for each behaviour feature and is
    shared, not copied, by `subset`; `request_row[i]` is impression i's row in it.
    Labels are float32; `true_pctr`/`true_pcvr` are NaN when the data has no oracle, and so
    are `true_*_learnable` (the oracle with what no model can learn integrated out) when the
    data does not carry them. `split` is the dataset's own split as int8 codes (SPLIT_CODES),
    or None when the impressions have no `split` column.
    """

    features: dict[str, np.ndarray]
    request_row: np.ndarray
    sequences: dict[str, np.ndarray]
    click: np.ndarray
    conversion: np.ndarray
    true_pctr: np.ndarray
    true_pcvr: np.ndarray
    ts: np.ndarray
    user_id: np.ndarray
    request_id: np.ndarray
    ad_id: np.ndarray
    schema: FeatureSchema | None = field(default=None, repr=False)
    split: np.ndarray | None = None
    true_pctr_learnable: np.ndarray | None = None
    true_pcvr_learnable: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.click.shape[0])

    def batch(self, idx: np.ndarray | slice) -> dict[str, np.ndarray]:
        """Feature and label arrays of rows `idx`; sequences gathered to int64 [B, L]."""
        out = {name: col[idx] for name, col in self.features.items()}
        rows = self.request_row[idx]
        for name, seq in self.sequences.items():
            out[name] = seq[rows].astype(np.int64)
        for name in LABELS:
            out[name] = getattr(self, name)[idx]
        return out

    def subset(self, idx: np.ndarray | slice) -> EncodedLog:
        """Rows `idx` (e.g. a time split) sharing the same sequence arrays."""
        per_row = {name: getattr(self, name)[idx] for name in
                   ("request_row", *LABELS, "ts", "user_id", "request_id", "ad_id")}
        for name in (SPLIT_COLUMN, *LEARNABLE):
            column = getattr(self, name)
            per_row[name] = None if column is None else column[idx]
        return EncodedLog(features={k: v[idx] for k, v in self.features.items()},
                          sequences=self.sequences, schema=self.schema, **per_row)


def _encode_column(feature: Feature, column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Encode a parquet column; strings go through a dictionary so Python touches each
    distinct value once, not every row."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        encoded = column.dictionary_encode()
        codes = feature.encode(encoded.dictionary.to_numpy(zero_copy_only=False))
        idx = encoded.indices.fill_null(-1).to_numpy()
        return np.where(idx >= 0, codes[np.maximum(idx, 0)] if codes.size else PAD, PAD)
    values = column.fill_null(-1).to_numpy() if column.null_count else column.to_numpy()
    return feature.encode(values)


def _lookup(keys: np.ndarray, table_ids: np.ndarray) -> np.ndarray:
    """Row of each key in `table_ids`, or -1; O(1) per key when ids are 0..n-1."""
    n = table_ids.shape[0]
    if n == 0:
        return np.full(keys.shape[0], -1, dtype=np.int64)
    if table_ids[0] == 0 and table_ids[-1] == n - 1 and np.array_equal(
            table_ids, np.arange(n)):
        return np.where((keys >= 0) & (keys < n), keys, -1)
    order = np.argsort(table_ids, kind="stable")
    pos = np.minimum(np.searchsorted(table_ids[order], keys), n - 1)
    found = table_ids[order][pos] == keys
    return np.where(found, order[pos], -1)


def _encode_joined(feature: Feature, table: pa.Table, rows: np.ndarray) -> np.ndarray:
    """Encode a catalog column once per catalog row, then gather it per impression."""
    codes = _encode_column(feature, table.column(feature.name))
    return np.where(rows >= 0, codes[np.maximum(rows, 0)], PAD)


def _padded(column: pa.ChunkedArray, length: int) -> np.ndarray:
    """list<int> column -> [rows, length] int64, newest first, truncated, -1 padded."""
    arr = column.combine_chunks()
    offsets = arr.offsets.to_numpy()
    values = arr.values.fill_null(-1).to_numpy()
    counts = np.minimum(np.diff(offsets), length)
    out = np.full((len(arr), length), -1, dtype=np.int64)
    row = np.repeat(np.arange(len(arr)), counts)
    col = np.arange(row.shape[0]) - np.concatenate([[0], np.cumsum(counts)[:-1]])[row]
    out[row, col] = values[offsets[:-1][row] + col]
    return out


def _read_sequences(root: Path, schema: FeatureSchema, request_id: np.ndarray
                    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Per-request encoded sequences plus each impression's row; the last row is all padding
    for impressions whose request carries no sequence."""
    names = schema.names("behaviour")
    L = schema.sequence_len
    parts = sorted((root / layout.REQUESTS_DIR).glob("*.parquet"))
    if not parts or not names:
        return (np.zeros(request_id.shape[0], dtype=np.int64),
                {n: np.zeros((1, L), dtype=np.int32) for n in names})
    table = pq.read_table(root / layout.REQUESTS_DIR, columns=["request_id", *names])
    req_ids = table.column("request_id").to_numpy()
    rows = _lookup(request_id, req_ids)
    rows = np.where(rows >= 0, rows, req_ids.shape[0])
    sequences = {}
    for name in names:
        enc = schema[name].encode(_padded(table.column(name), L)).astype(np.int32)
        sequences[name] = np.vstack([enc, np.zeros((1, L), dtype=np.int32)])
    return rows, sequences


def load_encoded_log(path: str | Path, schema: FeatureSchema | None = None,
                     max_rows: int | None = None) -> EncodedLog:
    """Read a dataset's impressions, time-ordered, encoded with `schema` (default: the
    dataset's own). `max_rows` keeps the earliest rows."""
    root = layout.require_dataset(path)
    schema = schema or dataset_schema(root)
    imp = pq.read_table(root / layout.IMPRESSIONS_DIR)
    ts = imp.column("ts").to_numpy()
    if ts.shape[0] > 1 and not (np.diff(ts) >= 0).all():
        imp = imp.take(pa.array(np.argsort(ts, kind="stable")))
        ts = imp.column("ts").to_numpy()
    if max_rows is not None and max_rows < imp.num_rows:
        imp, ts = imp.slice(0, max_rows), ts[:max_rows]
    ids = {c: imp.column(c).to_numpy().astype(np.int64) for c in
           ("user_id", "ad_id", "request_id")}
    users = pq.read_table(root / layout.USERS_FILE)
    ads = pq.read_table(root / layout.ADS_FILE)
    joins = {"user": (users, _lookup(ids["user_id"], users.column("user_id").to_numpy())),
             "ad": (ads, _lookup(ids["ad_id"], ads.column("ad_id").to_numpy()))}
    features: dict[str, np.ndarray] = {}
    for feature in schema.features:
        if feature.group == "behaviour":
            continue
        if feature.name in imp.column_names:
            features[feature.name] = _encode_column(feature, imp.column(feature.name))
            continue
        source = [t for t in joins.values() if feature.name in t[0].column_names]
        if not source:
            raise layout.DatasetError(
                f"{root}: feature '{feature.name}' is in no impression, user or ad column")
        features[feature.name] = _encode_joined(feature, *source[0])
    request_row, sequences = _read_sequences(root, schema, ids["request_id"])

    def floats(name: str) -> np.ndarray:
        if name not in imp.column_names:
            return np.full(imp.num_rows, np.nan, dtype=np.float32)
        return imp.column(name).to_numpy().astype(np.float32)

    return EncodedLog(features=features, request_row=request_row, sequences=sequences,
                      click=floats("click"), conversion=floats("conversion"),
                      true_pctr=floats("true_pctr"), true_pcvr=floats("true_pcvr"),
                      ts=ts.astype(np.int64), user_id=ids["user_id"],
                      request_id=ids["request_id"], ad_id=ids["ad_id"], schema=schema,
                      split=_split_codes(root, imp),
                      **{n: floats(n) if n in imp.column_names else None for n in LEARNABLE})


def _split_codes(root: Path, imp: pa.Table) -> np.ndarray | None:
    """The impressions' `split` column as int8 codes, or None without one; an unknown value
    is refused, since a typo would silently move rows out of the test set."""
    if SPLIT_COLUMN not in imp.column_names:
        return None
    column = imp.column(SPLIT_COLUMN).combine_chunks()
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    encoded = column.dictionary_encode()
    names = [str(v) for v in encoded.dictionary.to_pylist()]
    unknown = sorted(set(names) - set(SPLIT_CODES))
    if unknown or encoded.indices.null_count:
        bad = unknown or ["null"]
        raise layout.DatasetError(f"{root}: impressions column `split` holds {bad}; "
                                  f"expected {' | '.join(SPLIT_CODES)}")
    codes = np.array([SPLIT_CODES[n] for n in names], dtype=np.int8)
    return codes[encoded.indices.to_numpy()] if names else np.zeros(0, dtype=np.int8)
