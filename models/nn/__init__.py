"""Cascade networks: layers, two-tower recall, DQM pre-ranker, DIN+ESMM ranker, baselines, Qscore.

Every model is built from a `FeatureSchema` and one config dataclass; inputs are
`dict[str, Tensor]` keyed by schema feature names (int64 ids, scalars [B], sequences [B, L]
with 0 = padding, newest first).
"""

from models.nn.attention import ActivationUnit
from models.nn.baselines import BaseModel, CvrBase
from models.nn.config import ConfigError, DqmConfig, JsonConfig, RankerConfig, TwoTowerConfig
from models.nn.din_esmm import DinEsmm, esmm_losses
from models.nn.dqm import Dqm
from models.nn.layers import (
    MLP,
    Dice,
    EmbeddingCollection,
    build_optimizers,
    masked_mean,
    masked_sum,
    split_parameters,
)
from models.nn.qscore import Qscore
from models.nn.registry import (
    MODEL_NAMES,
    build_model,
    config_class,
    config_from_dict,
    default_config,
)
from models.nn.two_tower import TwoTower, estimate_log_q

__all__ = [
    "MLP",
    "MODEL_NAMES",
    "ActivationUnit",
    "BaseModel",
    "ConfigError",
    "CvrBase",
    "Dice",
    "DinEsmm",
    "Dqm",
    "DqmConfig",
    "EmbeddingCollection",
    "JsonConfig",
    "Qscore",
    "RankerConfig",
    "TwoTower",
    "TwoTowerConfig",
    "build_model",
    "build_optimizers",
    "config_class",
    "config_from_dict",
    "default_config",
    "esmm_losses",
    "estimate_log_q",
    "masked_mean",
    "masked_sum",
    "split_parameters",
]
