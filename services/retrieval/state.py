"""The retrieval stage's state: a `Recall` loaded from a bundle, and its wire-level methods.

Bundle files read here (names agreed with models/bundle and training):
- `two_tower_ad_vectors.safetensors`: tensors "vectors" float32 [N, d] (from the ad tower) and
  "ad_ids" int64 [N];
- `faiss.index`: built by `services.retrieval.index.build_index_file` at bundle time; its spec
  (kind, nlist, nprobe, recall_at_k, k, and value_weight/value_mu/value_floor for a value-aware
  index) sits in manifest["index"] (or manifest["retrieval"]["index"]). A bundle without the
  file gets an index built at load, value-aware with the recorded term (slower start, same
  result);
- `catalog.parquet`: the ads table per the dataset contract (ad_id, scenes, status, bid_type,
  bid_micros, target_cpa_micros, ...);
- optional `cold_start.safetensors`: "ad_ids" int64 and "ecpm" float32, the Qscore-based eCPM
  estimate that orders the cold-start channel. Without it the estimate is prior CTR x bid
  (x prior CVR for oCPA): every ad then shares one CTR, which is all a bundle without
  per-ad Qscore can say. A value-aware index uses the same estimate as each ad's value.

`handle(RecallRequest) -> RecallResponse` is what both the HTTP app and the gateway's
in-process client call, so the two paths cannot drift.

A retrieval process following the catalog in Redis (stage_app.CatalogFollower) builds a new
ad's update itself, as the gateway's push does: the ad-tower vector from the bundle's two-tower
model and the Qscore eCPM estimate at the bundle's priors (`catalog_update`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from models.bundle import CATALOG_FILE, COLD_START_FILE, Bundle, read_bundle
from models.pricing import PRIOR_CVR, qscore_ecpm
from services.common import wire
from services.common.deadline import Deadline
from services.common.store import Ad, ad_features
from services.retrieval.index import (
    INDEX_FILE,
    IndexSpec,
    build_index_file,
    build_value_index,
    load_index,
    set_threads,
)
from services.retrieval.recall import (
    ACTIVE,
    PAUSED,
    AdCatalog,
    Recall,
    RecallQuery,
    channel_query,
)

log = logging.getLogger(__name__)

VECTORS_FILE = "two_tower_ad_vectors.safetensors"
PRIOR_CTR = 0.01

UserEncoder = Callable[[wire.RecallRequest], np.ndarray | None]


@dataclass
class RetrievalState:
    """One loaded bundle's retrieval: the index, the catalog, and an optional user tower."""

    version: str
    recall: Recall
    spec: IndexSpec | None = None
    user_encoder: UserEncoder | None = None  # features -> user vector (the two-tower user tower)
    extra: dict[str, Any] = field(default_factory=dict)
    ad_encoder: Callable[[dict[str, Any]], np.ndarray] | None = None  # a new ad's vector
    cold_prior: tuple[float, float] = (PRIOR_CTR, PRIOR_CVR)  # (Qscore prior CTR, prior CVR)

    def user_vector(self, request: wire.RecallRequest) -> np.ndarray | None:
        """The request's vector, else the user tower's, else None (cold-start channel).

        Always the plain user-tower vector: a value-aware index's trailing 1.0 is appended by
        `Recall` itself, after normalisation (see recall.py)."""
        if request.user_vector is not None and request.user_vector.size:
            return request.user_vector
        if self.user_encoder is not None and (request.user or request.hist):
            return self.user_encoder(request)
        return None

    def handle(self, request: wire.RecallRequest,
               deadline: Deadline | None = None) -> wire.RecallResponse:
        vector = self.user_vector(request)
        if deadline is not None:
            deadline.check("faiss search")
        result = self.recall.recall(recall_query(request, vector))
        return wire.RecallResponse(ad_ids=result.ad_ids, scores=result.scores,
                                   channel=result.channel, eligible=result.eligible,
                                   info=wire.StageInfo(model_version=self.version),
                                   **result.wire_channels())

    def update(self, update: wire.CatalogUpdate) -> wire.CatalogUpdateResponse:
        """Apply a catalog change; a new ad needs its ad-tower vector (plain: a value-aware
        index augments it with w·(log cold_score − mu), cold_score <= 0 -> the catalog's
        minimum)."""
        vector = update.vector if update.vector is not None and update.vector.size else None
        added = self.recall.add_ad(update.ad_id, vector, update.scenes, update.status,
                                   update.cold_score)
        return wire.CatalogUpdateResponse(ad_id=update.ad_id, status=update.status, added=added)


