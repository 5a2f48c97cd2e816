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

OpenMP: set OMP_WAIT_POLICY=PASSIVE before faiss (or torch) first loads its OpenMP runtime, or
idle OpenMP workers spin and steal the CPU from the other request threads. We `setdefault` it
here, which only helps when this module is the first to import faiss; `cascade serve` sets it too.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import faiss  # noqa: E402
import numpy as np  # noqa: E402

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
    dim: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IndexSpec:
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in names})


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
                target_recall: float = TARGET_RECALL, seed: int = 0,
                ) -> tuple[faiss.Index, IndexSpec]:
    """Build the ad index (vectors are normalised here) and tune its search parameter.

    `queries`: sample query vectors for the recall measurement (training user vectors are best,
    as they are what serving will search with); None -> ad vectors plus noise.
    """
    vectors, ad_ids = _check(vectors, ad_ids)
    vectors = normalize(vectors)
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

    queries = sample_queries(vectors, seed=seed) if queries is None else normalize(queries)
    exact = ad_ids[_exact_topk(vectors, queries, k)]
    nprobe, recall = _tune_nprobe(index, exact, queries, k, nlist, target_recall)
    index.nprobe = nprobe
    return index, IndexSpec("ivf", nlist, nprobe, round(recall, 4), k, n, dim)


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
    """Read a faiss file; the manifest's nprobe (when given) wins over what the file holds."""
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
    """Bundle helper: build, write `faiss.index` into `out_dir`, return the manifest spec."""
    index, spec = build_index(vectors, ad_ids, **options)
    save_index(index, Path(out_dir) / INDEX_FILE)
    return spec
