"""The simulator's ground truth, queryable: true pCTR and pCVR of any (user, sequence, scene,
position, ad), not only of the logged impressions.

A dataset records the config (`sim_config.json`) and seed (`summary.json`) it was simulated
with, and the marketplace is a pure function of the two (sim_market.build_marketplace), so the
hidden parameters (appeal, quality, intent, category latents) can be rebuilt exactly. The
probabilities then come from the same functions the log generator used (simulator.true_logits,
history_activation), which is what makes them equal to the logged `true_pctr` / `true_pcvr`.

Offline tools (replay, funnel, eval) use it; the serving code must never import it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.data import layout
from models.data.sim_config import SimConfig, apply_overrides, preset
from models.data.sim_market import Marketplace, build_marketplace
from models.data.simulator import history_activation, true_logits
from models.features.schema import load_schema

CONFIG_FILE = "sim_config.json"


class TruthUnavailable(ValueError):
    """The dataset was not written by the simulator (no recorded config or seed)."""


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


@dataclass
class Truth:
    """The rebuilt latent marketplace and the probabilities it implies."""

    cfg: SimConfig
    market: Marketplace
    scene_index: dict[str, int]

    @classmethod
    def from_dataset(cls, data_dir: str | Path) -> Truth:
        """Rebuild the marketplace of a simulated dataset from its recorded config and seed."""
        root = layout.require_dataset(data_dir)
        config_path, summary_path = root / CONFIG_FILE, root / layout.SUMMARY_FILE
        if not config_path.is_file() or not summary_path.is_file():
            raise TruthUnavailable(f"{root} has no {CONFIG_FILE} / {layout.SUMMARY_FILE}: "
                                   "the truth is known only for simulated datasets")
        recorded = json.loads(config_path.read_text())
        summary = json.loads(summary_path.read_text())
        if "seed" not in summary:
            raise TruthUnavailable(f"{summary_path} records no seed")
        cfg = apply_overrides(preset(recorded.get("scale", "tiny")),
                              {k: v for k, v in recorded.items() if k != "scale"})
        schema_path = root / layout.SCHEMA_FILE
        schema = load_schema(schema_path if schema_path.is_file() else None)
        market = build_marketplace(cfg, int(summary["seed"]), schema.sequence_len)
        return cls(cfg, market, {name: i for i, name in enumerate(cfg.scenes)})

    @property
    def sequence_len(self) -> int:
        return int(self.market.initial_history.shape[1])

    @property
    def n_ads(self) -> int:
        return self.market.n_ads

    def scene_of(self, scene: str | int) -> int:
        if isinstance(scene, str):
            if scene not in self.scene_index:
                raise ValueError(f"scene {scene!r} is not one of the simulator's "
                                 f"{', '.join(self.scene_index)}")
            return self.scene_index[scene]
        return int(scene)

    def _check_ids(self, user: np.ndarray, ad: np.ndarray) -> None:
        if ad.size and (ad.min() < 0 or ad.max() >= self.market.n_ads):
            raise ValueError(f"ad ids must be in [0, {self.market.n_ads}): the truth knows "
                             "only the simulated catalog")
        if user.size and (user.min() < 0 or user.max() >= self.market.n_users):
            raise ValueError(f"user ids must be in [0, {self.market.n_users})")

    def impressions(self, user: np.ndarray, hist: np.ndarray, scene: np.ndarray,
                    position: np.ndarray, ad: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(pCTR, pCVR) float32 per row: `hist` is [rows, L] ad ids, newest first, -1 padded
        (the sequence as it stood strictly before the request). Row-wise, the generator's
        own arithmetic, so logged impressions are reproduced bit for bit."""
        user, ad = np.asarray(user, np.int64), np.asarray(ad, np.int64)
        self._check_ids(user, ad)
        act = history_activation(self.cfg, self.market, np.asarray(hist, np.int32), ad)
        ctr, cvr = true_logits(self.cfg, self.market, user, ad, np.asarray(scene, np.int64),
                               np.asarray(position, np.int64), act)
        return _sigmoid(ctr).astype(np.float32), _sigmoid(cvr).astype(np.float32)

    def request(self, user: int, hist: np.ndarray | list[int], scene: str | int,
                position: int | np.ndarray, ads: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(pCTR, pCVR) of many candidate ads for one request, vectorised over the ads.

        The history enters only through the candidate's leaf category (its similarity to
        the categories of the behaviours), so the activation is computed once per category
        present among the candidates and gathered: a whole corpus costs a few hundred
        activation rows instead of one per ad. `position` is a slot (or one per ad)."""
        ads = np.asarray(ads, np.int64)
        # padded to the generator's width: the same reductions, so the same float result
        given = np.asarray(hist, np.int32).reshape(-1)
        seq = np.full((1, max(self.sequence_len, given.size, 1)), -1, np.int32)
        seq[0, :given.size] = given
        self._check_ids(np.asarray([user], np.int64), ads)
        category = self.market.ads["category_id"][ads]
        cats, first, inverse = np.unique(category, return_index=True, return_inverse=True)
        rows = np.repeat(seq, cats.size, axis=0)
        act = history_activation(self.cfg, self.market, rows, ads[first])[inverse]
        n = ads.size
        ctr, cvr = true_logits(self.cfg, self.market, np.full(n, user, np.int64), ads,
                               np.full(n, self.scene_of(scene), np.int64),
                               np.broadcast_to(np.asarray(position, np.int64), (n,)), act)
        return _sigmoid(ctr).astype(np.float32), _sigmoid(cvr).astype(np.float32)

    def bid_terms(self, ads: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(oCPA flag, CPC bid, target CPA) of ads, from the simulated catalog."""
        ads = np.asarray(ads, np.int64)
        a = self.market.ads
        return a["bid_type"][ads] == "ocpa", a["bid_micros"][ads], a["target_cpa_micros"][ads]
