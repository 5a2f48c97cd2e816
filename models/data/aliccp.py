"""Import the public Ali-CCP logs (Alibaba Click and Conversion Prediction) as a Cascade dataset.

Ali-CCP ships, per split (train, test), two CSV files without a header:

    sample_skeleton_{split}.csv  sample_id,click,conversion,common_feature_index,
                                 feature_num,feature_list
    common_features_{split}.csv  common_feature_index,feature_num,feature_list

`feature_list` is entries `field_id \\x02 feature_id \\x03 value` joined by `\\x01`. User-side
fields live in the common features (shared by all samples of one page view), ad-side fields in
the skeleton. aliccp_schema.yaml documents which field becomes which feature.

Mapping onto models/data/layout.py:
- one common_feature_index = one request (request_id assigned in file order); its behaviour
  sequence is the 109_14 category list; `ts` is a sequence number (Ali-CCP has no times);
- one skeleton row = one impression at position 0, with a `split` column ('train' | 'test')
  that keeps Ali-CCP's own split (summary.json records `split: "aliccp"`);
- a conversion without a click (a data error) is dropped to 0, since conversion implies click;
- true_pctr / true_pcvr are NaN: real logs have no oracle;
- bids are not in the logs: every ad is CPC with `layout.IMPORT_BID_MICROS`, every shop is one
  campaign with `layout.IMPORT_BUDGET_MICROS`, so the serving path can run on imported data.

Files are streamed line by line and written in Parquet parts of CHUNK_ROWS rows; only the
common-feature index of the current split, the users and the ad catalog stay in memory.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from models.data import layout

SCHEMA_PATH = Path(__file__).with_name("aliccp_schema.yaml")
SPLITS = ("train", "test")
CHUNK_ROWS = 500_000
USER_FIELDS = {  # Ali-CCP field id -> users.parquet column (and schema feature)
    b"121": "segment_id", b"122": "group_id", b"124": "gender_id", b"125": "age_level",
    b"126": "consume_level", b"127": "shopping_level", b"128": "occupation",
    b"129": "city_level",
}
USER_ID_FIELD, HIST_CATEGORY_FIELD = b"101", b"109_14"
AD_FIELD, CATEGORY_FIELD, SHOP_FIELD = b"205", b"206", b"207"
INTENTION_FIELD, BRAND_FIELD, SCENE_FIELD = b"210", b"216", b"301"

ProgressFn = Callable[[str, int, int], None]  # (file, bytes read, file size)


class AliccpError(ValueError):
    """Ali-CCP input that cannot be imported (names the file and line)."""


def parse_feature_list(raw: bytes) -> dict[bytes, list[int]]:
    """Field id -> feature ids (values are dropped: they are 1.0 for categorical fields)."""
    out: dict[bytes, list[int]] = {}
    if not raw:
        return out
    for entry in raw.split(b"\x01"):
        field_id, _, rest = entry.partition(b"\x02")
        feature_id = rest.partition(b"\x03")[0]
        if feature_id:
            out.setdefault(field_id, []).append(int(feature_id))
    return out


class DenseIndex:
    """Feature id -> 0, 1, 2... in order of first appearance; keeps small vocabularies free
    of collisions when the schema folds ids into buckets."""

    def __init__(self) -> None:
        self.ids: dict[int, int] = {}

    def __call__(self, feature_id: int) -> int:
        return self.ids.setdefault(feature_id, len(self.ids))


@dataclass
class _Counts:
    impressions: dict[str, int] = field(default_factory=lambda: {s: 0 for s in SPLITS})
    clicks: int = 0
    conversions: int = 0
    requests: int = 0
    by_scene: dict[str, list[int]] = field(default_factory=dict)  # [impressions, clicks, convs]


def _lines(path: Path, what: str, progress: ProgressFn | None) -> Iterator[tuple[int, bytes]]:
    size = path.stat().st_size
    done = 0
    with path.open("rb") as fh:
        for number, line in enumerate(fh, start=1):
            done += len(line)
            if progress and number % 100_000 == 0:
                progress(what, done, size)
            yield number, line.rstrip(b"\r\n")
    if progress:
        progress(what, size, size)


class _PartWriter:
    """Writes rows into DIR/part-NNNNN.parquet files of at most CHUNK_ROWS rows."""

    def __init__(self, directory: Path, schema: pa.Schema) -> None:
        self.directory, self.schema = directory, schema
        directory.mkdir(parents=True, exist_ok=True)
        self.rows: dict[str, list[Any]] = {name: [] for name in schema.names}
        self.parts = 0

    def add(self, **row: Any) -> None:
        for name, column in self.rows.items():
            column.append(row[name])
        if len(self.rows[self.schema.names[0]]) >= CHUNK_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self.rows[self.schema.names[0]]:
            return
        table = pa.Table.from_pydict(self.rows, schema=self.schema)
        pq.write_table(table, self.directory / f"part-{self.parts:05d}.parquet")
        self.parts += 1
        self.rows = {name: [] for name in self.schema.names}


REQUEST_SCHEMA = pa.schema([
    ("request_id", pa.int64()), ("ts", pa.int64()), ("user_id", pa.int64()),
    ("scene", pa.string()), ("hour", pa.int64()), ("device", pa.string()),
    ("hist_ad_id", pa.list_(pa.int64())), ("hist_category_id", pa.list_(pa.int64())),
    ("split", pa.string()),
])
IMPRESSION_SCHEMA = pa.schema([
    ("request_id", pa.int64()), ("ts", pa.int64()), ("user_id", pa.int64()),
    ("scene", pa.string()), ("position", pa.int64()), ("hour", pa.int64()),
    ("device", pa.string()), ("ad_id", pa.int64()), ("click", pa.int8()),
    ("conversion", pa.int8()), ("true_pctr", pa.float32()), ("true_pcvr", pa.float32()),
    ("split", pa.string()),
])


class _Importer:
    def __init__(self, out: Path, seq_len: int, progress: ProgressFn | None) -> None:
        self.out, self.seq_len, self.progress = out, seq_len, progress
        self.user_index = {name: DenseIndex() for name in USER_FIELDS.values()}
        self.category, self.intention, self.scene = DenseIndex(), DenseIndex(), DenseIndex()
        self.users: dict[int, tuple[int, ...]] = {}
        self.ads: dict[int, tuple[int, int, int, int]] = {}  # ad -> shop, category, brand, intent
        self.requests = _PartWriter(out / layout.REQUESTS_DIR, REQUEST_SCHEMA)
        self.impressions = _PartWriter(out / layout.IMPRESSIONS_DIR, IMPRESSION_SCHEMA)
        self.counts = _Counts()

    def read_common(self, path: Path, split: str) -> dict[bytes, tuple[int, int]]:
        """One request per common_feature_index: index -> (request_id, user_id)."""
        index: dict[bytes, tuple[int, int]] = {}
        for number, line in _lines(path, path.name, self.progress):
            parts = line.split(b",", 2)
            if len(parts) < 3:
                if number == 1 or not line:
                    continue  # a header or a blank line
                raise AliccpError(f"{path.name}:{number}: expected 3 comma-separated columns")
            feats = parse_feature_list(parts[2])
            user_id = (feats.get(USER_ID_FIELD) or [-1])[0]
            if user_id >= 0 and user_id not in self.users:
                self.users[user_id] = tuple(
                    self.user_index[col](feats[fid][0]) if fid in feats else -1
                    for fid, col in USER_FIELDS.items())
            cats = [self.category(c) for c in feats.get(HIST_CATEGORY_FIELD, [])[: self.seq_len]]
            request_id = self.counts.requests
            self.counts.requests += 1
            index[parts[0]] = (request_id, user_id)
            self.requests.add(request_id=request_id, ts=request_id, user_id=user_id, scene="",
                              hour=0, device="", hist_ad_id=[-1] * len(cats),
                              hist_category_id=cats, split=split)
        return index

    def read_skeleton(self, path: Path, split: str, common: dict[bytes, tuple[int, int]],
                      max_samples: int | None) -> None:
        shown = 0
        for number, line in _lines(path, path.name, self.progress):
            parts = line.split(b",", 5)
            if len(parts) < 6 or not parts[1].strip().isdigit():
                if number == 1 or not line:
                    continue
                raise AliccpError(f"{path.name}:{number}: expected sample_id,click,conversion,"
                                  "common_feature_index,feature_num,feature_list")
            request = common.get(parts[3])
            if request is None:
                raise AliccpError(f"{path.name}:{number}: common_feature_index "
                                  f"{parts[3].decode(errors='replace')} is not in the common "
                                  "features file")
            feats = parse_feature_list(parts[5])
            ad_id = (feats.get(AD_FIELD) or [-1])[0]
            if ad_id < 0:
                raise AliccpError(f"{path.name}:{number}: no item id (field 205)")
            if ad_id not in self.ads:
                self.ads[ad_id] = (
                    (feats.get(SHOP_FIELD) or [-1])[0],
                    self.category(feats[CATEGORY_FIELD][0]) if CATEGORY_FIELD in feats else -1,
                    (feats.get(BRAND_FIELD) or [-1])[0],
                    self.intention(feats[INTENTION_FIELD][0]) if INTENTION_FIELD in feats else -1,
                )
            scene = f"s{self.scene(feats[SCENE_FIELD][0])}" if SCENE_FIELD in feats else ""
            click = int(parts[1]) > 0
            conversion = click and int(parts[2]) > 0
            request_id, user_id = request
            self.impressions.add(
                request_id=request_id, ts=request_id, user_id=user_id, scene=scene, position=0,
                hour=0, device="", ad_id=ad_id, click=int(click), conversion=int(conversion),
                true_pctr=float("nan"), true_pcvr=float("nan"), split=split)
            c = self.counts
            c.impressions[split] += 1
            c.clicks += click
            c.conversions += conversion
            by = c.by_scene.setdefault(scene, [0, 0, 0])
            by[0], by[1], by[2] = by[0] + 1, by[1] + click, by[2] + conversion
            shown += 1
            if max_samples and shown >= max_samples:
                break

    def write_tables(self) -> None:
        self.requests.flush()
        self.impressions.flush()
        user_ids = np.fromiter(self.users, dtype=np.int64, count=len(self.users))
        profile = np.array(list(self.users.values()), dtype=np.int64).reshape(-1, len(USER_FIELDS))
        users = {"user_id": user_ids}
        users.update({col: profile[:, i] for i, col in enumerate(USER_FIELDS.values())})
        pq.write_table(pa.table(users), self.out / layout.USERS_FILE)

        ad_ids = np.fromiter(self.ads, dtype=np.int64, count=len(self.ads))
        attrs = np.array(list(self.ads.values()), dtype=np.int64).reshape(-1, 4)
        shops, n = attrs[:, 0], len(ad_ids)
        scenes = [f"s{k}" for k in self.scene.ids.values()]
        pq.write_table(pa.table({
            "ad_id": ad_ids, "campaign_id": shops, "advertiser_id": shops,
            "category_id": attrs[:, 1], "category_l1": np.zeros(n, np.int64),
            "brand_id": attrs[:, 2], "price_micros": np.zeros(n, np.int64),
            "price_bucket": np.zeros(n, np.int64), "bid_type": pa.array(["cpc"] * n),
            "bid_micros": np.full(n, layout.IMPORT_BID_MICROS, np.int64),
            "target_cpa_micros": np.zeros(n, np.int64),
            "scenes": pa.array([scenes] * n, type=pa.list_(pa.string())),
            "creative_id": pa.array([f"aliccp-{a}" for a in ad_ids.tolist()]),
            "status": pa.array(["active"] * n), "intention_id": attrs[:, 3],
        }), self.out / layout.ADS_FILE)
        shop_ids = np.unique(shops[shops >= 0])
        pq.write_table(pa.table({
            "campaign_id": shop_ids, "advertiser_id": shop_ids,
            "daily_budget_micros": np.full(len(shop_ids), layout.IMPORT_BUDGET_MICROS, np.int64),
            "status": pa.array(["active"] * len(shop_ids)),
        }), self.out / layout.CAMPAIGNS_FILE)


def _rate(num: int, den: int) -> float | None:
    return round(num / den, 6) if den else None


def import_aliccp(src: str | Path, out: str | Path, max_samples: int | None = None,
                  progress: ProgressFn | None = None) -> dict[str, Any]:
    """Import the Ali-CCP CSVs in `src` into the dataset directory `out`; returns the summary.

    Each split present (train and/or test) needs both its skeleton and its common features.
    `max_samples` caps the impressions read per split (a quick look at a huge download).
    """
    started = time.perf_counter()
    src_dir, out_dir = Path(src), Path(out)
    if not src_dir.is_dir():
        raise AliccpError(f"Ali-CCP directory not found: {src_dir}")
    splits = []
    for split in SPLITS:
        skeleton = src_dir / f"sample_skeleton_{split}.csv"
        common = src_dir / f"common_features_{split}.csv"
        if skeleton.is_file() != common.is_file():
            missing = common if skeleton.is_file() else skeleton
            raise AliccpError(f"{missing} is missing (each split needs both files)")
        if skeleton.is_file():
            splits.append((split, skeleton, common))
    if not splits:
        raise AliccpError(f"{src_dir} holds no sample_skeleton_train.csv or "
                          "sample_skeleton_test.csv")
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in (layout.REQUESTS_DIR, layout.IMPRESSIONS_DIR):
        shutil.rmtree(out_dir / stale, ignore_errors=True)

    from models.features import load_schema

    schema = load_schema(SCHEMA_PATH)
    importer = _Importer(out_dir, schema.sequence_len, progress)
    for split, skeleton, common in splits:
        index = importer.read_common(common, split)
        importer.read_skeleton(skeleton, split, index, max_samples)
    importer.write_tables()
    shutil.copyfile(SCHEMA_PATH, out_dir / layout.SCHEMA_FILE)

    c = importer.counts
    total = sum(c.impressions.values())
    clicks = c.clicks
    summary: dict[str, Any] = {
        "source": "aliccp", "split": "aliccp",
        "ads": len(importer.ads), "users": len(importer.users), "requests": c.requests,
        "impressions": total, "train_impressions": c.impressions["train"],
        "test_impressions": c.impressions["test"], "clicks": clicks,
        "conversions": c.conversions, "ctr": _rate(clicks, total),
        "cvr": _rate(c.conversions, clicks),
        "by_scene": {s: {"impressions": v[0], "ctr": _rate(v[1], v[0]), "cvr": _rate(v[2], v[1])}
                     for s, v in sorted(c.by_scene.items())},
        "by_position": {"0": {"impressions": total, "ctr": _rate(clicks, total),
                              "cvr": _rate(c.conversions, clicks)}},
    }
    return layout.write_import_summary(
        out_dir, summary, schema_sha256=schema.sha256, seconds=time.perf_counter() - started)
