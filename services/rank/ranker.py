"""DIN + ESMM ranking: pCTR, pCVR and pCTCVR for a few hundred candidates of one user.

Per request the behaviour sequence is embedded once and the activation unit's first layer is
decomposed (`DinEsmm.score_candidates`), so only the q·k term is computed per (candidate,
behaviour) pair. Candidate ad features come from the bundle's catalog, encoded ONCE at load
into int64 columns behind an ad_id -> row table (a request gathers rows, it never re-encodes
the catalog), or from the request's own `ad_features` / a catalog update for ads newer than
the bundle. Ids that have neither are dropped and counted.

Devices: on CPU, torch.inference_mode with a fixed small number of intra-op threads (set once
at load; one request = one core). On CUDA, autocast (bf16 by default) and `score_many`, which
scores several requests' candidates in ONE batched forward with a per-candidate user index:
per-request kernels would leave an H100 idle between launches.
"""

from __future__ import annotations

import threading
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from models.bundle import Bundle, load_model
from models.nn.din_esmm import DinEsmm
from services.common.ad_table import AdTable
from services.common.features import FeatureEncoder, catalog_ad_features, to_tensors

MODEL = "din_esmm"
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


@dataclass(frozen=True)
class RankQuery:
    """One request in raw wire terms; `ad_features` columns are aligned with `ad_ids`."""

    ad_ids: np.ndarray
    scene: str
    user: dict[str, Any]
    hist: dict[str, Any]
    context: dict[str, Any]
    ad_features: dict[str, Any] | None = None


@dataclass(frozen=True)
class Prepared:
    """A request encoded for the network (CPU tensors), before any model work."""

    ad_ids: np.ndarray  # the candidates that will be scored (unknown ones removed)
    user: dict[str, torch.Tensor]  # user [1], scene [1], history [1, L]
    candidates: dict[str, torch.Tensor]  # ad features [N]
    unknown: int


@dataclass(frozen=True)
class RankScores:
    """Scores aligned with `ad_ids` (request order, unknown ids removed)."""

    ad_ids: np.ndarray
    pctr: np.ndarray
    pcvr: np.ndarray
    pctcvr: np.ndarray
    unknown: int = 0


