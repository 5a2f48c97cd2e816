"""Ali-CCP importer: a small fixture in the true CSV layout becomes a Cascade dataset."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from cli.main import run as cli_run
from models.data import layout
from models.data.aliccp import AliccpError, import_aliccp, parse_feature_list
from models.features import load_schema
from services.common.store_load import load_marketplace
from services.common.store_memory import MemoryStore


def feature_list(entries: list[tuple[str, int]]) -> str:
    """Ali-CCP's encoding: field \\x02 feature_id \\x03 value, joined by \\x01."""
    return "\x01".join(f"{field}\x02{fid}\x031.0" for field, fid in entries)


def user_features(user: int, gender: int, cats: list[int]) -> list[tuple[str, int]]:
    profile = [("121", 9000 + user % 3), ("122", 9100 + user % 2), ("124", gender),
               ("125", 9300 + user % 4), ("126", 9400), ("127", 9500), ("128", 9600),
               ("129", 9700 + user % 5)]
    return [("101", user), *profile, *[("109_14", c) for c in cats], ("110_14", 77)]


def ad_features(item: int, shop: int, cat: int, scene: int) -> list[tuple[str, int]]:
    return [("205", item), ("206", cat), ("207", shop), ("216", 60_000 + shop),
            ("210", 70_000 + cat), ("301", scene), ("508", 1), ("853", 2)]


# (sample_id, click, conversion, common index, item, shop, category, scene)
TRAIN = [
    (1, 0, 0, "aa01", 5001, 11, 501, 8801),
    (2, 1, 0, "aa01", 5002, 11, 502, 8801),
    (3, 1, 1, "aa02", 5003, 12, 501, 8802),
    (4, 0, 1, "aa02", 5001, 11, 501, 8802),  # a conversion without a click: dropped to 0
    (5, 0, 0, "aa03", 5004, 13, 503, 8801),
]
TEST = [
    (6, 1, 0, "bb01", 5001, 11, 501, 8803),
    (7, 0, 0, "bb01", 5005, 14, 504, 8801),
]
COMMON = {
    "train": {"aa01": (101, 1, [501, 502, 503]), "aa02": (102, 2, [502]),
              "aa03": (101, 1, list(range(600, 680)))},  # 80 behaviours: capped at 50
    "test": {"bb01": (103, 2, [503, 501])},
}


