"""The simulated marketplace: catalog, users and the hidden ground truth behind clicks.

Separate from the log generator (simulator.py) because the catalog is built once, while the
request stream is produced chunk by chunk; tests also rebuild the marketplace alone to check
the logs against the truth (e.g. the users' initial histories).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from models.data.sim_config import SimConfig
from models.pricing import click_value

GENDERS = ("female", "male", "unknown")
DEVICES = ("ios", "android", "web")
PAD = -1  # raw padding in behaviour sequences


@dataclass
class Marketplace:
    """Catalog tables (what gets written) and hidden truth (what only the oracle sees)."""

    scenes: tuple[str, ...]
    ads: dict[str, np.ndarray]  # AD_COLUMNS, except 'scenes'/'creative_id' kept as arrow arrays
    ad_scenes: pa.Array  # list<string> per ad
    ad_creative: pa.Array  # string per ad
    campaigns: dict[str, np.ndarray]
    users: dict[str, np.ndarray]
    category_sim: np.ndarray  # [leaf, leaf] float32 cosine of latent vectors
    ad_appeal: np.ndarray  # float32 click appeal
    # The per-ad part of the appeal that no advertiser or campaign shares, and its prior
    # standard deviation: what no model can learn from an ad's few impressions.
    ad_appeal_private: np.ndarray  # float32
    appeal_private_std: float
    ad_quality: np.ndarray  # float32 conversion quality
    ad_price_z: np.ndarray  # float32 standardised log price
    scene_ad_cum: np.ndarray  # [scene, ad] cumulative logging-policy weights (0 if ineligible)
    category_ads: np.ndarray  # active ad ids sorted by leaf category
    category_offsets: np.ndarray  # [leaf+1] offsets into category_ads
    user_interest_cat: np.ndarray  # [user, K] leaf ids of the interest mixture
    user_interest_cum: np.ndarray  # [user, K] cumulative mixture weights
    user_activity_cum: np.ndarray  # cumulative request weights over users
    user_intent: np.ndarray  # float32 purchase intent (conversion only)
    user_device: np.ndarray  # int8 index into DEVICES
    initial_history: np.ndarray  # [user, seq_len] int32 ad ids, newest first, -1 padded

    @property
    def n_ads(self) -> int:
        return int(self.ads["ad_id"].shape[0])

    @property
    def n_users(self) -> int:
        return int(self.users["user_id"].shape[0])


def _lognormal(rng: np.random.Generator, median: float, sigma: float, n: int) -> np.ndarray:
    return median * np.exp(sigma * rng.standard_normal(n))


def _cover(rng: np.random.Generator, n_parents: int, n_children: int,
           p: np.ndarray | None = None) -> np.ndarray:
    """Assign children to parents so that every parent has at least one child."""
    extra = rng.choice(n_parents, size=n_children - n_parents, p=p)
    return rng.permutation(np.concatenate([np.arange(n_parents), extra]))


def _categories(cfg: SimConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two-level tree: leaf latents sit near their parent's, so siblings look alike."""
    m = cfg.market
    parent = np.sort(_cover(rng, m.n_top_categories, m.n_leaf_categories))
    top = rng.standard_normal((m.n_top_categories, m.latent_dim))
    top /= np.linalg.norm(top, axis=1, keepdims=True)
    noise = rng.standard_normal((m.n_leaf_categories, m.latent_dim)) / np.sqrt(m.latent_dim)
    leaf = top[parent] + m.leaf_spread * noise
    leaf /= np.linalg.norm(leaf, axis=1, keepdims=True)
    return parent, (leaf @ leaf.T).astype(np.float32)


