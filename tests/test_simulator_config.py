"""Simulator configs: presets, file overrides, and one-line rejections naming the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models.data.sim_config import SimConfigError, load_config, preset


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_presets_grow_and_large_is_chunked():
    tiny, small, large = preset("tiny"), preset("small"), preset("large")
    assert tiny.market.n_ads == 5_000 and small.market.n_ads == 100_000
    assert large.market.n_ads == 1_000_000
    slots = sum(s.slots * s.share for s in large.scenes.values())
    assert large.log.n_requests * slots >= 20_000_000
    assert large.log.n_requests / large.log.chunk_requests >= 10  # streamed, bounded memory
    assert [s.slots for s in tiny.scenes.values()] == [6, 4, 3]


def test_yaml_and_json_files_override_any_field(tmp_path: Path):
    cfg = load_config("tiny", write(tmp_path, "c.yaml",
                                    "log: {n_requests: 1234}\nscenes:\n  search: {slots: 2}\n"))
    assert cfg.log.n_requests == 1234 and cfg.scenes["search"].slots == 2
    assert cfg.scenes["home_feed"].slots == 6  # untouched fields keep the preset
    cfg = load_config("small", write(tmp_path, "c.json", json.dumps(
        {"click": {"position_decay": 0.3}})))
    assert cfg.click.position_decay == 0.3 and cfg.market.n_ads == 100_000


@pytest.mark.parametrize(("text", "message"), [
    ('{"market": {"n_ads": -5}}', "market.n_ads must be >= "),
    ('{"scenes": {"search": {"slots": 0}}}', "scenes.search.slots must be >= 1 (got 0)"),
    ('{"scenes": {"search": {"slots": 9}}}', "scenes.search.slots must be <= 8"),
    ('{"scenes": {"video": {"slots": 2}}}', "unknown scene 'video'"),
    ('{"policy": {"interest_share": 1.5}}', "policy.interest_share must be a probability"),
    ('{"market": {"paused_share": -0.1}}', "market.paused_share must be a probability"),
    ('{"market": {"colour": 1}}', "unknown key market.colour"),
    ('{"log": {"n_requests": "many"}}', "log.n_requests must be an integer"),
    ('{"market": {"n_ads": 2000000}}', "market.n_ads must be <= 1048576"),
    ('[1, 2]', "must hold a mapping"),
    ('{"log": {', "is not valid json"),
])
def test_nonsense_is_one_line_naming_the_field(tmp_path: Path, text: str, message: str):
    with pytest.raises(SimConfigError) as err:
        load_config("tiny", write(tmp_path, "bad.json", text))
    assert message in str(err.value)
    assert "\n" not in str(err.value)
    assert isinstance(err.value, ValueError)


def test_unknown_scale_and_missing_file(tmp_path: Path):
    with pytest.raises(SimConfigError, match="scale must be one of tiny, small, large"):
        load_config("huge")
    with pytest.raises(SimConfigError, match="config file not found"):
        load_config("tiny", tmp_path / "nope.yaml")
