"""Building the gateway's stages from configuration: in-process states or HTTP clients.

`CASCADE_RETRIEVAL_URL` / `CASCADE_PRERANK_URL` / `CASCADE_RANK_URL` unset -> the stage is
loaded from the bundle into this process (`LocalStage`); set -> an `HttpStage` to that URL. The
cascade code is the same either way.

The gateway also reads a few things from the bundle itself, whatever the stages' placement:
the Qscore prior and training counts (screening), a prior CVR (oCPA screening and the rank
fallback), and the two-tower ad tower (a new ad's retrieval vector, computed here because the
retrieval stage holds vectors, not the tower). The in-process retrieval state gets the same
numpy user tower the retrieval service runs (`two_tower_user_encoder`), so recall uses the
user's features.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from models.bundle import QSCORE_COUNTS_FILE, Bundle, read_bundle
from models.nn.qscore import Qscore
from models.pricing import PRIOR_CVR
from services.common import wire
from services.common.config import Settings
from services.common.features import FeatureEncoder, to_tensors
from services.gateway.clients import HttpStage, LocalStage
from services.gateway.service import Stages

log = logging.getLogger(__name__)

DEFAULT_PRIOR_CVR = PRIOR_CVR  # when the bundle records no measured base rate


@dataclass
class TwoTower:
    """The bundle's two-tower ad tower in serving form: a new ad's retrieval vector."""

    model: Any
    encoder: FeatureEncoder

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> TwoTower | None:
        if "two_tower" not in bundle.manifest.get("models", {}):
            return None
        from models.bundle import load_model

        with torch.inference_mode():
            model = load_model(bundle, "two_tower")
        return cls(model, FeatureEncoder(bundle.schema))

    def ad_vector(self, features: dict[str, Any]) -> np.ndarray:
        with torch.inference_mode():
            return self.model.ad_vector(to_tensors(self.encoder.ad(features)))[0].float().numpy()


def load_stage(name: str, path: str, settings: Settings) -> Any:
    """One stage's state from a bundle (also what `cascade serve <stage>` loads)."""
    if name == "retrieval":
        from services.retrieval.state import load_retrieval_state
        from services.retrieval.user_encoder import two_tower_user_encoder

        # the retrieval service's own numpy user tower (~30 us; eager torch took ~0.35 ms)
        return load_retrieval_state(path, faiss_threads=settings.faiss_threads,
                                    user_encoder_factory=two_tower_user_encoder)
    if name == "prerank":
        from services.prerank.state import load_prerank_state

        return load_prerank_state(path, threads=settings.torch_threads)
    if name == "rank":
        from services.rank.state import load_rank_state

        return load_rank_state(path, threads=settings.torch_threads)
    raise ValueError(f"unknown stage '{name}' (retrieval, prerank, rank)")


def bundle_priors(bundle: Bundle) -> tuple[Qscore, dict[int, tuple[int, int]], float]:
    """(Qscore prior, per-ad training counts, prior CVR) recorded in the bundle."""
    prior = Qscore(1.0, 99.0)
    counts: dict[int, tuple[int, int]] = {}
    entry = bundle.manifest.get("models", {}).get("qscore")
    if entry:
        prior = Qscore.from_dict(entry["prior"])
        if bundle.has(entry.get("file", QSCORE_COUNTS_FILE)):
            arrays = bundle.arrays(entry.get("file", QSCORE_COUNTS_FILE))
            counts = {int(a): (int(i), int(c)) for a, i, c in zip(
                arrays["ad_ids"].tolist(), arrays["impressions"].tolist(),
                arrays["clicks"].tolist(), strict=True)}
    cvr = bundle.manifest.get("priors", {}).get("cvr")
    if cvr is None:
        summary = bundle.manifest.get("data", {}).get("summary", {})
        cvr = summary.get("cvr") or DEFAULT_PRIOR_CVR
    return prior, counts, float(cvr)


PATHS = {"retrieval": ("/v1/recall", wire.RecallResponse),
         "prerank": ("/v1/prerank", wire.PrerankResponse),
         "rank": ("/v1/rank", wire.RankResponse)}


def build_stages(settings: Settings, bundle_path: str | None,
                 states: dict[str, Any] | None = None) -> Stages:
    """Stage clients per configuration; `states` injects already-loaded states (tests)."""
    bundle = read_bundle(bundle_path) if bundle_path else None
    urls = {"retrieval": settings.retrieval_url, "prerank": settings.prerank_url,
            "rank": settings.rank_url}
    clients: dict[str, Any] = {}
    for name, url in urls.items():
        if url:
            path, response = PATHS[name]
            clients[name] = HttpStage(name, url, path, response,
                                      admin_key=settings.internal_key if settings.auth else None)
            continue
        state = (states or {}).get(name)
        if state is None:
            if bundle_path is None:
                raise ValueError(f"no bundle: the in-process {name} stage needs --bundle or "
                                 f"CASCADE_BUNDLE (or set CASCADE_{name.upper()}_URL)")
            state = load_stage(name, bundle_path, settings)
        clients[name] = LocalStage(name, state, loader=lambda p, n=name: load_stage(n, p,
                                                                                    settings),
                                   bundle=bundle_path)
    stages = Stages(clients["retrieval"], clients["prerank"], clients["rank"])
    if bundle is not None:
        stages.prior, stages.qscore_counts, stages.prior_cvr = bundle_priors(bundle)
        stages.vectorizer = TwoTower.from_bundle(bundle)
    return stages
