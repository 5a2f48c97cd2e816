"""DQM pre-ranking: score a few thousand retrieved candidates with one gather + one GEMV.

DQM's logit is ⟨u + s, a⟩ (the per-ad bias folded into `a`), so per request the user tower
and the scene tower run once, and every candidate costs one row of the bundle's precomputed
ad-vector matrix: `scores = matrix[rows] @ (u + s)`. The towers run in numpy on one row
(services.common.towers: eager torch would spend ~0.4 ms in dispatch alone), and scene vectors
are cached per (scene, position, hour, device): there are at most a few thousand of them.

Scores are pCTR = sigmoid(logit): monotone in the logit, so the top K is the same, and a
gateway that must fall back to pre-ranking scores (ranking failed or ran out of time) can
price with them directly.

With the DQM's interest match, the logit also gets Σ_f w_f · match_f (models.nn.dqm). The
candidate side of each match field is the ad's L2-normalised row of the shared table, or for
a small table (categories) the ad's code: both precompute at load into the same AdTable as the
ad vectors (columns "match" and "match_codes", kept current by `add_ad`), so a request only
normalises the user's few behaviour rows and runs one [N, D] @ [D, L] per field (per distinct
code for a small table), then the softmax pooling (`NumpyInterestMatch`).

Ads added after the bundle (catalog updates) get their vector from the DQM ad tower, computed
from their raw features, and join the matrix without a rebuild (with their match rows). Candidate
ids the matrix does not know are dropped and counted, never an error.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from models.bundle import CATALOG_FILE, Bundle, ad_vectors_file, load_model
from models.nn.dqm import Dqm
from services.common.ad_table import AdTable, Snapshot
from services.common.features import FeatureEncoder, catalog_ad_features, to_tensors
from services.common.id_index import IdIndex
from services.common.towers import NumpyEmbeddings, NumpyMLP, user_tower_input

MODEL = "dqm"
DEFAULT_K = 200
SCENE_CACHE = 4096
NORM_EPS = 1e-8  # torch's cosine_similarity / F.normalize clamp on the norm
# exp(k·cos) lies in [e^-k, e^k]: float32's normal range (e^±87) holds it, and sums of it over a
# history, while the sharpness k stays below this; past it the row maximum is subtracted first.
SAFE_SHARPNESS = 40.0
MATCH_COLUMNS = ("match", "match_codes")  # NumpyInterestMatch's AdTable columns


@dataclass(frozen=True)
class PrerankQuery:
    """One request in raw wire terms: who, where, and the candidate ad ids."""

    ad_ids: np.ndarray
    scene: str
    user: dict[str, Any]
    hist: dict[str, Any]
    context: dict[str, Any]
    k: int = DEFAULT_K
    values: np.ndarray | None = None  # click value per candidate: rank by pCTR x value


@dataclass(frozen=True)
class PrerankResult:
    """The top K candidates best first, their pCTR, and how many ids were unknown."""

    ad_ids: np.ndarray  # int64
    scores: np.ndarray  # float32 pCTR
    unknown: int


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k best scores, best first (ties: lower position first)."""
    if k <= 0 or scores.size == 0:
        return np.empty(0, dtype=np.int64)
    if k < scores.size:
        part = np.argpartition(-scores, k - 1)[:k]
        return part[np.lexsort((part, -scores[part]))]
    return np.argsort(-scores, kind="stable")


