"""Tiny schema and random batches shared by the network tests (this module holds no tests).

The schema has the production shape (user, behaviour sharing the ad tables, ad, scene) with
small tables, so every test runs in milliseconds.
"""

from __future__ import annotations

import torch

from models.features import FeatureSchema, parse_schema

TINY_SCHEMA = {
    "name": "tiny-test",
    "version": 1,
    "sequence": {"max_len": 8, "fields": ["hist_ad_id", "hist_category_id"]},
    "groups": {
        "user": [
            {"name": "age_bucket", "kind": "range", "size": 8, "dim": 4},
            {"name": "gender", "kind": "vocab", "values": ["female", "male", "unknown"], "dim": 2},
        ],
        "behaviour": [
            {"name": "hist_ad_id", "kind": "id", "shares": "ad_id"},
            {"name": "hist_category_id", "kind": "id", "shares": "category_id"},
        ],
        "ad": [
            {"name": "ad_id", "kind": "id", "buckets": 201, "dim": 8},
            {"name": "category_id", "kind": "id", "buckets": 21, "dim": 4},
            {"name": "price_bucket", "kind": "range", "size": 10, "dim": 2},
        ],
        "scene": [
            {"name": "scene", "kind": "vocab", "values": ["home_feed", "search"], "dim": 2},
            {"name": "position", "kind": "range", "size": 4, "dim": 2},
        ],
    },
}


def tiny_schema() -> FeatureSchema:
    return parse_schema(TINY_SCHEMA)


def category_of(ad_rows: torch.Tensor) -> torch.Tensor:
    """A fixed ad → category map (row 0 stays padding)."""
    return torch.where(ad_rows > 0, 1 + ad_rows % 20, torch.zeros_like(ad_rows))


def random_batch(
    schema: FeatureSchema, size: int = 8, length: int = 6, seed: int = 0, min_len: int = 0
) -> dict[str, torch.Tensor]:
    """Encoded rows: scalars [B], histories [B, L] newest first with trailing pads, labels."""
    gen = torch.Generator().manual_seed(seed)
    batch: dict[str, torch.Tensor] = {}
    for feat in schema.features:
        if feat.group == "behaviour":
            continue
        batch[feat.name] = torch.randint(1, feat.rows, (size,), generator=gen)
    batch["category_id"] = category_of(batch["ad_id"])
    hist = torch.randint(1, schema["ad_id"].rows, (size, length), generator=gen)
    lengths = torch.randint(min_len, length + 1, (size,), generator=gen)
    hist = hist * (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1))
    batch["hist_ad_id"] = hist
    batch["hist_category_id"] = category_of(hist)
    batch["click"] = torch.randint(0, 2, (size,), generator=gen).float()
    batch["conversion"] = batch["click"] * torch.randint(0, 2, (size,), generator=gen).float()
    return batch


def with_extra_pads(batch: dict[str, torch.Tensor], pads: int) -> dict[str, torch.Tensor]:
    """The same rows with `pads` more padding columns at the end of every history."""
    out = dict(batch)
    for name in ("hist_ad_id", "hist_category_id"):
        seq = batch[name]
        out[name] = torch.cat([seq, seq.new_zeros(seq.shape[0], pads)], dim=1)
    return out


def rows(batch: dict[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[index] for k, v in batch.items()}
