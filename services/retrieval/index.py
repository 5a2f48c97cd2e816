"""The faiss index over ad vectors: built once per bundle, its search parameter tuned at build time.

Exact search (`IndexFlatIP`) is cheap enough below ~50k ads and then gives recall 1.0 for free.
Above that an IVF index is trained, and its `nprobe` is chosen HERE, at build time, by measuring
recall@K against exact search on sample queries (user vectors from training when the caller has
them, otherwise ad vectors plus noise). The smallest nprobe reaching the target recall is kept and
recorded (`IndexSpec`, stored in the bundle manifest), so serving never guesses a speed/recall
trade-off and the recall figure the benchmark reports is the one the index was built for.

Ids stored in the index are ad ids (`IndexIDMap2` for flat, `add_with_ids` for IVF), never row
positions, so a faiss file on its own still names ads. Files are written with `faiss.write_index`
(no pickle).

Value-aware retrieval: cosine alone ignores what an ad is worth, so the ranker's best ads by eCPM
often never reach it. With a value weight w > 0 the index scores cos(u, a) + w·(log v_a − mu),
where v_a is the ad's Qscore eCPM estimate (the cold-start file) and mu the catalog's mean log
value (the extra term is centred). The default w is the two-tower temperature: the two-tower
logit is cos/tau, so adding log value to the logit ranks by cos + tau·log v. It stays one inner
product search: ads are indexed as a' = [a/|a|, w·(log v_a − mu)] and queries as u' = [u/|u|, 1]
(`value_augment`, `augment_queries`); w, mu and the floor that stands in for v <= 0 are recorded
in the IndexSpec (so in manifest["index"]), and serving (`Recall`) augments user vectors and
newly added ads the same way. w = 0 disables it (plain unit vectors, as before).

OpenMP: set OMP_WAIT_POLICY=PASSIVE before faiss (or torch) first loads its OpenMP runtime, or
idle OpenMP workers spin and steal the CPU from the other request threads. We `setdefault` it
here, which only helps when this module is the first to import faiss; `cascade serve` sets it too.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import faiss  # noqa: E402
import numpy as np  # noqa: E402

log = logging.getLogger(__name__)

EXACT_BELOW = 50_000
TARGET_RECALL = 0.95
RECALL_K = 2000
INDEX_FILE = "faiss.index"


@dataclass(frozen=True)
class IndexSpec:
    """How the index was built and the recall it measured; recorded in the bundle manifest."""

    kind: str  # "flat" (exact) or "ivf"
    nlist: int  # IVF lists (0 for flat)
    nprobe: int  # lists searched per query (0 for flat)
    recall_at_k: float  # measured against exact search on the sample queries
    k: int  # the K that recall was measured at
    n: int  # ads in the index when built
    dim: int  # of the indexed vectors: the ad-tower dim, +1 when value-aware
    value_weight: float = 0.0  # w of the value term; 0: plain cosine retrieval
    value_mu: float = 0.0  # mean log eCPM over the catalog (centres the value term)
    value_floor: float = 0.0  # eCPM used for an ad whose estimate is <= 0 (catalog minimum)

    @property
    def value(self) -> ValueTerm | None:
        """The value term the index was built with, None for a plain cosine index."""
        if self.value_weight <= 0:
            return None
        return ValueTerm(self.value_weight, self.value_mu, self.value_floor)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IndexSpec:
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class ValueTerm:
    """The extra ad component w·(log v − mu) of a value-aware index."""

    weight: float
    mu: float
    floor: float  # smallest positive eCPM of the catalog: stands in for estimates <= 0

    def column(self, ecpm: np.ndarray | float) -> np.ndarray:
        """w·(log max(v, floor) − mu) per ad, float32 [N]."""
        v = np.atleast_1d(np.asarray(ecpm, dtype=np.float64))
        v = np.where(np.isfinite(v) & (v > 0), v, self.floor)
        return (self.weight * (np.log(np.maximum(v, self.floor)) - self.mu)).astype(np.float32)

    def augment(self, vectors: np.ndarray, ecpm: np.ndarray | float) -> np.ndarray:
        """[a/|a|, column(v)]: ad vectors as a value-aware index holds them."""
        unit = normalize(np.atleast_2d(vectors))
        return np.ascontiguousarray(np.hstack([unit, self.column(ecpm)[:, None]]),
                                    dtype=np.float32)


def value_augment(vectors: np.ndarray, ecpm: np.ndarray, weight: float, *,
                  mu: float | None = None, floor: float | None = None,
                  ) -> tuple[np.ndarray, ValueTerm]:
    """Value-aware ad vectors [a/|a|, w·(log v − mu)] and the term used (mu: the mean log
    value over these ads unless given, so the term is centred; floor: their smallest positive
    value unless given, used for estimates <= 0). Row-aligned `ecpm` [N]."""
    ecpm = np.asarray(ecpm, dtype=np.float64).reshape(-1)
    if ecpm.shape[0] != np.atleast_2d(vectors).shape[0]:
        raise ValueError(f"{ecpm.shape[0]} eCPM values for {np.atleast_2d(vectors).shape[0]} ads")
    if weight <= 0:
        raise ValueError("value weight must be > 0 (0 means a plain cosine index)")
    if floor is None:
        positive = ecpm[np.isfinite(ecpm) & (ecpm > 0)]
        if positive.size == 0:
            raise ValueError("no ad has a positive eCPM estimate: cannot weight by value")
        floor = float(positive.min())
    partial = ValueTerm(float(weight), 0.0, float(floor))
    if mu is None:
        mu = float(np.mean(partial.column(ecpm).astype(np.float64) / weight))
    term = ValueTerm(float(weight), float(mu), float(floor))
    return term.augment(vectors, ecpm), term


def augment_queries(queries: np.ndarray) -> np.ndarray:
    """[u/|u|, 1]: user vectors as a value-aware index is searched with."""
    unit = normalize(np.atleast_2d(queries))
    return np.ascontiguousarray(np.hstack([unit, np.ones((unit.shape[0], 1), np.float32)]),
                                dtype=np.float32)


def normalize(vectors: np.ndarray) -> np.ndarray:
    """L2-normalise rows (float32, contiguous), so inner product is cosine similarity."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.ascontiguousarray(vectors / np.maximum(norms, 1e-12), dtype=np.float32)


