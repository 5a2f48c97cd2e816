"""Session-wide trained bundle for every serving test: `tiny_bundle`.

Trained briefly (one epoch, at most 20k rows per model) on `tiny_data`, with the faiss index
built as `cascade train` builds it, and committed: the path is a BUNDLES root whose `current`
points at the one version. Quality is low on purpose; serving tests check behaviour, not AUC.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from models.train.loop import FitConfig
from models.train.trainer import TrainOptions, train
from services.retrieval.index import add_bundle_index

# What the serving path needs (recall, pre-rank, rank, cold start): the eval-only baselines
# (`base`, `cvr_base`) would double the fixture's training time.
FIXTURE_MODELS = ("two_tower", "dqm", "din_esmm", "qscore")
ROOT = Path(__file__).resolve().parents[1]


def build_bundle(data_dir: Path, out_root: Path, *, max_train_rows: int = 20_000,
                 models: tuple[str, ...] = FIXTURE_MODELS,
                 value_weight: float | None = None) -> Path:
    """Train briefly and publish a bundle under `out_root`; returns the version directory.
    `value_weight`: as `cascade train --value-weight` (None: the two-tower temperature)."""
    options = TrainOptions(models=models, device="cpu",
                           fit=FitConfig(epochs=1, max_train_rows=max_train_rows))
    writer, info = train(data_dir, out_root, options)
    try:
        add_bundle_index(writer, info, value_weight=value_weight)
        return writer.commit()
    except BaseException:
        writer.abort()
        raise


@pytest.fixture(scope="session")
def tiny_bundle(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """BUNDLES root of a briefly trained bundle on `tiny_data` (`current` -> the version)."""
    root = tmp_path_factory.mktemp("bundles")
    build_bundle(tiny_data, root)
    return root


@pytest.fixture(scope="session")
def default_bundle(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """BUNDLES root trained by the real `cascade train` with its default flags (every model) on
    `tiny_data`. The suite's longest training, so the tests that need it share one (read-only).
    """
    out = tmp_path_factory.mktemp("default-bundles")
    proc = subprocess.run([sys.executable, "-m", "cli.main", "train", "--data", str(tiny_data),
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "faiss index" in proc.stdout
    return out
