"""The served-feature log and its exporter: train the next bundle on served traffic, no skew.

Every served slot appends one record to the `served` stream (`{prefix}served` on Redis, or an
in-process `RecordLog`) with the exact raw features the models saw: the user's profile and
behaviour sequence as read for that request, the scene context, the ad and its position. The
event worker appends click / conversion labels to the `labels` stream under the same
`(request_id, ad_id)`. `export_training_set` joins the two into a dataset directory in the
models/data/layout.py format, so `cascade train --data DIR` trains on exactly what was served.

Decisions: sequences and profiles are stored as JSON text (flat stream fields, no pickle); the
public API's string ids become int64 in the dataset (decimal strings keep their value, other
strings a stable 62-bit hash; request ids are numbered in order of appearance); served traffic
has no oracle, so `true_pctr` / `true_pcvr` are NaN and summary.json's oracle is empty.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from models.data import layout
from services.common.config import Settings
from services.common.events import RecordLog, make_label_log
from services.common.store import OnlineStore, make_store

SERVED_KEY = "served"
PAGE = 5000


@dataclass(frozen=True)
class ServedSources:
    """Where served traffic lives: the store (catalog, users) and the two streams."""

    store: OnlineStore
    served: RecordLog
    labels: RecordLog


def served_records(result: Any) -> list[dict[str, str | int | float]]:
    """One record per won slot of a `CascadeResult` (the features exactly as sent)."""
    ctx = result.stage_context
    profile = json.dumps(ctx["user"], sort_keys=True)
    hist_ad = json.dumps([int(x) for x in result.user.hist_ad_id])
    hist_cat = json.dumps([int(x) for x in result.user.hist_category_id])
    out: list[dict[str, str | int | float]] = []
    for winner in result.winners:
        out.append({
            "request_id": ctx["request_id"], "ts": int(ctx["ts"] * 1000),
            "user_id": ctx["user_id"], "scene": ctx["scene"], "hour": int(ctx["hour"]),
            "device": str(ctx["context"].get("device", "")), "position": winner.slot,
            "ad_id": winner.ad_id, "campaign_id": winner.campaign_id,
            "known_user": int(result.user.known), "profile": profile,
            "hist_ad_id": hist_ad, "hist_category_id": hist_cat,
            "model_version": result.response.model_version,
        })
    return out


HASHED_ID_BIT = 1 << 61  # every hashed id has it; no kept decimal id (< 10**18) does


def int_id(value: str) -> int:
    """A dataset int64 id for an API string id.

    ASCII-decimal strings of up to 18 digits keep their integer value ("42" -> 42). Any other
    string is hashed, never parsed: str.isdigit() also accepts "²" (int() refuses it) and
    "٤٢" (int() reads it as 42, merging two users), so the test is ASCII digits only. Hashed
    ids are 62-bit with bit 61 set, so they never equal a kept decimal id.
    """
    text = str(value)
    if text.isascii() and text.isdigit() and len(text) < 19:
        return int(text)
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return HASHED_ID_BIT | (int.from_bytes(digest, "big") >> 3)


def export_path(root: str | Path, out: str) -> Path:
    """`out` inside the export root, or ValueError: absolute paths, `..` and symlinks that
    lead out of the root are refused, so /admin/export cannot write anywhere else."""
    if not out or Path(out).is_absolute():
        raise ValueError(f"out: {out!r} must be a relative path inside the export directory")
    base = Path(root).resolve()
    target = (base / out).resolve()
    if target == base or not target.is_relative_to(base):
        raise ValueError(f"out: {out!r} leads outside the export directory")
    return target


async def _all(log: RecordLog) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    after: str | None = None
    while True:
        page = await log.range(after, PAGE)
        if not page:
            return rows
        rows += [r for _, r in page]
        after = page[-1][0]


def _sources(source: Settings | ServedSources) -> ServedSources:
    if isinstance(source, ServedSources):
        return source
    if not source.redis_url:
        raise ValueError("the in-process served log lives inside the gateway process: pass "
                         "its ServedSources (or use REDIS_URL)")
    store = make_store(source)
    client = getattr(store, "client", None)
    return ServedSources(store, make_label_log(source, client, SERVED_KEY),
                         make_label_log(source, client))


async def export_training_set(source: Settings | ServedSources, out_dir: str | Path,
                              schema_path: str | Path | None = None) -> dict[str, Any]:
    """Write a layout.py dataset of served impressions joined with their labels; its summary."""
    started = time.time()
    src = _sources(source)
    served = await _all(src.served)
    if not served:
        raise ValueError("nothing has been served yet: the served-feature log is empty")
    labels: dict[tuple[str, str], set[str]] = {}
    for rec in await _all(src.labels):
        labels.setdefault((rec.get("request_id", ""), rec.get("ad_id", "")), set()).add(
            rec.get("type", ""))
    out = Path(out_dir)
    (out / layout.REQUESTS_DIR).mkdir(parents=True, exist_ok=True)
    (out / layout.IMPRESSIONS_DIR).mkdir(parents=True, exist_ok=True)

    request_ids: dict[str, int] = {}
    requests: dict[str, list] = {c: [] for c in layout.REQUEST_COLUMNS}
    imps: dict[str, list] = {c: [] for c in layout.IMPRESSION_COLUMNS}
    users: dict[int, Mapping[str, Any]] = {}
    for rec in served:
        rid = rec["request_id"]
        uid = int_id(rec["user_id"])
        if uid not in users or rec.get("known_user") == "1":
            users[uid] = json.loads(rec.get("profile") or "{}")
        if rid not in request_ids:
            request_ids[rid] = len(request_ids) + 1
            for name, value in (("request_id", request_ids[rid]), ("ts", int(rec["ts"])),
                                ("user_id", uid), ("scene", rec["scene"]),
                                ("hour", int(rec["hour"])), ("device", rec["device"]),
                                ("hist_ad_id", json.loads(rec["hist_ad_id"])),
                                ("hist_category_id", json.loads(rec["hist_category_id"]))):
                requests[name].append(value)
        seen = labels.get((rid, rec["ad_id"]), set())
        for name, value in (("request_id", request_ids[rid]), ("ts", int(rec["ts"])),
                            ("user_id", uid), ("scene", rec["scene"]),
                            ("position", int(rec["position"])), ("hour", int(rec["hour"])),
                            ("device", rec["device"]), ("ad_id", int(rec["ad_id"])),
                            ("click", int("click" in seen)),
                            ("conversion", int("click" in seen and "conversion" in seen)),
                            ("true_pctr", float("nan")), ("true_pcvr", float("nan"))):
            imps[name].append(value)

    int8 = {"click", "conversion"}
    f32 = {"true_pctr", "true_pcvr"}
    pq.write_table(pa.table({k: pa.array(v, pa.int8() if k in int8 else pa.float32()
                                         if k in f32 else None) for k, v in imps.items()}),
                   out / layout.IMPRESSIONS_DIR / "part-00000.parquet")
    pq.write_table(pa.table({k: pa.array(v, pa.list_(pa.int64()) if k.startswith("hist_")
                                         else None) for k, v in requests.items()}),
                   out / layout.REQUESTS_DIR / "part-00000.parquet")
    pq.write_table(pa.table({
        "user_id": pa.array(list(users), pa.int64()),
        "age_bucket": pa.array([int(p.get("age_bucket", -1)) for p in users.values()], pa.int64()),
        "gender": pa.array([str(p.get("gender", "unknown")) for p in users.values()]),
        "city_tier": pa.array([int(p.get("city_tier", -1)) for p in users.values()], pa.int64()),
    }), out / layout.USERS_FILE)
    ads = await src.store.all_ads()
    ad_cols: dict[str, list] = {c: [] for c in layout.AD_COLUMNS}
    for ad in sorted(ads, key=lambda a: a.ad_id):
        for c in layout.AD_COLUMNS:
            value = getattr(ad, c)
            ad_cols[c].append(list(value) if c == "scenes" else value)
    pq.write_table(pa.table({k: pa.array(v, pa.list_(pa.string()) if k == "scenes" else None)
                             for k, v in ad_cols.items()}), out / layout.ADS_FILE)
    campaigns = await src.store.get_campaigns()
    pq.write_table(pa.table({c: [getattr(x, c) for x in campaigns.values()]
                             for c in layout.CAMPAIGN_COLUMNS}), out / layout.CAMPAIGNS_FILE)
    shutil.copyfile(schema_path or _default_schema_file(), out / layout.SCHEMA_FILE)
    clicks = sum(imps["click"])
    summary = {"ads": len(ads), "users": len(users), "impressions": len(imps["ad_id"]),
               "ctr": clicks / max(1, len(imps["ad_id"])),
               "cvr": sum(imps["conversion"]) / max(1, clicks), "by_scene": {},
               "by_position": {}, "oracle": {}, "source": "served",
               "seconds": round(time.time() - started, 3)}
    (out / layout.SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    return summary


def _default_schema_file() -> Path:
    import models.features

    return Path(models.features.__file__).parent / "schema.yaml"
