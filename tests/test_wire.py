"""The .proto files, the generated protobuf classes and the pydantic models agree, and both
encodings carry the same values."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from proto.cascade.v1 import ads_pb2, stages_pb2
from services.common import wire

PROTO_DIR = Path(__file__).resolve().parents[1] / "proto" / "cascade" / "v1"
FIELD = re.compile(
    r"^\s*(?:optional\s+|repeated\s+)?(map<[^>]+>|[\w.]+)\s+(\w+)\s*=\s*\d+\s*;", re.M)


def parse_proto(text: str) -> dict[str, list[str]]:
    """message name -> field names (oneof members included), from the .proto source."""
    text = re.sub(r"//[^\n]*", "", text)
    messages: dict[str, list[str]] = {}
    for match in re.finditer(r"\bmessage\s+(\w+)\s*\{", text):
        depth, pos = 1, match.end()
        while depth:
            depth += {"{": 1, "}": -1}.get(text[pos], 0)
            pos += 1
        body = re.sub(r"\boneof\s+\w+\s*\{", "", text[match.end():pos - 1])
        messages[match.group(1)] = [m.group(2) for m in FIELD.finditer(body)]
    return messages


def all_proto_messages() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for path in sorted(PROTO_DIR.glob("*.proto")):
        found.update(parse_proto(path.read_text()))
    return found


def test_every_proto_message_has_a_pydantic_model_with_the_same_fields():
    messages = all_proto_messages()
    assert {"RecallRequest", "RankResponse", "AdsRequest", "AdsResponse"} <= set(messages)
    for name, fields in messages.items():
        if name == "Scalar":  # a oneof carrier: pydantic uses int | float | str directly
            continue
        assert name in wire.MODELS, f"proto message {name} has no pydantic model"
        assert set(wire.MODELS[name].model_fields) == set(fields), name


def test_generated_protobuf_matches_the_proto_source():
    """The checked-in *_pb2.py were regenerated after the last .proto edit."""
    messages = all_proto_messages()
    generated = {}
    for module in (stages_pb2, ads_pb2):
        for name, desc in module.DESCRIPTOR.message_types_by_name.items():
            generated[name] = [f.name for f in desc.fields]
    assert generated == messages


def test_public_request_fields_are_the_contract():
    assert set(wire.AdsRequest.model_fields) == {
        "request_id", "user_id", "scene", "slots", "context", "budget_ms", "debug"}
    assert set(wire.AdSlot.model_fields) >= {
        "ad_id", "campaign_id", "creative_id", "price_micros", "pctr", "pcvr", "ecpm", "token"}
    assert set(wire.StageReport.model_fields) >= {
        "name", "count_in", "count_out", "ms", "degraded"}


def rank_request() -> wire.RankRequest:
    return wire.RankRequest(
        request_id="r-1", user_id="u-9", scene="search",
        user={"age_bucket": 3, "gender": "female", "city_tier": 1},
        hist={"hist_ad_id": wire.Column(ints=[5, 4, 3]),
              "hist_category_id": wire.Column(ints=[7, 7, 2])},
        context={"hour": 13, "device": "ios"},
        ad_ids=np.array([2**40 + 1, 17, 3], dtype=np.int64),  # ids above 2^24 stay exact
        ad_features={"campaign_id": wire.Column(ints=[1, 2, 3]),
                     "bid_type": wire.Column(strs=["cpc", "ocpa", "cpc"])})


@pytest.mark.parametrize("media", [wire.JSON, wire.PROTOBUF])
def test_round_trip_keeps_every_value(media):
    request = rank_request()
    back = wire.decode(wire.RankRequest, wire.encode(request, media), media)
    assert back.ad_ids.dtype == np.int64
    assert back.ad_ids.tolist() == [2**40 + 1, 17, 3]
    assert back.user == request.user and back.context == request.context
    assert back.hist["hist_category_id"].ints.tolist() == [7, 7, 2]
    assert back.ad_features["bid_type"].strs == ["cpc", "ocpa", "cpc"]
    response = wire.RankResponse(ad_ids=request.ad_ids, pctr=[0.1, 0.2, 0.3],
                                 pcvr=[0.5, 0.5, 0.5], pctcvr=[0.05, 0.1, 0.15],
                                 info=wire.StageInfo(model_version="v1", compute_ms=1.5))
    again = wire.decode(wire.RankResponse, wire.encode(response, media), media)
    assert np.allclose(again.pctr, [0.1, 0.2, 0.3]) and again.pctr.dtype == np.float32
    assert again.info.model_version == "v1" and again.info.compute_ms == 1.5


def test_defaults_survive_protobuf():
    """proto3 has no default values: an unset k must still mean 2000, not 0."""
    back = wire.decode(wire.RecallRequest,
                       wire.encode(wire.RecallRequest(scene="search"), wire.PROTOBUF),
                       wire.PROTOBUF)
    assert back.k == 2000 and back.user_vector is None
    assert back.eligibility.include_paused is False
    ads = wire.AdsRequest(request_id="1", user_id="2", scene="search", slots=3)
    assert wire.decode(wire.AdsRequest, wire.encode(ads, wire.PROTOBUF),
                       wire.PROTOBUF).budget_ms is None


def test_candidate_ids_are_compact_in_json():
    ids = np.arange(10**12, 10**12 + 2000, dtype=np.int64)
    body = wire.encode(wire.PrerankRequest(scene="search", ad_ids=ids))
    assert len(body) < 2000 * 8 * 1.4 + 200  # base64 of packed int64, not a decimal list
    assert wire.decode(wire.PrerankRequest, body).ad_ids.tolist() == ids.tolist()
    listed = b'{"scene": "search", "ad_ids": [1, 2, 3]}'  # plain lists are accepted too
    assert wire.decode(wire.PrerankRequest, listed).ad_ids.tolist() == [1, 2, 3]


@pytest.mark.parametrize("body, field", [
    (b'{"scene": "search", "k": "many"}', "k"),
    (b'{"scene": "search", "ad_ids": [1.5, 2]}', "ad_ids"),
    (b'{"scene": "search", "ad_ids": "not base64!"}', "ad_ids"),
    (b'{"scene": "search", "ad_ids": "AAAA"}', "ad_ids"),  # 3 bytes: not whole int64s
    (b'{"k": 5}', "scene"),
    (b'{"scene": "search", "surprise": 1}', "surprise"),
])
def test_bad_bodies_name_the_field(body, field):
    with pytest.raises(ValidationError) as info:
        wire.decode(wire.PrerankRequest, body)
    assert info.value.errors()[0]["loc"][0] == field


def test_public_request_coerces_numeric_user_id_and_caps_slots():
    request = wire.decode(wire.AdsRequest,
                          b'{"request_id": "a", "user_id": 42, "scene": "search", "slots": 2}')
    assert request.user_id == "42"
    with pytest.raises(ValidationError) as info:
        wire.decode(wire.AdsRequest,
                    b'{"request_id": "a", "user_id": 1, "scene": "search", "slots": 10000}')
    assert info.value.errors()[0]["loc"] == ("slots",)


def test_garbage_protobuf_is_a_wire_error():
    with pytest.raises(wire.WireError, match="RankRequest"):
        wire.decode(wire.RankRequest, b"\xff\xff\xff\xff", wire.PROTOBUF)