def recall_query(request: wire.RecallRequest, vector: np.ndarray | None) -> RecallQuery:
    """The wire request in `Recall`'s terms: who is asking, where, and what they may see."""
    return RecallQuery(
        scene=request.scene, user_vector=vector, k=request.k,
        exclude_ad_ids=request.eligibility.exclude_ad_ids,
        include_paused=request.eligibility.include_paused,
        ignore_scene_targeting=request.eligibility.ignore_scene_targeting,
        **channel_query(request.hist, request.quotas))


def catalog_update(state: RetrievalState, ad: Ad) -> wire.CatalogUpdate:
    """The update `admin.push_ad` would send this stage for `ad`, built from the store's record
    alone (catalog catch-up). Without a two-tower model a NEW ad is refused (ValueError)."""
    features = ad_features(ad)
    vector = state.ad_encoder(features) if state.ad_encoder is not None else None
    prior_ctr, prior_cvr = state.cold_prior
    estimate = qscore_ecpm(prior_ctr, ad.bid_type == "ocpa", ad.bid_micros,
                           ad.target_cpa_micros, prior_cvr)
    return wire.CatalogUpdate(ad_id=ad.ad_id, vector=vector, scenes=list(ad.scenes),
                              status=ad.status, cold_score=float(estimate), features=features)


def _ad_encoder(bundle: Bundle, user_encoder: Any
                ) -> Callable[[dict[str, Any]], np.ndarray] | None:
    """The bundle's two-tower ad tower (sharing the user encoder's model when it has one)."""
    if "two_tower" not in bundle.manifest.get("models", {}):
        return None
    import torch

    from models.bundle import load_model
    from services.common.features import FeatureEncoder, to_tensors

    model = getattr(user_encoder, "model", None)
    if model is None:
        with torch.inference_mode():
            model = load_model(bundle, "two_tower")
    encoder = FeatureEncoder(bundle.schema)

    def encode(features: dict[str, Any]) -> np.ndarray:
        with torch.inference_mode():
            return model.ad_vector(to_tensors(encoder.ad(features)))[0].float().numpy()
    return encode


def _cold_prior(bundle: Bundle) -> tuple[float, float]:
    """(Qscore prior CTR, prior CVR) as the gateway reads them from the bundle."""
    from services.gateway.stage_loaders import bundle_priors

    prior, _, cvr = bundle_priors(bundle)
    return float(prior.prior_mean), float(cvr)


def _catalog_for(ad_ids: np.ndarray, table: dict[str, list], cold: np.ndarray) -> AdCatalog:
    """Align the catalog table with the vector rows: an ad without a catalog row never serves."""
    row_of = {int(a): i for i, a in enumerate(table["ad_id"])}
    scenes: list[list[str]] = []
    statuses: list[str] = []
    missing = 0
    for ad_id in ad_ids.tolist():
        row = row_of.get(ad_id)
        if row is None:
            missing += 1
            scenes.append([])
            statuses.append(PAUSED)
        else:
            scenes.append(list(table["scenes"][row] or []))
            statuses.append(ACTIVE if table["status"][row] == ACTIVE else PAUSED)
    if missing:
        log.warning("retrieval: %d ads have vectors but no catalog row; they will not serve",
                    missing)
    return AdCatalog.build(ad_ids, scenes, statuses, cold)


def _cold_scores(bundle: Bundle, ad_ids: np.ndarray, table: dict[str, list]) -> np.ndarray:
    scores = np.zeros(ad_ids.size, dtype=np.float32)
    if bundle.has(COLD_START_FILE):
        arrays = bundle.arrays(COLD_START_FILE)
        lookup = dict(zip(arrays["ad_ids"].tolist(), arrays["ecpm"].tolist(), strict=True))
        for i, ad_id in enumerate(ad_ids.tolist()):
            scores[i] = lookup.get(ad_id, 0.0)
        return scores
    priors = bundle.manifest.get("priors", {})
    ctr, cvr = float(priors.get("ctr", PRIOR_CTR)), float(priors.get("cvr", PRIOR_CVR))
    row_of = {int(a): i for i, a in enumerate(table["ad_id"])}
    for i, ad_id in enumerate(ad_ids.tolist()):
        row = row_of.get(ad_id)
        if row is None:
            continue
        bid_type = table["bid_type"][row] if "bid_type" in table else "cpc"
        if bid_type == "ocpa" and "target_cpa_micros" in table:
            scores[i] = qscore_ecpm(ctr, True, 0, float(table["target_cpa_micros"][row]), cvr)
        elif "bid_micros" in table:
            scores[i] = qscore_ecpm(ctr, False, float(table["bid_micros"][row]), 0, cvr)
    return scores