def _normalised(rows: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """`scale` x rows over their L2 norm clamped at NORM_EPS: a zero (padding) row stays zero."""
    norms = np.sqrt(np.einsum("ij,ij->i", rows, rows))
    return rows * (np.float32(scale) / np.maximum(norms, np.float32(NORM_EPS)))[:, None]


class NumpyInterestMatch:
    """Σ_f w_f · match_f for one user and N candidates: the DQM's match term, in numpy.

    Same maths as `InterestMatch`: per field, the cosines between the candidate's row and the
    real behaviours' rows, pooled by softmax(k_f · cos). A request normalises its few
    behaviour rows, runs one [N, D] @ [D, L] per field, then the pooling, with three exact
    shortcuts:

    - a behaviour repeated in the history counts once, weighted by its count: the softmax over
      positions equals the count-weighted softmax over distinct rows (categories repeat a lot).
    - a field whose table is small (`CODE_ROWS` rows at most: categories, not ad ids) is
      pooled once per distinct value among the candidates and gathered back: 2,000
      candidates hold a few hundred categories, and the exp over [N, L] is the term's largest
      cost. Such a field is stored as the candidates' codes (one AdTable column, "match_codes"),
      the others as their normalised rows (column "match", fields side by side).
    - no max-subtraction pass: with |k · cos| ≤ k < SAFE_SHARPNESS, exp(k · cos) and the sums
      stay well inside float32's range; a sharper field subtracts the row maximum, as torch
      does.

    The padding row is zero, so its cosine is 0, as torch gives for a position where only
    another field is real (and for a candidate whose category is unknown).
    """

    CODE_ROWS = 4096  # a field's table at most this many rows is pooled per distinct code

    def __init__(self, model: Dqm, embeddings: NumpyEmbeddings) -> None:
        if model.match is None or model.match_weight is None:
            raise ValueError("the DQM has no interest match")
        self.fields = list(model.match_fields)
        self.behaviour_names = list(model.behaviour_names)
        self._tables = [embeddings.tables[embeddings.owner[b]] for _, b in self.fields]
        self.sharpness = model.match.log_sharpness.detach().exp().cpu().numpy().astype(np.float64)
        self.weight = model.match_weight.detach().cpu().numpy().astype(np.float64)
        self.by_code = [t.shape[0] <= self.CODE_ROWS for t in self._tables]
        # each field's place: a column of "match_codes", or a slice of "match"'s row width
        self._place: list[int | slice] = []
        width = codes = 0
        for table, by_code in zip(self._tables, self.by_code, strict=True):
            if by_code:
                self._place.append(codes)
                codes += 1
            else:
                self._place.append(slice(width, width + table.shape[1]))
                width += table.shape[1]
        self._unit = [_normalised(t) if by_code else None
                      for t, by_code in zip(self._tables, self.by_code, strict=True)]

    def columns(self, encoded: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The AdTable columns of n ads' encoded features: "match" [n, width] float32, their
        normalised rows of the large-table fields, and "match_codes" [n, codes] int64, their
        codes of the small-table fields (a column is left out when no field uses it)."""
        rows, codes = [], []
        for (name, _), table, by_code in zip(self.fields, self._tables, self.by_code,
                                             strict=True):
            code = np.asarray(encoded[name], dtype=np.int64).reshape(-1)
            if by_code:
                codes.append(code)
            else:
                rows.append(_normalised(table[code]))
        out = {}
        if rows:
            out["match"] = np.ascontiguousarray(np.concatenate(rows, axis=1), dtype=np.float32)
        if codes:
            out["match_codes"] = np.stack(codes, axis=1)
        return out

    def logits(self, candidates: Mapping[str, np.ndarray],
               hist: Mapping[str, np.ndarray]) -> np.ndarray | None:
        """[N] term for N ads' `columns` and an encoded history ([1, L] per field); None when
        the history is empty (every match is 0)."""
        mask = hist[self.behaviour_names[0]][0] != 0
        for name in self.behaviour_names[1:]:
            mask = mask | (hist[name][0] != 0)
        if not mask.any():
            return None
        n = next(iter(candidates.values())).shape[0]
        out = np.zeros(n, dtype=np.float32)
        for f, ((_, name), table) in enumerate(zip(self.fields, self._tables, strict=True)):
            # distinct behaviours and their counts (Counter: a third of np.unique's time on ≤ 50)
            seen = Counter(hist[name][0][mask].tolist())
            rows = np.fromiter(seen.keys(), dtype=np.int64, count=len(seen))
            counts = np.fromiter(seen.values(), dtype=np.float32, count=len(seen))
            k = self.sharpness[f]
            keys = _normalised(table[rows], k).T
            place = self._place[f]
            if isinstance(place, slice):
                pooled = _pool(candidates["match"][:, place], keys, counts, k)
            else:
                # the distinct codes by a presence mask over the small table: no sort
                code = candidates["match_codes"][:, place]
                present = np.zeros(table.shape[0], dtype=bool)
                present[code] = True
                index = np.cumsum(present, dtype=np.int64) - 1
                distinct = np.flatnonzero(present)
                pooled = _pool(self._unit[f][distinct], keys, counts, k)[index[code]]
            out += np.float32(self.weight[f] / k) * pooled  # w · Σ p·cos = w · Σ p·z / k
        return out


def _pool(candidates: np.ndarray, keys: np.ndarray, counts: np.ndarray, k: float) -> np.ndarray:
    """Σ p·z per candidate row, z = k·cos against the distinct behaviours (`keys`, scaled by
    k) and p their count-weighted softmax."""
    z = candidates @ keys  # k·cos, [N, distinct behaviours]
    shift = None
    if k >= SAFE_SHARPNESS:
        shift = z.max(axis=1, keepdims=True)
        z -= shift
    e = np.empty_like(z)  # torch's vectorised exp: about half numpy's time here
    torch.exp(torch.from_numpy(z), out=torch.from_numpy(e))
    den = e @ counts
    e *= z
    pooled = (e @ counts) / den  # Σ p·z (minus the shift), p the softmax
    if shift is not None:
        pooled += shift[:, 0]
    return pooled


class PreRanker:
    """DQM over a bundle's ad-vector matrix (plus ads added since).

    `ad_features`: the ads' encoded features ([N] per name, the rows of `ad_ids`); a DQM with
    the interest match needs its candidate-side features (all but `ad_id`, which the ids give).
    """

    def __init__(self, model: Dqm, encoder: FeatureEncoder, ad_ids: np.ndarray,
                 vectors: np.ndarray, version: str = "",
                 ad_features: Mapping[str, np.ndarray] | None = None) -> None:
        model.eval()
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != model.vector_dim:
            raise ValueError(f"DQM ad vectors {vectors.shape} do not match the model's "
                             f"vector_dim {model.vector_dim}")
        self.model = model
        self.encoder = encoder
        self.version = version
        self._embeddings = NumpyEmbeddings(model.embeddings)
        columns = {"vector": vectors}
        self._match: NumpyInterestMatch | None = None
        if model.match is not None:
            self._match = NumpyInterestMatch(model, self._embeddings)
            features = dict(ad_features or {})
            features.setdefault("ad_id", encoder.schema["ad_id"].encode(
                np.asarray(ad_ids, dtype=np.int64)))
            missing = [q for q, _ in self._match.fields if q not in features]
            if missing:
                raise ValueError(f"the DQM's interest match needs the ads' {missing}")
            columns.update(self._match.columns(features))
        self.ads = AdTable(ad_ids, columns)
        self._user_tower = NumpyMLP(model.user_tower)
        self._scene_tower = NumpyMLP(model.scene_tower)
        self._bias = bool(model.config.ad_bias)
        self._scene_cache: dict[tuple[int, ...], np.ndarray] = {}
        self._lock = threading.Lock()
        self.unknown_total = 0  # candidate ids dropped because no vector exists

    @classmethod
    def from_bundle(cls, bundle: Bundle, threads: int = 1) -> PreRanker:
        torch.set_num_threads(max(1, int(threads)))
        name = bundle.manifest.get("prerank_model", MODEL)  # e.g. "dqm_rocket" (Rocket-trained)
        with torch.inference_mode():
            model = load_model(bundle, name)
        entry = bundle.model_entry(name)
        arrays = bundle.arrays(entry.get("ad_vectors", ad_vectors_file(name)))
        encoder = FeatureEncoder(bundle.schema)
        features = None
        if model.match is not None:
            features = _catalog_features(bundle, encoder, arrays["ad_ids"])
        return cls(model, encoder, arrays["ad_ids"], arrays["vectors"], bundle.version,
                   ad_features=features)

    # ---- towers ---------------------------------------------------------------------------

    def user_vector(self, user: dict[str, Any], hist: dict[str, Any]) -> np.ndarray:
        """[d] user side (bias slot = 1), same as Dqm.user_vector."""
        return self._user_vector({**self.encoder.user(user), **self.encoder.history(hist)})

    def _user_vector(self, encoded: Mapping[str, np.ndarray]) -> np.ndarray:
        x = user_tower_input(self._embeddings, encoded, self.encoder.user_names,
                             self.encoder.behaviour_names)
        vec = self._user_tower(x)[0]
        return np.append(vec, np.float32(1.0)) if self._bias else vec

    def scene_vector(self, scene: str, context: dict[str, Any]) -> np.ndarray:
        """[d] scene side (bias slot = 0), cached per encoded scene features."""
        encoded = self.encoder.scene(scene, context)
        key = tuple(int(encoded[n][0]) for n in self.encoder.scene_names)
        vec = self._scene_cache.get(key)
        if vec is None:
            x = self._embeddings.group(encoded, self.encoder.scene_names)
            vec = self._scene_tower(x)[0]
            vec = np.append(vec, np.float32(0.0)) if self._bias else vec
            if len(self._scene_cache) >= SCENE_CACHE:
                self._scene_cache = {}
            self._scene_cache[key] = vec
        return vec

    # ---- scoring --------------------------------------------------------------------------

    def prerank(self, query: PrerankQuery) -> PrerankResult:
        """Top K of the known candidates by pCTR; unknown ids are dropped and counted."""
        snapshot = self.ads.snapshot()
        ids = np.asarray(query.ad_ids, dtype=np.int64)
        values = query.values
        if values is not None and len(values) != ids.size:
            raise ValueError(f"values: {len(values)} entries for {ids.size} ad_ids")
        rows, known = self.ads.rows(ids, snapshot)
        unknown = int(ids.size - np.count_nonzero(known))
        if unknown:
            ids, rows = ids[known], rows[known]
            values = values[known] if values is not None else None
            with self._lock:
                self.unknown_total += unknown
        logits = self._score_rows(query, rows, snapshot)
        order_by = logits
        if values is not None:  # log(pCTR x value), monotone in expected eCPM
            order_by = -np.logaddexp(0.0, -logits) + np.log(np.maximum(values, 1e-9))
        best = top_k(order_by, min(int(query.k), logits.size))
        return PrerankResult(ids[best], _sigmoid(logits[best]), unknown)

    def logits(self, query: PrerankQuery) -> tuple[np.ndarray, np.ndarray]:
        """(known ids, their DQM logits) in request order, before any cut: what `prerank`
        ranks, for tests and offline analysis (unknown ids are dropped, not counted)."""
        snapshot = self.ads.snapshot()
        ids = np.asarray(query.ad_ids, dtype=np.int64)
        rows, known = self.ads.rows(ids, snapshot)
        return ids[known], self._score_rows(query, rows[known], snapshot)

    def _score_rows(self, query: PrerankQuery, rows: np.ndarray,
                    snapshot: Snapshot) -> np.ndarray:
        """Logits [n] of the ads at `rows`: ⟨u + s, a⟩ (+ the interest-match term)."""
        hist = self.encoder.history(query.hist)
        q = (self._user_vector({**self.encoder.user(query.user), **hist})
             + self.scene_vector(query.scene, query.context))
        # np.take, not fancy indexing: it copies whole rows, ~3x faster for 2,000 of them
        logits = np.take(snapshot.columns["vector"], rows, axis=0) @ q  # gather + one product
        if self._match is not None:
            match = self._match.logits({name: np.take(snapshot.columns[name], rows, axis=0)
                                        for name in MATCH_COLUMNS if name in snapshot.columns},
                                       hist)
            if match is not None:
                logits += match
        return logits

    # ---- catalog updates ------------------------------------------------------------------

    def ad_vector(self, features: dict[str, Any]) -> np.ndarray:
        """A new ad's vector from its raw features, by the bundle's DQM ad tower."""
        return self._ad_vector(self.encoder.ad(features))

    def _ad_vector(self, encoded: Mapping[str, np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            return self.model.ad_vector(to_tensors(encoded))[0].float().numpy()

    def add_ad(self, ad_id: int, features: dict[str, Any]) -> bool:
        """Give an ad (new or changed) its vector (and match rows); True when it was new."""
        encoded = self.encoder.ad({**features, "ad_id": int(ad_id)})
        values = {"vector": self._ad_vector(encoded)}
        if self._match is not None:
            values.update({name: column[0]
                           for name, column in self._match.columns(encoded).items()})
        return self.ads.upsert(int(ad_id), values)


def _catalog_features(bundle: Bundle, encoder: FeatureEncoder,
                      ad_ids: np.ndarray) -> dict[str, np.ndarray]:
    """The bundle catalog's encoded ad features in the order of `ad_ids` (the ad-vector rows);
    a column the catalog lacks is padding (its match is 0), as the ranker treats it."""
    catalog_ids, features = catalog_ad_features(bundle, encoder)
    rows = IdIndex(catalog_ids).rows(np.asarray(ad_ids, dtype=np.int64))
    if (rows < 0).any():
        raise ValueError(f"{int((rows < 0).sum())} ads with DQM vectors are not in "
                         f"{CATALOG_FILE}")
    return {name: values[rows] for name, values in features.items()}
