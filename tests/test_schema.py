"""The feature schema: typed loading, encoding rules, hashing and clear errors."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from models.features import PAD, SchemaError, load_schema, parse_schema


@pytest.fixture(scope="module")
def schema():
    return load_schema()


def test_groups_name_every_feature_once(schema):
    assert schema.names("user") == ["age_bucket", "gender", "city_tier"]
    assert schema.names("behaviour") == ["hist_ad_id", "hist_category_id"]
    assert {"ad_id", "category_id", "bid_type"} <= set(schema.names("ad"))
    assert schema.names("scene") == ["scene", "position", "hour", "device"]
    assert schema.sequence_len == 50


def test_sequence_shares_the_ad_tables(schema):
    assert schema.table_owner("hist_ad_id").name == "ad_id"
    assert schema.table_owner("hist_category_id").name == "category_id"
    assert "hist_ad_id" not in {f.name for f in schema.tables()}
    assert schema["hist_ad_id"].rows == 0 and schema["ad_id"].rows == 1_048_577


def test_encoding_keeps_large_ids_distinct_and_pads_to_zero(schema):
    ids = np.array([0, 1, 2**24 + 5, 2**24 + 6, -1], dtype=np.int64)
    rows = schema["ad_id"].encode(ids)
    assert rows.dtype == np.int64
    assert rows[-1] == PAD and len(set(rows[:-1].tolist())) == 4
    assert schema["scene"].encode(["search", "nope"]).tolist() == [2, PAD]
    assert schema["hour"].encode(np.array([0, 23, 24])).tolist() == [1, 24, PAD]
    assert schema["device"].encode_one("web") == 3


def test_hash_ignores_formatting_but_not_content(schema):
    same = parse_schema(copy.deepcopy(schema.to_dict()))
    assert same.sha256 == schema.sha256
    changed = copy.deepcopy(schema.to_dict())
    changed["groups"]["ad"][0]["dim"] = 32
    assert parse_schema(changed).sha256 != schema.sha256


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: s["groups"]["user"][0].update(dim=0), "groups.user.age_bucket.dim"),
        (lambda s: s["groups"]["ad"][0].update(kind="float"), "groups.ad.ad_id.kind"),
        (lambda s: s["groups"]["behaviour"][0].update(shares="nope"), "hist_ad_id.shares"),
        (lambda s: s["sequence"].update(max_len=-1), "sequence.max_len"),
        (lambda s: s["groups"].update(other=[]), "unknown groups"),
    ],
)
def test_bad_schema_names_the_field(schema, mutate, message):
    source = copy.deepcopy(schema.to_dict())
    mutate(source)
    with pytest.raises(SchemaError, match=message):
        parse_schema(source)
