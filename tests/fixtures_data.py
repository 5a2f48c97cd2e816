"""Session-wide simulated marketplaces for everyone's tests (generated once, in seconds).

`tiny_data` is the `tiny` preset (seed 7): about 5k ads and 100k impressions in one part.
`micro_data` is smaller (seed 7) and split into several chunks/parts, so tests also cover
chunk boundaries; use it where the exact size does not matter.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from models.data.sim_config import SimConfig, apply_overrides, preset
from models.data.simulator import simulate

DATA_SEED = 7
MICRO_OVERRIDES = {
    "market": {"n_advertisers": 150, "n_campaigns": 400, "n_ads": 2_000, "n_brands": 400},
    "users": {"n_users": 1_500},
    "log": {"n_requests": 7_000, "chunk_requests": 2_500, "days": 2},
}


def micro_config() -> SimConfig:
    """The config behind `micro_data` (about 2k ads, 30k impressions, 3 parts)."""
    return apply_overrides(preset("tiny"), MICRO_OVERRIDES).validate()


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of a `tiny` marketplace (seed 7)."""
    out = tmp_path_factory.mktemp("data") / "tiny"
    simulate(preset("tiny"), DATA_SEED, out)
    return out


@pytest.fixture(scope="session")
def micro_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of a micro marketplace (seed 7, see `micro_config`)."""
    out = tmp_path_factory.mktemp("data") / "micro"
    simulate(micro_config(), DATA_SEED, out)
    return out
