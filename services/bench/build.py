"""Build a benchmark bundle for a scale: real shapes, brief (or no) training.

Latency does not depend on model quality, but it does depend on every shape: the number of
ads in the index and the vector width, the ad-vector matrix, the embedding tables, the
history length. So the bundle holds a synthetic catalog of the scale's size (ids, campaigns,
categories, brands drawn like a marketplace's), ad vectors computed by the real ad towers over
that catalog, and the faiss index built and tuned by `services.retrieval.index` exactly as
`cascade train` does. The networks are trained briefly on a small simulated marketplace
(`small`, `large`) or left at their initialisation (`tiny`, which must build in seconds).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from models.bundle import BundleWriter, read_bundle
from models.features import FeatureSchema, load_schema
from models.nn import build_model, default_config
from models.train.evaluate import load_model
from models.train.trainer import CATALOG_FILE, ad_vectors_file, weights_file
from services.retrieval.index import INDEX_FILE, build_index_file

SCENES = ("home_feed", "search", "product_detail")
MODELS = ("two_tower", "dqm", "din_esmm")


@dataclass(frozen=True)
class Scale:
    """What a benchmark scale means."""

    ads: int
    train: bool  # briefly train on a simulated tiny marketplace (else random init)
    exact_below: int  # exact faiss index below this many ads
    requests: int  # measured requests per stage


SCALES = {
    "tiny": Scale(ads=5_000, train=False, exact_below=1_000, requests=100),
    "small": Scale(ads=100_000, train=True, exact_below=50_000, requests=300),
    "large": Scale(ads=1_000_000, train=True, exact_below=50_000, requests=300),
}


def synthetic_catalog(n: int, seed: int = 0) -> dict[str, np.ndarray | list]:
    """An ads table in the dataset contract's columns; every ad active and in every scene, so
    retrieval's recall is measured against exact search over the same corpus."""
    rng = np.random.default_rng(seed)
    n_campaigns = max(10, n // 4)
    campaign = rng.integers(0, n_campaigns, n)
    advertiser = campaign % max(5, n_campaigns // 3)
    category = (rng.zipf(1.3, n) - 1) % 300
    bid_type = np.where(rng.random(n) < 0.3, "ocpa", "cpc")
    return {
        "ad_id": np.arange(n, dtype=np.int64),
        "campaign_id": campaign.astype(np.int64),
        "advertiser_id": advertiser.astype(np.int64),
        "category_id": category.astype(np.int64),
        "category_l1": (category // 20).astype(np.int64),
        "brand_id": rng.integers(0, 16_000, n).astype(np.int64),
        "price_bucket": rng.integers(0, 10, n).astype(np.int64),
        "bid_type": bid_type,
        "bid_micros": np.where(bid_type == "cpc", rng.integers(100_000, 3_000_000, n), 0),
        "target_cpa_micros": np.where(bid_type == "ocpa", rng.integers(2_000_000, 40_000_000,
                                                                       n), 0),
        "scenes": [list(SCENES)] * n,
        "status": np.full(n, "active"),
    }


def _trained_models(schema: FeatureSchema, work: Path,
                    say: Callable[[str], None]) -> dict[str, torch.nn.Module]:
    """Two-tower, DQM and DIN+ESMM trained briefly on a simulated tiny marketplace."""
    from models.data.sim_config import preset
    from models.data.simulator import simulate
    from models.train.loop import FitConfig
    from models.train.trainer import TrainOptions, train

    data = work / "sim"
    say("bench: simulating a tiny marketplace to train on")
    simulate(preset("tiny"), 7, data)
    say("bench: training briefly (two_tower, dqm, din_esmm)")
    options = TrainOptions(models=MODELS, device="cpu",
                           fit=FitConfig(epochs=1, max_train_rows=8192))
    writer, _ = train(data, work / "trained", options)
    bundle = read_bundle(writer.commit())
    return {name: load_model(bundle, name) for name in MODELS}


def _ad_vectors(model: torch.nn.Module, encoded: dict[str, np.ndarray],
                block: int = 65_536) -> np.ndarray:
    n = next(iter(encoded.values())).shape[0]
    parts = []
    with torch.inference_mode():
        for start in range(0, n, block):
            batch = {k: torch.from_numpy(v[start:start + block]) for k, v in encoded.items()}
            parts.append(model.ad_vector(batch).float().numpy())
    return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)


def build_bench_bundle(scale: str, out_root: Path, *, seed: int = 0,
                       say: Callable[[str], None] = print) -> Path:
    """Write a bundle for `scale` under `out_root`; returns its version directory."""
    if scale not in SCALES:
        raise ValueError(f"--scale: unknown scale '{scale}' (choose from {sorted(SCALES)})")
    spec = SCALES[scale]
    schema = load_schema()
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory(prefix="cascade-bench-") as tmp:
        if spec.train:
            models = _trained_models(schema, Path(tmp), say)
        else:
            models = {n: build_model(n, schema, default_config(n)).eval() for n in MODELS}
        say(f"bench: synthetic catalog of {spec.ads:,} ads, ad vectors from the ad towers")
        catalog = synthetic_catalog(spec.ads, seed)
        encoded = {f.name: f.encode(catalog[f.name]) for f in schema.group("ad")}
        # Tune the index on held-out queries drawn like the ones the bench then serves (its
        # requests use another seed): tuned on another distribution (the training users'), the
        # index met its recall target there and missed it on the bench's own queries.
        queries = _serving_queries(models["two_tower"], schema, catalog["ad_id"], seed)
        writer = BundleWriter(out_root, schema)
        try:
            for name, model in models.items():
                writer.save_tensors(weights_file(name), model.state_dict())
                entry = {"file": weights_file(name), "config": model.config.to_dict()}
                if name in ("two_tower", "dqm"):
                    vectors = _ad_vectors(model, encoded)
                    writer.save_arrays(ad_vectors_file(name),
                                       {"vectors": vectors, "ad_ids": catalog["ad_id"]})
                    entry["ad_vectors"] = ad_vectors_file(name)
                    if name == "two_tower":
                        say("bench: building and tuning the faiss index")
                        index_spec = build_index_file(writer.staging, vectors, catalog["ad_id"],
                                                      queries=queries,
                                                      exact_below=spec.exact_below)
                        writer.manifest["index"] = {"file": INDEX_FILE, **index_spec.to_dict()}
                    del vectors
                writer.add_model(name, entry)
            import pyarrow.parquet as pq

            pq.write_table(pa.table(catalog), writer.path(CATALOG_FILE))
            return writer.commit(bench={"scale": scale, "ads": spec.ads,
                                        "trained": spec.train})
        except BaseException:
            writer.abort()
            raise


def _serving_queries(model: torch.nn.Module, schema: FeatureSchema, ad_ids: np.ndarray,
                     seed: int, n: int = 256) -> np.ndarray:
    """User vectors of `n` bench-style requests, from a seed the bench's requests never use."""
    from services.bench.stages import make_inputs
    from services.common.features import FeatureEncoder
    from services.retrieval.user_encoder import TwoTowerUserEncoder

    tower = TwoTowerUserEncoder(model, FeatureEncoder(schema))  # the served user tower
    inputs = make_inputs(np.asarray(ad_ids, np.int64), n, schema.sequence_len, seed=seed + 101)
    return np.stack([tower.encode(u, h)
                     for u, h in zip(inputs.users, inputs.hists, strict=True)])