def write_aliccp(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for split, samples in (("train", TRAIN), ("test", TEST)):
        with (root / f"common_features_{split}.csv").open("w", newline="") as fh:
            for index, (user, gender, cats) in COMMON[split].items():
                feats = user_features(user, gender, cats)
                fh.write(f"{index},{len(feats)},{feature_list(feats)}\n")
        with (root / f"sample_skeleton_{split}.csv").open("w", newline="") as fh:
            for sid, click, conv, index, item, shop, cat, scene in samples:
                feats = ad_features(item, shop, cat, scene)
                fh.write(f"{sid},{click},{conv},{index},{len(feats)},{feature_list(feats)}\n")
    return root


@pytest.fixture
def imported(tmp_path: Path) -> tuple[Path, dict]:
    out = tmp_path / "out"
    summary = import_aliccp(write_aliccp(tmp_path / "src"), out)
    return out, summary


def test_feature_list_parsing() -> None:
    raw = feature_list([("101", 7), ("109_14", 3), ("109_14", 4)]).encode()
    assert parse_feature_list(raw) == {b"101": [7], b"109_14": [3, 4]}


def test_impressions_keep_labels_and_the_aliccp_split(imported) -> None:
    out, summary = imported
    imps = pq.read_table(out / layout.IMPRESSIONS_DIR).sort_by("ts").to_pydict()
    assert set(layout.IMPRESSION_COLUMNS) | {"split"} == set(imps)
    assert imps["split"] == ["train"] * 5 + ["test"] * 2
    assert imps["ad_id"] == [5001, 5002, 5003, 5001, 5004, 5001, 5005]
    assert imps["click"] == [0, 1, 1, 0, 0, 1, 0]
    assert imps["conversion"] == [0, 0, 1, 0, 0, 0, 0]  # conversion implies click
    assert imps["user_id"] == [101, 101, 102, 102, 101, 103, 103]
    assert all(np.isnan(imps["true_pctr"])) and all(np.isnan(imps["true_pcvr"]))
    # one request per common_feature_index; impressions of one page view share it
    assert imps["request_id"][0] == imps["request_id"][1] != imps["request_id"][2]

    assert summary["split"] == "aliccp"
    assert (summary["train_impressions"], summary["test_impressions"]) == (5, 2)
    assert (summary["impressions"], summary["ads"], summary["users"]) == (7, 5, 3)
    assert summary["ctr"] == pytest.approx(3 / 7) and summary["cvr"] == pytest.approx(1 / 3)
    assert json.loads((out / layout.SUMMARY_FILE).read_text())["split"] == "aliccp"
    layout.require_dataset(out)


def test_output_encodes_through_its_own_schema(imported) -> None:
    out, _ = imported
    schema = load_schema(out / layout.SCHEMA_FILE)
    assert schema.name == "aliccp"
    users = pq.read_table(out / layout.USERS_FILE).to_pydict()
    ads = pq.read_table(out / layout.ADS_FILE).to_pydict()
    imps = pq.read_table(out / layout.IMPRESSIONS_DIR).to_pydict()
    reqs = pq.read_table(out / layout.REQUESTS_DIR).sort_by("request_id").to_pydict()

    for name in schema.names("user"):
        rows = schema[name].encode(np.asarray(users[name]))
        assert (rows > 0).all(), name  # every fixture user has every profile field
    genders = dict(zip(users["user_id"], schema["gender_id"].encode(
        np.asarray(users["gender_id"])).tolist(), strict=True))
    assert genders[101] != genders[102] == genders[103]  # dense ids keep values apart
    for name in schema.names("ad"):
        assert (schema[name].encode(np.asarray(ads[name])) > 0).all(), name
    scene_rows = schema["scene"].encode(np.asarray(imps["scene"], dtype=object))
    assert (scene_rows > 0).all() and len(set(scene_rows.tolist())) == 3

    hist = reqs["hist_category_id"]
    assert [len(h) for h in hist] == [3, 1, 50, 2]  # capped at the schema's sequence_len
    padded = np.full((len(hist), schema.sequence_len), -1, dtype=np.int64)
    for i, h in enumerate(hist):
        padded[i, : len(h)] = h
    rows = schema["hist_category_id"].encode(padded)
    assert ((rows > 0).sum(axis=1) == [3, 1, 50, 2]).all()
    # behaviour category 501 and ad category 501 share one row of the shared table
    cat_of_ad = dict(zip(ads["ad_id"], ads["category_id"], strict=True))
    assert hist[3][1] == cat_of_ad[5001] and hist[0][0] == cat_of_ad[5001]
    assert schema.table_owner("hist_category_id").name == "category_id"


def test_imported_data_loads_into_the_online_store(imported) -> None:
    out, _ = imported
    store = MemoryStore()
    counts = asyncio.run(load_marketplace(store, out))
    assert (counts.ads, counts.campaigns, counts.users) == (5, 4, 3)
    ctx = asyncio.run(store.get_user_context(101))
    assert len(ctx.hist_category_id) == 50 and ctx.profile["gender_id"] == 0
    ad = asyncio.run(store.get_ads([5002]))[5002]
    assert ad.bid_type == "cpc" and ad.bid_micros > 0 and ad.campaign_id == 11


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        cli_run(argv)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_imports_and_reports_bad_input_in_one_line(tmp_path, capsys) -> None:
    src = write_aliccp(tmp_path / "src")
    code, out, err = _cli(["import-aliccp", "--src", str(src), "--out", str(tmp_path / "o")],
                          capsys)
    assert code == 0, err
    assert "imported 7 impressions (5 train, 2 test)" in out

    (src / "common_features_test.csv").unlink()
    code, _, err = _cli(["import-aliccp", "--src", str(src), "--out", str(tmp_path / "o2")],
                        capsys)
    assert code == 2 and "common_features_test.csv is missing" in err
    assert len(err.strip().splitlines()) == 1

    bad = tmp_path / "bad"
    write_aliccp(bad)
    with (bad / "sample_skeleton_train.csv").open("a") as fh:
        fh.write(f"8,0,0,zz99,1,{feature_list([('205', 1)])}\n")
    with pytest.raises(AliccpError, match="zz99 is not in the common features"):
        import_aliccp(bad, tmp_path / "o3")
