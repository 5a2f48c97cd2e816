"""A dataset's own split (the impressions' `split` column) is honoured: training uses its train
rows (validation carved from the latest of them unless it names valid rows), the manifest
records it, and eval measures exactly its test rows."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from models.bundle import read_bundle
from models.data import layout
from models.data.dataset import load_encoded_log
from models.train.evaluate import evaluate
from models.train.loop import FitConfig
from models.train.split import TEST, TRAIN, VALID, ColumnSplit, choose_split, split_from_dict
from models.train.trainer import TrainOptions, train


@dataclass
class _Rows:
    ts: np.ndarray
    split: np.ndarray | None


def _with_split(src: Path, dst: Path, name_of: callable) -> Path:
    """Copy a dataset and add a `split` column chosen per impression by `name_of(table)`."""
    shutil.copytree(src, dst)
    for part in sorted((dst / layout.IMPRESSIONS_DIR).glob("*.parquet")):
        table = pq.read_table(part)
        table = table.append_column("split", pa.array(name_of(table), pa.string()))
        pq.write_table(table, part)
    return dst


def _every_fifth_request_is_test(table: pa.Table) -> np.ndarray:
    rid = table.column("request_id").to_numpy()
    return np.where(rid % 5 == 0, "test", "train")


def test_column_split_with_and_without_valid_rows():
    ts = np.arange(25, dtype=np.int64)
    codes = np.array([TRAIN] * 10 + [TEST] * 5 + [TRAIN] * 10, dtype=np.int8)
    split = choose_split(_Rows(ts, codes))
    train, valid, test = split.indices(_Rows(ts, codes))
    assert list(test) == list(range(10, 15))  # the dataset's test rows, not the latest ones
    assert len(train) == 18 and list(valid) == [23, 24]  # the latest 10% of 20 train rows
    assert ts[train].max() < ts[valid].min()
    assert split_from_dict(split.to_dict()) == split
    codes[[3, 4]] = VALID
    named = choose_split(_Rows(ts, codes))
    assert named == ColumnSplit(None)
    assert [list(p) for p in named.indices(_Rows(ts, codes))][1] == [3, 4]


def test_unknown_split_value_is_refused(micro_data, tmp_path):
    data = _with_split(micro_data, tmp_path / "bad", lambda t: np.full(t.num_rows, "holdout"))
    with pytest.raises(layout.DatasetError, match="holdout"):
        load_encoded_log(data)


@pytest.mark.slow
def test_a_dataset_split_is_trained_and_evaluated_on_exactly_its_rows(micro_data, tmp_path):
    data = _with_split(micro_data, tmp_path / "data", _every_fifth_request_is_test)
    rid = pq.read_table(data / layout.IMPRESSIONS_DIR, columns=["request_id"]).column(
        "request_id").to_numpy()
    n_test, n_train = int((rid % 5 == 0).sum()), int((rid % 5 != 0).sum())
    options = TrainOptions(models=("qscore", "base"), device="cpu",
                           fit=FitConfig(epochs=1, max_steps=20))
    writer, _ = train(data, tmp_path / "bundles", options)
    writer.commit()
    manifest = read_bundle(tmp_path / "bundles").manifest
    rows = manifest["split"]["rows"]
    assert manifest["split"]["kind"] == "column"
    assert rows["test"] == n_test and rows["train"] + rows["valid"] == n_train
    assert abs(rows["valid"] - 0.1 * n_train) <= 10  # ties of one request's slots at the cut
    assert manifest["models"]["base"]["train_rows"] == rows["train"]
    result = evaluate(data, tmp_path / "bundles")
    assert result["rows"] == n_test and result["split"] == "column"
