"""Every knob of the marketplace simulator, as typed dataclasses with three preset scales.

The presets exist so tests (`tiny`), the demo (`small`) and benchmarks (`large`) share one
generator and differ only in numbers. A JSON/YAML file may override any field; validation
rejects nonsense with one line naming the field, because a silently clamped config would
produce data whose rates nobody asked for.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from models.features.schema import FeatureSchema, load_schema

SCALES = ("tiny", "small", "large")


class SimConfigError(ValueError):
    """A simulator config that cannot describe a marketplace (one line naming the field)."""


@dataclass
class SceneConfig:
    """One placement: how many slots it shows and how likely its users click and buy."""

    slots: int = 4
    share: float = 0.33  # share of requests (normalised over scenes)
    ctr_base: float = -3.6  # click-logit intercept of the scene
    cvr_base: float = -2.9  # conversion-logit intercept of the scene


def default_scenes() -> dict[str, SceneConfig]:
    # Feeds show many slots to browsing users; search and product pages carry intent.
    return {
        "home_feed": SceneConfig(slots=6, share=0.5, ctr_base=-4.65, cvr_base=-4.6),
        "search": SceneConfig(slots=4, share=0.3, ctr_base=-4.0, cvr_base=-4.1),
        "product_detail": SceneConfig(slots=3, share=0.2, ctr_base=-4.3, cvr_base=-3.85),
    }


@dataclass
class MarketConfig:
    """The catalog: advertisers, campaigns, ads and the two-level category tree."""

    n_advertisers: int = 300
    n_campaigns: int = 800
    n_ads: int = 5_000
    n_brands: int = 900
    n_top_categories: int = 20
    n_leaf_categories: int = 300
    latent_dim: int = 16
    leaf_spread: float = 0.6  # leaf latent = parent + spread * noise: siblings stay similar
    campaign_category_share: float = 0.8  # ads of a campaign mostly sell one leaf category
    ocpa_share: float = 0.3
    all_scenes_share: float = 0.85  # the rest target a random subset of scenes
    paused_share: float = 0.03
    cpc_bid_micros: int = 400_000  # median CPC bid
    target_cpa_micros: int = 15_000_000  # median oCPA target
    daily_budget_micros: int = 200_000_000  # median campaign budget
    price_micros: int = 30_000_000  # median item price


@dataclass
class UserConfig:
    """Users: a profile and a mixture of interests over leaf categories."""

    n_users: int = 3_000
    max_interests: int = 4  # mixture components per user (1..max)
    interest_concentration: float = 1.0  # Dirichlet alpha over a user's components
    initial_history_min: int = 5
    initial_history_max: int = 40
    off_interest_share: float = 0.15  # share of initial history outside the mixture
    activity_sigma: float = 1.0  # log-normal spread of requests per user


@dataclass
class ClickConfig:
    """Hidden click model: logit = scene + position + appeal + alpha*activation + profile."""

    position_decay: float = 0.18  # logit lost per slot (strictly decreasing effect)
    appeal_std: float = 0.5
    # Appeal is shared the way real ads share it: an advertiser's products and a campaign's
    # creatives are alike, and only the rest is the single ad's own. Models can learn the
    # shared parts from their ids; the per-ad residual stays the oracle's private knowledge.
    appeal_advertiser_share: float = 0.5  # share of appeal variance set by the advertiser
    appeal_campaign_share: float = 0.35  # ... by the campaign; the rest is per ad
    activation_weight: float = 2.6  # alpha on local activation (what DIN can learn)
    activation_temperature: float = 0.1  # low: attend to the most relevant few behaviours
    activation_center: float = 0.35  # subtracted so activation helps and hurts
    profile_weight: float = 0.35  # age x price-bucket interaction


@dataclass
class ConversionConfig:
    """Hidden conversion model, only after a click; overlaps the click drivers partly."""

    activation_weight: float = 0.9
    price_weight: float = 1.4  # expensive items convert less
    intent_weight: float = 0.6  # purchase intent from city tier and age
    quality_std: float = 0.6
    quality_appeal_corr: float = 0.2  # ad cvr quality correlates weakly with click appeal
    quality_advertiser_share: float = 0.6  # share of the independent part set by the advertiser


@dataclass
class PolicyConfig:
    """The logging policy: random with popularity/bid bias, plus interest-driven picks."""

    interest_share: float = 0.35  # slots filled from the user's interest mixture
    popularity_sigma: float = 1.0  # log-normal spread of ad popularity
    popularity_power: float = 0.7
    bid_power: float = 0.5


@dataclass
class LogConfig:
    """The request stream: how many, over how long, in what chunks."""

    n_requests: int = 22_000
    days: int = 3
    start_ts: int = 1_704_067_200_000  # 2024-01-01T00:00:00Z in ms
    chunk_requests: int = 25_000  # one chunk = one parquet part; bounds memory
    oracle_max_rows: int = 4_000_000  # above this the oracle is computed on a user sample
    ios_share: float = 0.45
    android_share: float = 0.4  # the rest is web


@dataclass
class SimConfig:
    """The whole simulator configuration."""

    scale: str = "tiny"
    market: MarketConfig = field(default_factory=MarketConfig)
    users: UserConfig = field(default_factory=UserConfig)
    scenes: dict[str, SceneConfig] = field(default_factory=default_scenes)
    click: ClickConfig = field(default_factory=ClickConfig)
    conversion: ConversionConfig = field(default_factory=ConversionConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self, schema: FeatureSchema | None = None) -> SimConfig:
        """Raise SimConfigError naming the first nonsensical field; return self."""
        _validate(self, schema or load_schema())
        return self


_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {},
    "small": {
        "market": {"n_advertisers": 4_000, "n_campaigns": 15_000, "n_ads": 100_000,
                   "n_brands": 12_000},
        "users": {"n_users": 50_000},
        "log": {"n_requests": 450_000, "days": 7, "chunk_requests": 150_000},
    },
    "large": {
        "market": {"n_advertisers": 40_000, "n_campaigns": 150_000, "n_ads": 1_000_000,
                   "n_brands": 16_000},
        "users": {"n_users": 500_000},
        "log": {"n_requests": 4_500_000, "days": 14, "chunk_requests": 300_000},
    },
}


def preset(scale: str) -> SimConfig:
    """The built-in configuration of a scale."""
    if scale not in SCALES:
        raise SimConfigError(f"scale must be one of {', '.join(SCALES)} (got {scale!r})")
    cfg = SimConfig(scale=scale)
    _apply(cfg, _PRESETS[scale], "")
    return cfg


def load_config(scale: str, path: str | Path | None = None,
                schema: FeatureSchema | None = None) -> SimConfig:
    """The preset of `scale`, overridden by the JSON or YAML file at `path`, validated."""
    cfg = preset(scale)
    if path is not None:
        cfg = apply_overrides(cfg, read_config_file(path))
    return cfg.validate(schema)


def read_config_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise SimConfigError(f"config file not found: {p}")
    text = p.read_text()
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SimConfigError(f"config file {p} is not valid {p.suffix[1:] or 'YAML'}: {first}")\
            from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SimConfigError(f"config file {p} must hold a mapping at the top level")
    return data


def apply_overrides(cfg: SimConfig, overrides: dict[str, Any]) -> SimConfig:
    """Return a copy of `cfg` with `overrides` (nested dict) applied; unknown keys refused."""
    out = dataclasses.replace(cfg)
    for name in ("market", "users", "click", "conversion", "policy", "log"):
        setattr(out, name, dataclasses.replace(getattr(cfg, name)))
    out.scenes = {k: dataclasses.replace(v) for k, v in cfg.scenes.items()}
    _apply(out, overrides, "")
    return out


def _apply(obj: Any, overrides: dict[str, Any], prefix: str) -> None:
    if not isinstance(overrides, dict):
        raise SimConfigError(f"config: {prefix.rstrip('.') or 'top level'} must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in overrides.items():
        path = f"{prefix}{key}"
        if key not in fields:
            raise SimConfigError(f"config: unknown key {path}")
        current = getattr(obj, key)
        if key == "scenes":
            _apply_scenes(obj, value, path)
        elif dataclasses.is_dataclass(current):
            _apply(current, value, path + ".")
        else:
            setattr(obj, key, _coerce(path, current, value))


def _apply_scenes(cfg: SimConfig, value: Any, path: str) -> None:
    if not isinstance(value, dict) or not value:
        raise SimConfigError(f"config: {path} must be a non-empty mapping of scene name to fields")
    for name, spec in value.items():
        scene = cfg.scenes.setdefault(str(name), SceneConfig())
        _apply(scene, spec or {}, f"{path}.{name}.")


def _coerce(path: str, current: Any, value: Any) -> Any:
    """Accept ints for floats, refuse strings for numbers and the like."""
    if isinstance(current, bool) or isinstance(value, bool):
        raise SimConfigError(f"config: {path} must be a number (got {value!r})")
    if isinstance(current, int):
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise SimConfigError(f"config: {path} must be an integer (got {value!r})")
    if isinstance(current, float):
        if isinstance(value, int | float):
            return float(value)
        raise SimConfigError(f"config: {path} must be a number (got {value!r})")
    if isinstance(current, str):
        if isinstance(value, str):
            return value
        raise SimConfigError(f"config: {path} must be a string (got {value!r})")
    return value


def _at_least(path: str, value: float, low: float) -> None:
    if value < low:
        raise SimConfigError(f"config: {path} must be >= {low} (got {value})")


def _at_most(path: str, value: float, high: float) -> None:
    if value > high:
        raise SimConfigError(f"config: {path} must be <= {high} (got {value})")


def _probability(path: str, value: float, closed: bool = False) -> None:
    ok = 0.0 <= value <= 1.0 if closed else 0.0 < value < 1.0
    if not ok:
        span = "[0, 1]" if closed else "(0, 1)"
        raise SimConfigError(f"config: {path} must be a probability in {span} (got {value})")


def _validate(cfg: SimConfig, schema: FeatureSchema) -> None:
    if cfg.scale not in SCALES:
        raise SimConfigError(
            f"config: scale must be one of {', '.join(SCALES)} (got {cfg.scale!r})")
    m, u, c, v, p, lg = cfg.market, cfg.users, cfg.click, cfg.conversion, cfg.policy, cfg.log
    for name in ("n_advertisers", "n_campaigns", "n_ads", "n_brands", "n_top_categories",
                 "n_leaf_categories", "latent_dim"):
        _at_least(f"market.{name}", getattr(m, name), 1)
    _at_least("market.n_campaigns", m.n_campaigns, m.n_advertisers)
    _at_least("market.n_ads", m.n_ads, m.n_campaigns)
    _at_least("market.n_leaf_categories", m.n_leaf_categories, m.n_top_categories)
    for name, table in (("n_ads", "ad_id"), ("n_campaigns", "campaign_id"),
                        ("n_advertisers", "advertiser_id"), ("n_brands", "brand_id"),
                        ("n_leaf_categories", "category_id")):
        if table in schema and schema[table].buckets:
            # ids must stay below the table's rows or the schema folds two into one embedding
            _at_most(f"market.{name}", getattr(m, name), schema[table].buckets - 1)
    _at_least("market.leaf_spread", m.leaf_spread, 0.0)
    for name in ("campaign_category_share", "ocpa_share", "all_scenes_share", "paused_share"):
        _probability(f"market.{name}", getattr(m, name), closed=True)
    _at_most("market.paused_share", m.paused_share, 0.5)
    for name in ("cpc_bid_micros", "target_cpa_micros", "daily_budget_micros", "price_micros"):
        _at_least(f"market.{name}", getattr(m, name), 1)
    _at_least("users.n_users", u.n_users, 1)
    _at_least("users.max_interests", u.max_interests, 1)
    if u.interest_concentration <= 0:
        raise SimConfigError(
            f"config: users.interest_concentration must be > 0 (got {u.interest_concentration})")
    _at_least("users.initial_history_min", u.initial_history_min, 0)
    _at_least("users.initial_history_max", u.initial_history_max, u.initial_history_min)
    _at_most("users.initial_history_max", u.initial_history_max, schema.sequence_len)
    _probability("users.off_interest_share", u.off_interest_share, closed=True)
    _at_least("users.activity_sigma", u.activity_sigma, 0.0)
    scene_vocab = schema["scene"].values if "scene" in schema else ()
    positions = schema["position"].size if "position" in schema else 8
    for name, s in cfg.scenes.items():
        if name not in scene_vocab:
            raise SimConfigError(
                f"config: unknown scene {name!r} (the schema knows {', '.join(scene_vocab)})")
        _at_least(f"scenes.{name}.slots", s.slots, 1)
        _at_most(f"scenes.{name}.slots", s.slots, positions)
        if not 0.0 < s.share <= 1.0:
            raise SimConfigError(f"config: scenes.{name}.share must be in (0, 1] (got {s.share})")
    _at_least("click.position_decay", c.position_decay, 1e-6)  # strictly falling with slot
    _at_least("click.appeal_std", c.appeal_std, 0.0)
    _probability("click.appeal_advertiser_share", c.appeal_advertiser_share, closed=True)
    _probability("click.appeal_campaign_share", c.appeal_campaign_share, closed=True)
    if c.appeal_advertiser_share + c.appeal_campaign_share > 1.0:
        raise SimConfigError("config: click.appeal_advertiser_share + appeal_campaign_share "
                             "must be <= 1")
    _at_least("click.activation_weight", c.activation_weight, 0.0)
    if c.activation_temperature <= 0:
        raise SimConfigError(
            f"config: click.activation_temperature must be > 0 (got {c.activation_temperature})")
    _at_least("conversion.quality_std", v.quality_std, 0.0)
    _probability("conversion.quality_appeal_corr", v.quality_appeal_corr, closed=True)
    _probability("conversion.quality_advertiser_share", v.quality_advertiser_share, closed=True)
    _probability("policy.interest_share", p.interest_share, closed=True)
    _at_least("policy.popularity_sigma", p.popularity_sigma, 0.0)
    _at_least("log.n_requests", lg.n_requests, 1)
    _at_least("log.days", lg.days, 1)
    _at_least("log.start_ts", lg.start_ts, 0)
    _at_least("log.chunk_requests", lg.chunk_requests, 1)
    _at_least("log.oracle_max_rows", lg.oracle_max_rows, 1000)
    _probability("log.ios_share", lg.ios_share, closed=True)
    _probability("log.android_share", lg.android_share, closed=True)
    _at_most("log.android_share", lg.android_share, 1.0 - lg.ios_share)
    span_ms = lg.days * 86_400_000
    if lg.n_requests > span_ms:
        raise SimConfigError(f"config: log.n_requests must be <= {span_ms} for {lg.days} days "
                             "(timestamps are distinct milliseconds)")