def resolve_device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Ranker:
    """DIN+ESMM over the bundle's encoded catalog (plus ads added since)."""

    def __init__(self, model: DinEsmm, encoder: FeatureEncoder, ad_ids: np.ndarray,
                 ad_features: dict[str, np.ndarray], *, version: str = "",
                 device: str | None = None, amp: str = "bf16") -> None:
        if amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of {sorted(AMP_DTYPES)}, got {amp!r}")
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.encoder = encoder
        self.version = version
        self.amp_dtype = AMP_DTYPES[amp] if self.device.type == "cuda" else None
        self.ads = AdTable(ad_ids, {n: ad_features[n] for n in encoder.ad_names})
        self._lock = threading.Lock()
        self.unknown_total = 0

    @classmethod
    def from_bundle(cls, bundle: Bundle, *, device: str | None = None, threads: int = 1,
                    amp: str = "bf16") -> Ranker:
        torch.set_num_threads(max(1, int(threads)))
        encoder = FeatureEncoder(bundle.schema)
        ad_ids, features = catalog_ad_features(bundle, encoder)
        with torch.inference_mode():
            model = load_model(bundle, MODEL)
        return cls(model, encoder, ad_ids, features, version=bundle.version, device=device,
                   amp=amp)

    # ---- encoding -------------------------------------------------------------------------

    def prepare(self, query: RankQuery) -> Prepared:
        """Encode the user once and gather the candidates' catalog rows."""
        ids = np.asarray(query.ad_ids, dtype=np.int64)
        snapshot = self.ads.snapshot()
        rows, known = self.ads.rows(ids, snapshot)
        feats = {n: snapshot.columns[n][rows] for n in self.encoder.ad_names}
        if query.ad_features:
            given = self.encoder.ads(query.ad_features, ids.size)
            for name in query.ad_features:
                if name in given:
                    feats[name] = given[name]
            known = np.ones(ids.size, dtype=bool)  # the request describes every candidate
        feats["ad_id"] = self.encoder.schema["ad_id"].encode(ids)
        unknown = int(ids.size - np.count_nonzero(known))
        if unknown:
            ids = ids[known]
            feats = {n: v[known] for n, v in feats.items()}
            with self._lock:
                self.unknown_total += unknown
        user = {**self.encoder.user(query.user), **self.encoder.history(query.hist),
                **self.encoder.scene(query.scene, query.context)}
        return Prepared(ids, to_tensors(user), to_tensors(feats), unknown)

    # ---- scoring --------------------------------------------------------------------------

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def score(self, prepared: Prepared) -> RankScores:
        """One user: the decomposed serving path (`DinEsmm.score_candidates`)."""
        if prepared.ad_ids.size == 0:
            empty = np.empty(0, dtype=np.float32)
            return RankScores(prepared.ad_ids, empty, empty, empty, prepared.unknown)
        with torch.inference_mode(), self._autocast():
            user = _to(prepared.user, self.device)
            cand = _to(prepared.candidates, self.device)
            pctr, pcvr, pctcvr = self.model.score_candidates(user, cand)
        return _scores(prepared, pctr, pcvr, pctcvr)

    def score_many(self, batch: list[Prepared]) -> list[RankScores]:
        """Several requests in one call: on CUDA one batched forward over all candidates
        (each row carries its user's features, indexed per candidate); on CPU one decomposed
        pass per request, which is the cheaper arithmetic there."""
        if self.device.type != "cuda" or len(batch) == 1:
            return [self.score(p) for p in batch]
        live = [p for p in batch if p.ad_ids.size]
        if not live:
            return [self.score(p) for p in batch]
        with torch.inference_mode(), self._autocast():
            out = self.model(_to(expanded_batch(live), self.device))
            parts = [torch.split(out[k].float(), [p.ad_ids.size for p in live])
                     for k in ("pctr", "pcvr", "pctcvr")]
        results: dict[int, RankScores] = {}
        for i, p in enumerate(live):
            results[id(p)] = _scores(p, parts[0][i], parts[1][i], parts[2][i])
        return [results[id(p)] if id(p) in results else self.score(p) for p in batch]

    def rank(self, query: RankQuery) -> RankScores:
        return self.score(self.prepare(query))

    # ---- catalog updates ------------------------------------------------------------------

    def add_ad(self, ad_id: int, features: dict[str, Any]) -> bool:
        """Store a new (or changed) ad's encoded features; True when it was new."""
        encoded = self.encoder.ad({**features, "ad_id": int(ad_id)})
        return self.ads.upsert(int(ad_id), {n: v[0] for n, v in encoded.items()})


def expanded_batch(batch: list[Prepared]) -> dict[str, torch.Tensor]:
    """The undecomposed network's input for several requests: one row per candidate, with
    its user's features and history gathered by a per-candidate user index (histories are
    right-padded with 0 to the longest)."""
    sizes = torch.tensor([p.ad_ids.size for p in batch])
    user_index = torch.repeat_interleave(torch.arange(len(batch)), sizes)
    out: dict[str, torch.Tensor] = {}
    for name in batch[0].candidates:
        out[name] = torch.cat([p.candidates[name] for p in batch])
    for name, first in batch[0].user.items():
        if first.dim() == 2:  # history [1, L]
            width = max(p.user[name].shape[1] for p in batch)
            rows = torch.zeros(len(batch), width, dtype=first.dtype)
            for i, p in enumerate(batch):
                rows[i, :p.user[name].shape[1]] = p.user[name][0]
        else:
            rows = torch.cat([p.user[name].reshape(1) for p in batch])
        out[name] = rows[user_index]
    return out


def _to(tensors: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    if device.type == "cpu":
        return tensors
    return {k: v.to(device, non_blocking=True) for k, v in tensors.items()}


def _scores(p: Prepared, pctr: torch.Tensor, pcvr: torch.Tensor,
            pctcvr: torch.Tensor) -> RankScores:
    def host(t: torch.Tensor) -> np.ndarray:
        return t.detach().float().cpu().numpy().astype(np.float32, copy=False)

    return RankScores(p.ad_ids, host(pctr), host(pcvr), host(pctcvr), p.unknown)