def set_threads(threads: int) -> None:
    """OpenMP threads faiss uses per search call (1 by default: one request, one core)."""
    faiss.omp_set_num_threads(max(1, int(threads)))


def _check(vectors: np.ndarray, ad_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    ad_ids = np.ascontiguousarray(ad_ids, dtype=np.int64)
    if vectors.ndim != 2 or vectors.shape[0] != ad_ids.shape[0]:
        raise ValueError(f"ad vectors {vectors.shape} and ad ids {ad_ids.shape} do not match")
    if vectors.shape[0] == 0:
        raise ValueError("cannot build an index over zero ads")
    if np.unique(ad_ids).size != ad_ids.size:
        raise ValueError("ad ids are not unique")
    if (ad_ids < 0).any():
        raise ValueError("ad ids must be >= 0 (faiss uses -1 as padding)")
    return vectors, ad_ids


def nlist_for(n: int) -> int:
    """~4·sqrt(N) lists, but never fewer than ~39 training points per list (k-means quality)."""
    return max(1, min(int(round(4 * math.sqrt(n))), n // 39))


def _exact_topk(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    _, rows = flat.search(queries, k)
    return rows


def sample_queries(vectors: np.ndarray, n: int = 200, noise: float = 0.3,
                   seed: int = 0) -> np.ndarray:
    """Stand-in queries when no user vectors are given: random ads, perturbed, re-normalised."""
    rng = np.random.default_rng(seed)
    rows = rng.choice(vectors.shape[0], size=min(n, vectors.shape[0]), replace=False)
    picked = vectors[rows] + noise * rng.standard_normal((rows.size, vectors.shape[1])) / math.sqrt(
        vectors.shape[1])
    return normalize(picked)


def measure_recall(index: faiss.Index, exact_ids: np.ndarray, queries: np.ndarray, k: int,
                   nprobe: int | None = None) -> float:
    """Mean |approx ∩ exact| / |exact| over the queries (exact_ids: ad ids of exact top-k)."""
    params = faiss.SearchParametersIVF(nprobe=nprobe) if nprobe else None
    _, found = index.search(queries, k, params=params)
    hits = 0
    total = 0
    for got, want in zip(found, exact_ids, strict=True):
        want = want[want >= 0]
        hits += np.intersect1d(got[got >= 0], want, assume_unique=True).size
        total += want.size
    return hits / max(total, 1)


def build_index(vectors: np.ndarray, ad_ids: np.ndarray, *, exact_below: int = EXACT_BELOW,
                queries: np.ndarray | None = None, k: int = RECALL_K,
                target_recall: float = TARGET_RECALL, seed: int = 0, normalize: bool = True,
                ) -> tuple[faiss.Index, IndexSpec]:
    """Build the ad index and tune its search parameter.

    `normalize`: L2-normalise the vectors and the queries here (cosine); False indexes them
    as given (value-augmented vectors: the caller passes matching augmented queries).
    `queries`: sample query vectors for the recall measurement (training user vectors are best,
    as they are what serving will search with); None -> ad vectors plus noise.
    """
    vectors, ad_ids = _check(vectors, ad_ids)
    unit = _normalize if normalize else _as_is
    vectors = unit(vectors)
    n, dim = vectors.shape
    k = max(1, min(k, n))
    if n < exact_below:
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        index.add_with_ids(vectors, ad_ids)
        return index, IndexSpec("flat", 0, 0, 1.0, k, n, dim)

    nlist = nlist_for(n)
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(seed)
    train_rows = rng.choice(n, size=min(n, 256 * nlist), replace=False)
    index.train(vectors[np.sort(train_rows)])
    index.add_with_ids(vectors, ad_ids)

    queries = sample_queries(vectors, seed=seed) if queries is None else unit(queries)
    exact = ad_ids[_exact_topk(vectors, queries, k)]
    nprobe, recall = _tune_nprobe(index, exact, queries, k, nlist, target_recall)
    index.nprobe = nprobe
    return index, IndexSpec("ivf", nlist, nprobe, round(recall, 4), k, n, dim)


_normalize = normalize  # `build_index`'s flag shadows the function


def _as_is(vectors: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(vectors, dtype=np.float32)


def build_value_index(vectors: np.ndarray, ad_ids: np.ndarray, *, ecpm: np.ndarray | None = None,
                      value_weight: float = 0.0, value_mu: float | None = None,
                      value_floor: float | None = None, queries: np.ndarray | None = None,
                      **options: Any) -> tuple[faiss.Index, IndexSpec]:
    """`build_index` over plain ad-tower vectors, value-aware when `value_weight` > 0.

    `ecpm`: row-aligned eCPM estimates (required with a weight); `queries`: plain user vectors
    (augmented here); mu and the floor are computed from `ecpm` unless given (a rebuild of a
    recorded index passes the recorded ones). The spec records w, mu and the floor.
    """
    if value_weight <= 0:
        return build_index(vectors, ad_ids, queries=queries, **options)
    if ecpm is None:
        raise ValueError("a value-aware index needs the ads' eCPM estimates")
    augmented, term = value_augment(vectors, ecpm, value_weight, mu=value_mu, floor=value_floor)
    plain = normalize(vectors)
    if queries is None:
        queries = sample_queries(plain, seed=options.get("seed", 0))
    index, spec = build_index(augmented, ad_ids, queries=augment_queries(queries),
                              normalize=False, **options)
    return index, replace(spec, value_weight=term.weight, value_mu=term.mu,
                          value_floor=term.floor)


def _tune_nprobe(index: faiss.Index, exact: np.ndarray, queries: np.ndarray, k: int, nlist: int,
                 target: float) -> tuple[int, float]:
    """Smallest nprobe with recall >= target: doubling to bracket it, then bisection."""
    low, high = 0, 1
    measured: dict[int, float] = {}
    while True:
        measured[high] = measure_recall(index, exact, queries, k, high)
        if measured[high] >= target or high >= nlist:
            break
        low, high = high, min(nlist, high * 2)
    while high - low > 1:
        mid = (low + high) // 2
        measured[mid] = measure_recall(index, exact, queries, k, mid)
        if measured[mid] >= target:
            high = mid
        else:
            low = mid
    return high, measured[high]


def save_index(index: faiss.Index, path: str | Path) -> None:
    faiss.write_index(index, str(path))


def load_index(path: str | Path, spec: IndexSpec | None = None) -> faiss.Index:
    """Read a faiss file; the manifest's nprobe (when given) wins over what the file holds.

    Read into memory, not memory-mapped: faiss's IO_FLAG_MMAP inverted lists cost ~2 ms more
    per search (measured: 2.5 ms against 0.6 ms for top-2000 of 1M). Worker processes share
    the loaded index anyway, forked from the process that read it (services.common.prefork)."""
    index = faiss.read_index(str(path))
    if spec is not None and spec.kind == "ivf":
        faiss.extract_index_ivf(index).nprobe = spec.nprobe
    return index


def index_nprobe(index: faiss.Index) -> tuple[int, int]:
    """(nlist, nprobe) of an IVF index, (0, 0) for exact."""
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        return 0, 0
    return int(ivf.nlist), int(ivf.nprobe)


def build_index_file(out_dir: str | Path, vectors: np.ndarray, ad_ids: np.ndarray,
                     **options: Any) -> IndexSpec:
    """Bundle helper: build, write `faiss.index` into `out_dir`, return the manifest spec.

    Options are `build_value_index`'s: `ecpm=` and `value_weight=` make it value-aware."""
    index, spec = build_value_index(vectors, ad_ids, **options)
    save_index(index, Path(out_dir) / INDEX_FILE)
    return spec


DEFAULT_TEMPERATURE = 0.05  # TwoTowerConfig's default, for manifests that do not record one


def two_tower_temperature(manifest: dict[str, Any]) -> float:
    """The two-tower's tau from a bundle manifest: the default value weight."""
    config = manifest.get("models", {}).get("two_tower", {}).get("config", {})
    return float(config.get("temperature", DEFAULT_TEMPERATURE))


def add_bundle_index(writer: Any, info: dict[str, Any], *, value_weight: float | None = None,
                     **options: Any) -> dict[str, Any] | None:
    """Training-time step shared by `cascade train` and the test fixture: build the faiss index
    over the two-tower's ad vectors into the staged bundle and record manifest["index"].

    `info`: what `models.train.trainer.train` returned. `value_weight`: None -> the two-tower
    temperature; 0 -> plain cosine. Value-aware needs "cold_ecpm" (the qscore model); without
    it the index is plain and manifest["index"]["value_weight"] says 0. The bundle's
    `two_tower_ad_vectors.safetensors` keep the plain vectors either way.
    """
    if "two_tower" not in info.get("vectors", {}):
        return None
    if value_weight is None:
        value_weight = two_tower_temperature(writer.manifest)
    ecpm = info.get("cold_ecpm")
    if ecpm is None and value_weight > 0:
        log.warning("no Qscore eCPM estimates (train qscore too): the index is cosine only")
        value_weight = 0.0
    spec = build_index_file(writer.staging, info["vectors"]["two_tower"], info["ad_ids"],
                            ecpm=ecpm, value_weight=float(value_weight),
                            queries=info.get("user_queries"), **options)
    writer.manifest["index"] = {"file": INDEX_FILE, **spec.to_dict()}
    return writer.manifest["index"]
