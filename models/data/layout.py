"""The marketplace dataset layout: the one description of files and columns on disk.

A dataset directory (written by `cascade simulate`, an importer, or the gateway's served-traffic
log) holds:

    schema.yaml              the feature schema this data is encoded with
    ads.parquet              one row per ad (catalog)
    campaigns.parquet        one row per campaign (daily budget)
    users.parquet            one row per user (profile)
    requests/part-*.parquet  one row per ad request, with the behaviour sequence as it stood
                             strictly before the request (stored once per request)
    impressions/part-*.parquet one row per shown ad, with labels and the true probabilities
    summary.json             counts, rates and the oracle's metrics

Money is integer micros. `ts` is milliseconds since the Unix epoch (UTC).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ADS_FILE = "ads.parquet"
CAMPAIGNS_FILE = "campaigns.parquet"
USERS_FILE = "users.parquet"
REQUESTS_DIR = "requests"
IMPRESSIONS_DIR = "impressions"
SUMMARY_FILE = "summary.json"
SCHEMA_FILE = "schema.yaml"

AD_COLUMNS = (
    "ad_id", "campaign_id", "advertiser_id", "category_id", "category_l1", "brand_id",
    "price_micros", "price_bucket", "bid_type", "bid_micros", "target_cpa_micros",
    "scenes", "creative_id", "status",
)
CAMPAIGN_COLUMNS = ("campaign_id", "advertiser_id", "daily_budget_micros", "status")
USER_COLUMNS = ("user_id", "age_bucket", "gender", "city_tier")
REQUEST_COLUMNS = (
    "request_id", "ts", "user_id", "scene", "hour", "device", "hist_ad_id", "hist_category_id",
)
IMPRESSION_COLUMNS = (
    "request_id", "ts", "user_id", "scene", "position", "hour", "device", "ad_id",
    "click", "conversion", "true_pctr", "true_pcvr",
)


class DatasetError(ValueError):
    """A dataset directory that is missing or malformed (names the file)."""


def require_dataset(path: str | Path) -> Path:
    """Check that `path` looks like a dataset directory and return it."""
    root = Path(path)
    if not root.is_dir():
        raise DatasetError(f"data directory not found: {root}")
    for name in (ADS_FILE, USERS_FILE):
        if not (root / name).is_file():
            raise DatasetError(f"{root} is not a Cascade dataset: {name} is missing")
    if not any((root / IMPRESSIONS_DIR).glob("*.parquet")):
        raise DatasetError(f"{root} is not a Cascade dataset: {IMPRESSIONS_DIR}/ has no parquet")
    return root


# Real logs carry no bids: an importer makes every ad CPC at this bid and every campaign this
# daily budget, so the serving path can run on imported data.
IMPORT_BID_MICROS = 1_000_000  # 1.00 per click
IMPORT_BUDGET_MICROS = 1_000_000_000  # 1000.00 a day


def write_import_summary(out_dir: Path, counts: dict[str, Any], *, schema_sha256: str,
                         seconds: float) -> dict[str, Any]:
    """Write an importer's summary.json: its `counts`, then what every imported dataset says
    alike (real logs have no oracle; the bid and budget given to every ad and campaign; the
    schema's hash; the import time). Returns the summary."""
    summary = {**counts,
               "oracle": {"ctr_auc": None, "ctr_gauc": None, "cvr_auc": None},
               "defaults": {"bid_type": "cpc", "bid_micros": IMPORT_BID_MICROS,
                            "daily_budget_micros": IMPORT_BUDGET_MICROS},
               "schema_sha256": schema_sha256, "seconds": round(seconds, 3)}
    (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary
