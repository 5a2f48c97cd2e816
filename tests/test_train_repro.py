"""Training with a fixed seed is reproducible: same seed, data and threads give the same weights.

The initial weights are the first random draw of a run, so the trainer seeds before it builds a
model; batches are drawn from a seeded generator. A different seed must give other weights, or
the test would pass for a trainer that ignores the seed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from models.bundle import weights_file
from models.train.loop import FitConfig
from models.train.trainer import TrainOptions, train

MODELS = ("din_esmm", "two_tower")


def _weights(data: Path, out: Path, seed: int) -> dict[str, dict[str, torch.Tensor]]:
    options = TrainOptions(models=MODELS, device="cpu", max_rows=12_000,
                           fit=FitConfig(epochs=1, seed=seed))
    writer, _ = train(data, out, options)
    try:
        return {m: load_file(str(writer.path(weights_file(m)))) for m in MODELS}
    finally:
        writer.abort()


def test_same_seed_gives_identical_weights_and_another_seed_does_not(micro_data, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        first = _weights(micro_data, tmp_path / "a", seed=3)
        again = _weights(micro_data, tmp_path / "b", seed=3)
        other = _weights(micro_data, tmp_path / "c", seed=4)
    finally:
        torch.set_num_threads(threads)
    for model in MODELS:
        assert first[model].keys() == again[model].keys()
        for key, value in first[model].items():
            assert torch.equal(value, again[model][key]), (model, key)
        differ = [k for k, v in first[model].items() if not torch.equal(v, other[model][k])]
        assert differ, model
