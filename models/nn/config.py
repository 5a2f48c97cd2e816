"""Model configurations: small typed dataclasses that travel as JSON in the bundle manifest.

Why dataclasses and not keyword soup: every module takes at most a schema and one config, so a
reader sees a model's knobs in one place, and the bundle can rebuild exactly the network whose
weights it stores (`to_dict` -> manifest -> `from_dict`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, Self

ACTIVATIONS = ("relu", "prelu", "dice")


class ConfigError(ValueError):
    """A model config that cannot build a network (names the offending field)."""


@dataclass(frozen=True)
class JsonConfig:
    """JSON round-trip shared by every model config (tuples become lists and back)."""

    kind: ClassVar[str] = "config"
    # What a key absent from an older manifest meant when that bundle was written, where it
    # differs from today's default: an old bundle must rebuild exactly the network it stores.
    absent_means: ClassVar[dict[str, Any]] = {}

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.kind}: expected a JSON object, got {type(data).__name__}")
        known = {f.name: f for f in fields(cls)}
        unknown = set(data) - set(known)
        if unknown:
            raise ConfigError(f"{cls.kind}: unknown keys {sorted(unknown)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**(cls.absent_means | values))

    def _check_hidden(self, name: str, hidden: tuple[int, ...], allow_empty: bool = False) -> None:
        if not isinstance(hidden, tuple) or (not hidden and not allow_empty):
            raise ConfigError(f"{self.kind}.{name}: must be a non-empty list of layer sizes")
        if any(not isinstance(h, int) or isinstance(h, bool) or h <= 0 for h in hidden):
            raise ConfigError(f"{self.kind}.{name}: layer sizes must be positive integers")

    def _check_activation(self, name: str, value: str) -> None:
        if value not in ACTIVATIONS:
            raise ConfigError(f"{self.kind}.{name}: must be one of {list(ACTIVATIONS)}")

    def _check_positive(self, name: str, value: float) -> None:
        if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{self.kind}.{name}: must be a positive number")


@dataclass(frozen=True)
class RankerConfig(JsonConfig):
    """DIN+ESMM and both baselines (`base`, `cvr_base`) share it, so they have the same sizes.

    `attention_*` and `interest_match` are ignored by `base` (sum pooling). Sparse embeddings
    are the default because the ad_id table has ~1M rows: a dense gradient would touch every
    row on every step. `interest_match` adds `backbone.InterestMatch`'s features to the tower.
    """

    kind: ClassVar[str] = "ranker"
    absent_means: ClassVar[dict[str, Any]] = {"interest_match": False,  # bundles before them
                                              "cvr_click_weight": 0.0, "ad_offsets": False}
    attention_hidden: tuple[int, ...] = (32, 16)
    attention_activation: str = "dice"
    attention_softmax: bool = False
    interest_match: bool = True
    tower_hidden: tuple[int, ...] = (128, 64)
    tower_activation: str = "dice"
    dropout: float = 0.0
    sparse_embeddings: bool = True
    init_std: float = 0.01
    # DIN+ESMM: weight of the clicked rows' direct CVR loss beside the entire-space one
    # (models.nn.din_esmm.clicked_cvr_loss); 0 is pure ESMM. Ignored by the baselines.
    cvr_click_weight: float = 0.0
    # DIN+ESMM: a per-ad offset on both heads' logits, the ads' counted log-odds weighted by
    # a fit on the validation rows (models.nn.din_esmm.AdOffsets). Ignored by the baselines.
    ad_offsets: bool = True

    def __post_init__(self) -> None:
        self._check_hidden("attention_hidden", self.attention_hidden)
        if not isinstance(self.cvr_click_weight, int | float) or self.cvr_click_weight < 0:
            raise ConfigError(f"{self.kind}.cvr_click_weight: must be a number >= 0")
        self._check_hidden("tower_hidden", self.tower_hidden)
        self._check_activation("attention_activation", self.attention_activation)
        self._check_activation("tower_activation", self.tower_activation)
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError(f"{self.kind}.dropout: must be in [0, 1)")
        self._check_positive("init_std", self.init_std)


@dataclass(frozen=True)
class TwoTowerConfig(JsonConfig):
    """DSSM retrieval: both towers share `hidden`; `temperature` divides the cosine.

    Ranker distillation (used when the trainer has a trained DIN+ESMM): each training row also
    scores `distill_candidates` sampled ads, and a listwise KL pulls the tower's softmax over
    them towards the ranker's (pCTR-normalised) one, weighted by `distill_weight` (0: off).
    """

    kind: ClassVar[str] = "two_tower"
    hidden: tuple[int, ...] = (128, 64)
    out_dim: int = 32
    temperature: float = 0.05
    sparse_embeddings: bool = True
    init_std: float = 0.01
    distill_weight: float = 1.0
    distill_candidates: int = 16

    def __post_init__(self) -> None:
        self._check_hidden("hidden", self.hidden, allow_empty=True)
        self._check_positive("out_dim", self.out_dim)
        self._check_positive("temperature", self.temperature)
        self._check_positive("init_std", self.init_std)
        if not isinstance(self.distill_weight, int | float) or self.distill_weight < 0:
            raise ConfigError(f"{self.kind}.distill_weight: must be a number >= 0")
        self._check_positive("distill_candidates", self.distill_candidates)


@dataclass(frozen=True)
class DqmConfig(JsonConfig):
    """DQM pre-ranker: `out_dim` is the inner-product space; `ad_bias` adds one dimension.

    `interest_match` adds the ranker's interest-match features (`backbone.InterestMatch`), each
    times a learnt weight, to the inner-product logit: the pre-ranker then sees the same
    candidate-vs-history evidence the ranker's tower reads, and keeps more of what it picks.
    """

    kind: ClassVar[str] = "dqm"
    absent_means: ClassVar[dict[str, Any]] = {"interest_match": False}  # bundles before it
    hidden: tuple[int, ...] = (64,)
    out_dim: int = 16
    ad_bias: bool = True
    interest_match: bool = True
    sparse_embeddings: bool = True
    init_std: float = 0.01

    def __post_init__(self) -> None:
        self._check_hidden("hidden", self.hidden, allow_empty=True)
        self._check_positive("out_dim", self.out_dim)
        self._check_positive("init_std", self.init_std)