def load_retrieval_state(path: str, *, faiss_threads: int = 1,
                         user_encoder_factory: Callable[[Bundle], UserEncoder | None] | None
                         = None) -> RetrievalState:
    """Load a bundle (version dir or BUNDLES root) into a ready RetrievalState."""
    set_threads(faiss_threads)
    bundle = read_bundle(path)
    arrays = bundle.arrays(VECTORS_FILE)
    vectors = np.ascontiguousarray(arrays["vectors"], dtype=np.float32)
    ad_ids = np.ascontiguousarray(arrays["ad_ids"], dtype=np.int64)
    # `cascade train` records the spec at manifest["index"], this module's writer under
    # manifest["retrieval"]["index"]: read either.
    spec_data = (bundle.manifest.get("retrieval", {}).get("index")
                 or bundle.manifest.get("index"))
    spec = IndexSpec.from_dict(spec_data) if spec_data else None
    columns = ["ad_id", "scenes", "status", "bid_type", "bid_micros", "target_cpa_micros",
               "category_id"]
    schema_names = pq.read_schema(bundle.file(CATALOG_FILE)).names
    for required in ("ad_id", "scenes", "status"):
        if required not in schema_names:
            raise ValueError(f"{CATALOG_FILE} lacks column '{required}'")
    table = pq.read_table(bundle.file(CATALOG_FILE),
                          columns=[c for c in columns if c in schema_names]).to_pydict()
    cold = _cold_scores(bundle, ad_ids, table)
    value = spec.value if spec is not None else None
    if bundle.has(INDEX_FILE):
        index = load_index(bundle.file(INDEX_FILE), spec)
    else:
        log.warning("bundle %s has no %s: building the index at load", bundle.version,
                    INDEX_FILE)
        options: dict[str, Any] = {}
        if value is not None:  # the recorded term, so new ads and old ones agree
            options = {"ecpm": cold, "value_weight": value.weight, "value_mu": value.mu,
                       "value_floor": value.floor or None}
        index, spec = build_value_index(vectors, ad_ids, **options)
    if index.ntotal != ad_ids.size:
        raise ValueError(f"{INDEX_FILE} holds {index.ntotal} ads but {VECTORS_FILE} "
                         f"{ad_ids.size}")
    expected_dim = vectors.shape[1] + (1 if value is not None else 0)
    if index.d != expected_dim:
        raise ValueError(f"{INDEX_FILE} has {index.d} dims; {VECTORS_FILE} has "
                         f"{vectors.shape[1]} and the index is "
                         f"{'value-aware (+1)' if value is not None else 'plain'}")
    catalog = _catalog_for(ad_ids, table, cold)
    encoder = user_encoder_factory(bundle) if user_encoder_factory is not None else None
    recall = Recall(index, catalog, tuned_k=spec.k if spec else None, value=value)
    if "category_id" in table:  # the category channel's lists
        recall.set_categories(np.asarray(table["ad_id"]), np.asarray(table["category_id"]))
    return RetrievalState(version=bundle.version, recall=recall, spec=spec, user_encoder=encoder,
                          ad_encoder=_ad_encoder(bundle, encoder), cold_prior=_cold_prior(bundle))


def write_retrieval_artifacts(writer: Any, vectors: np.ndarray, ad_ids: np.ndarray,
                              catalog: Any, *, queries: np.ndarray | None = None,
                              **index_options: Any) -> IndexSpec:
    """Bundle-time helper: write the ad vectors, the tuned faiss index and the catalog into a
    `models.bundle.BundleWriter`, and record the index spec in manifest["retrieval"]["index"].

    `catalog`: a pyarrow Table (the ads table); `queries`: sample user vectors for the recall
    measurement (training users are best); `ecpm=` (row-aligned eCPM estimates) with
    `value_weight=` > 0 makes the index value-aware (see index.py).
    """
    import pyarrow as pa

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    ad_ids = np.ascontiguousarray(ad_ids, dtype=np.int64)
    writer.save_arrays(VECTORS_FILE, {"vectors": vectors, "ad_ids": ad_ids})
    spec = build_index_file(writer.path(""), vectors, ad_ids, queries=queries, **index_options)
    table = catalog if isinstance(catalog, pa.Table) else pa.table(catalog)
    pq.write_table(table, writer.path(CATALOG_FILE))
    writer.manifest.setdefault("retrieval", {})["index"] = spec.to_dict()
    return spec