def _catalog(cfg: SimConfig, rng: np.random.Generator, parent: np.ndarray) -> dict:
    m = cfg.market
    zipf = 1.0 / np.arange(1, m.n_advertisers + 1) ** 0.8
    camp_adv = _cover(rng, m.n_advertisers, m.n_campaigns, zipf / zipf.sum())
    camp_leaf = rng.integers(0, m.n_leaf_categories, m.n_campaigns)
    camp_ocpa = rng.random(m.n_campaigns) < m.ocpa_share
    budget = _lognormal(rng, m.daily_budget_micros, 0.7, m.n_campaigns).astype(np.int64)
    campaigns = {
        "campaign_id": np.arange(m.n_campaigns, dtype=np.int64),
        "advertiser_id": camp_adv.astype(np.int64),
        "daily_budget_micros": np.maximum(budget, 1_000_000),
        "status": np.full(m.n_campaigns, "active", dtype=object),
    }
    n = m.n_ads
    camp = _cover(rng, m.n_campaigns, n)
    adv = camp_adv[camp]
    own_leaf = rng.random(n) < m.campaign_category_share
    leaf = np.where(own_leaf, camp_leaf[camp], rng.integers(0, m.n_leaf_categories, n))
    brand_base = rng.integers(0, m.n_brands, m.n_advertisers)
    brand = (brand_base[adv] + rng.integers(0, 3, n)) % m.n_brands
    level = _lognormal(rng, m.price_micros, 0.8, m.n_leaf_categories)
    price = np.maximum(level[leaf] * np.exp(0.5 * rng.standard_normal(n)), 10_000).astype(np.int64)
    rank = np.empty(n, dtype=np.int64)
    rank[np.argsort(price, kind="stable")] = np.arange(n)
    ocpa = camp_ocpa[camp]
    bid = np.where(ocpa, 0, _lognormal(rng, m.cpc_bid_micros, 0.5, n)).astype(np.int64)
    tcpa = np.where(ocpa, _lognormal(rng, m.target_cpa_micros, 0.5, n), 0).astype(np.int64)
    paused = rng.random(n) < m.paused_share
    return {
        "campaigns": campaigns,
        "ads": {
            "ad_id": np.arange(n, dtype=np.int64),
            "campaign_id": camp.astype(np.int64),
            "advertiser_id": adv.astype(np.int64),
            "category_id": leaf.astype(np.int64),
            "category_l1": parent[leaf].astype(np.int64),
            "brand_id": brand.astype(np.int64),
            "price_micros": price,
            "price_bucket": (rank * 10 // n).astype(np.int64),
            "bid_type": np.where(ocpa, "ocpa", "cpc").astype(object),
            "bid_micros": np.where(ocpa, 0, np.maximum(bid, 10_000)),
            "target_cpa_micros": np.where(ocpa, np.maximum(tcpa, 100_000), 0),
            "status": np.where(paused, "paused", "active").astype(object),
        },
    }


def _ad_scenes(cfg: SimConfig, rng: np.random.Generator, n: int) -> np.ndarray:
    """[ad, scene] targeting mask: most ads everywhere, the rest a random non-empty subset."""
    n_scenes = len(cfg.scenes)
    mask = rng.random((n, n_scenes)) < 0.5
    mask[np.arange(n), rng.integers(0, n_scenes, n)] = True
    mask[rng.random(n) < cfg.market.all_scenes_share] = True
    return mask


def _users(cfg: SimConfig, rng: np.random.Generator) -> dict:
    u, m = cfg.users, cfg.market
    n = u.n_users
    age = rng.choice(8, n, p=np.array([4, 14, 20, 18, 15, 12, 10, 7]) / 100)
    tier = rng.choice(5, n, p=[0.15, 0.25, 0.25, 0.2, 0.15])
    k = rng.integers(1, u.max_interests + 1, n)
    cats = rng.integers(0, m.n_leaf_categories, (n, u.max_interests))
    weights = rng.gamma(u.interest_concentration, 1.0, (n, u.max_interests))
    weights *= np.arange(u.max_interests)[None, :] < k[:, None]
    cum = np.cumsum(weights / weights.sum(axis=1, keepdims=True), axis=1)
    cum[:, -1] = 1.0
    activity = np.exp(u.activity_sigma * rng.standard_normal(n))
    # purchase intent: big-city (low tier) and older users buy more once they click
    intent = cfg.conversion.intent_weight * (
        (2.0 - tier) / 2.0 + 0.5 * (age - 3.5) / 3.5 + 0.5 * rng.standard_normal(n))
    lg = cfg.log
    device = rng.choice(3, n, p=[lg.ios_share, lg.android_share,
                                 1.0 - lg.ios_share - lg.android_share])
    return {
        "table": {
            "user_id": np.arange(n, dtype=np.int64),
            "age_bucket": age.astype(np.int64),
            "gender": np.asarray(GENDERS, dtype=object)[rng.choice(3, n, p=[0.48, 0.45, 0.07])],
            "city_tier": tier.astype(np.int64),
        },
        "interest_cat": cats.astype(np.int32),
        "interest_cum": cum,
        "activity_cum": np.cumsum(activity) / activity.sum(),
        "intent": intent.astype(np.float32),
        "device": device.astype(np.int8),
    }


def sample_interest_ads(market: Marketplace, users: np.ndarray, rng: np.random.Generator,
                        off_interest: float = 0.0) -> np.ndarray:
    """One ad per entry of `users`: a category from the user's mixture, then an active ad of
    it. Returns -1 where the category has no active ad (callers fall back to another pick)."""
    n_leaf = market.category_offsets.shape[0] - 1
    comp = (rng.random(users.shape[0])[:, None] > market.user_interest_cum[users]).sum(axis=1)
    comp = np.minimum(comp, market.user_interest_cat.shape[1] - 1)
    cat = market.user_interest_cat[users, comp].astype(np.int64)
    off = rng.random(users.shape[0]) < off_interest
    cat[off] = rng.integers(0, n_leaf, int(off.sum()))
    lo, hi = market.category_offsets[cat], market.category_offsets[cat + 1]
    size = hi - lo
    pick = lo + np.floor(rng.random(users.shape[0]) * np.maximum(size, 1)).astype(np.int64)
    pick = np.minimum(pick, market.category_ads.shape[0] - 1)
    return np.where(size > 0, market.category_ads[pick], -1)


def _shared_normal(rng: np.random.Generator, *groups: tuple[np.ndarray, float]
                   ) -> tuple[np.ndarray, np.ndarray, float]:
    """Standard normal per ad whose variance is split between groups (an effect per group id,
    e.g. per advertiser) and a per-ad residual taking the remaining share.

    Returns (value, residual, residual std); the residual is already inside the value."""
    n = groups[0][0].shape[0]
    out = np.zeros(n)
    rest = 1.0
    for ids, share in groups:
        effect = rng.standard_normal(int(ids.max()) + 1)
        out += np.sqrt(share) * effect[ids]
        rest -= share
    std = float(np.sqrt(rest)) if rest > 1e-12 else 0.0
    residual = std * rng.standard_normal(n)
    return out + residual, residual, std


def build_marketplace(cfg: SimConfig, seed: int, sequence_len: int = 50) -> Marketplace:
    """Deterministic marketplace for (config, seed); the log generator adds the requests."""
    rng_cat, rng_ads, rng_users, rng_hist = (
        np.random.default_rng(s) for s in np.random.SeedSequence([seed, 0]).spawn(4))
    parent, sim = _categories(cfg, rng_cat)
    cat = _catalog(cfg, rng_ads, parent)
    ads = cat["ads"]
    n = ads["ad_id"].shape[0]
    scenes = tuple(cfg.scenes)
    mask = _ad_scenes(cfg, rng_ads, n)
    flat = np.nonzero(mask)[1]
    offsets = np.concatenate([[0], np.cumsum(mask.sum(axis=1))]).astype(np.int32)
    ad_scenes = pa.ListArray.from_arrays(pa.array(offsets),
                                         pa.array(scenes).take(pa.array(flat)))
    variant = rng_ads.integers(0, 4, n)
    ad_creative = pc.binary_join_element_wise(
        "cr", pc.cast(pa.array(ads["ad_id"]), pa.string()),
        pc.cast(pa.array(variant), pa.string()), "-")
    c, v, p = cfg.click, cfg.conversion, cfg.policy
    adv, camp = ads["advertiser_id"], ads["campaign_id"]
    appeal, private, private_std = _shared_normal(
        rng_ads, (adv, c.appeal_advertiser_share), (camp, c.appeal_campaign_share))
    appeal, private = c.appeal_std * appeal, c.appeal_std * private
    own_quality = _shared_normal(rng_ads, (adv, v.quality_advertiser_share))[0]
    quality = v.quality_std * (v.quality_appeal_corr * appeal / max(c.appeal_std, 1e-9)
                               + np.sqrt(1 - v.quality_appeal_corr ** 2) * own_quality)
    log_price = np.log(ads["price_micros"].astype(np.float64))
    price_z = (log_price - log_price.mean()) / max(log_price.std(), 1e-9)
    popularity = np.exp(p.popularity_sigma * rng_ads.standard_normal(n))
    value = click_value(ads["bid_type"] == "ocpa", ads["bid_micros"], ads["target_cpa_micros"])
    weight = popularity ** p.popularity_power * (value / np.median(value)) ** p.bid_power
    active = ads["status"] == "active"
    scene_w = weight[None, :] * (mask.T & active[None, :])
    scene_cum = np.cumsum(scene_w, axis=1)
    scene_cum /= np.maximum(scene_cum[:, -1:], 1e-300)
    active_ids = np.flatnonzero(active)
    order = np.argsort(ads["category_id"][active_ids], kind="stable")
    category_ads = active_ids[order]
    cat_offsets = np.searchsorted(ads["category_id"][category_ads],
                                  np.arange(cfg.market.n_leaf_categories + 1))
    users = _users(cfg, rng_users)
    market = Marketplace(
        scenes=scenes, ads=ads, ad_scenes=ad_scenes, ad_creative=ad_creative,
        campaigns=cat["campaigns"], users=users["table"], category_sim=sim,
        ad_appeal=appeal.astype(np.float32), ad_quality=quality.astype(np.float32),
        ad_appeal_private=private.astype(np.float32),
        appeal_private_std=c.appeal_std * private_std,
        ad_price_z=price_z.astype(np.float32), scene_ad_cum=scene_cum,
        category_ads=category_ads, category_offsets=cat_offsets,
        user_interest_cat=users["interest_cat"], user_interest_cum=users["interest_cum"],
        user_activity_cum=users["activity_cum"], user_intent=users["intent"],
        user_device=users["device"],
        initial_history=np.empty((0, sequence_len), dtype=np.int32))
    market.initial_history = _initial_history(cfg, market, rng_hist, sequence_len)
    return market


def _initial_history(cfg: SimConfig, market: Marketplace, rng: np.random.Generator,
                     sequence_len: int) -> np.ndarray:
    """Past clicks drawn from each user's interests, so history is informative at once."""
    u = cfg.users
    n = market.n_users
    lengths = rng.integers(u.initial_history_min, u.initial_history_max + 1, n)
    owner = np.repeat(np.arange(n), lengths)
    ads = sample_interest_ads(market, owner, rng, off_interest=u.off_interest_share)
    missing = ads < 0
    if missing.any():
        ads[missing] = market.category_ads[rng.integers(0, market.category_ads.shape[0],
                                                        int(missing.sum()))]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    col = np.arange(owner.shape[0]) - starts[owner]
    history = np.full((n, sequence_len), PAD, dtype=np.int32)
    history[owner, col] = ads
    return history
