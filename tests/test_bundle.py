"""Bundles are immutable, verified on load, and published by an atomic `current` switch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from models.bundle import BundleError, BundleWriter, read_bundle
from models.features import load_schema, parse_schema


def _write(root, schema, version, value=1.0):
    writer = BundleWriter(root, schema, version=version)
    writer.save_tensors("m.safetensors", {"w": torch.full((3, 2), value)})
    writer.save_arrays("v.safetensors", {"ids": np.arange(4, dtype=np.int64)})
    writer.add_model("m", {"file": "m.safetensors", "config": {"dim": 2}})
    return writer.commit(split={"train_end_ts": 1})


def test_round_trip_and_current_switch(tmp_path):
    schema = load_schema()
    first = _write(tmp_path, schema, "v1", 1.0)
    bundle = read_bundle(tmp_path, schema)
    assert bundle.path == first.resolve() and bundle.version == "v1"
    assert torch.equal(bundle.tensors("m.safetensors")["w"], torch.ones(3, 2))
    assert bundle.arrays("v.safetensors")["ids"].tolist() == [0, 1, 2, 3]
    assert bundle.manifest["split"] == {"train_end_ts": 1}
    assert bundle.model_entry("m")["config"] == {"dim": 2}

    _write(tmp_path, schema, "v2", 2.0)
    assert read_bundle(tmp_path, schema).version == "v2"
    # the older version is untouched and still loads by its own path
    assert torch.equal(read_bundle(first, schema).tensors("m.safetensors")["w"], torch.ones(3, 2))
    assert not list(tmp_path.glob(".*staging"))


def test_corrupt_file_is_refused(tmp_path):
    schema = load_schema()
    path = _write(tmp_path, schema, "v1")
    with (path / "m.safetensors").open("r+b") as fh:
        fh.seek(-1, 2)
        fh.write(b"\x00" if fh.read(1) != b"\x00" else b"\x01")
    with pytest.raises(BundleError, match="checksum mismatch for 'm.safetensors'"):
        read_bundle(path, schema)


def test_schema_mismatch_is_refused(tmp_path):
    schema = load_schema()
    path = _write(tmp_path, schema, "v1")
    other_source = json.loads(json.dumps(schema.to_dict()))
    other_source["sequence"]["max_len"] = 20
    other = parse_schema(other_source)
    with pytest.raises(BundleError, match="trained on schema"):
        read_bundle(path, other)


def test_missing_bundle_names_the_path(tmp_path):
    with pytest.raises(BundleError, match="bundle not found"):
        read_bundle(tmp_path / "nope")
    with pytest.raises(BundleError, match="neither a bundle"):
        read_bundle(tmp_path)
