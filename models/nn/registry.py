"""Model registry: a name and a JSON config rebuild the exact network a bundle's weights fit.

Weights are `model.state_dict()` saved with safetensors; every table exists once in the state
dict (towers never hold a second reference to an embedding collection), so no aliasing issue.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from models.features.schema import FeatureSchema
from models.nn.baselines import BaseModel, CvrBase
from models.nn.config import ConfigError, DqmConfig, JsonConfig, RankerConfig, TwoTowerConfig
from models.nn.din_esmm import DinEsmm
from models.nn.dqm import Dqm
from models.nn.two_tower import TwoTower

_MODELS: dict[str, tuple[type[nn.Module], type[JsonConfig]]] = {
    "two_tower": (TwoTower, TwoTowerConfig),
    "dqm": (Dqm, DqmConfig),
    # the same network trained jointly with DIN+ESMM (Rocket); `dqm` stays the plain baseline
    "dqm_rocket": (Dqm, DqmConfig),
    "din_esmm": (DinEsmm, RankerConfig),
    "base": (BaseModel, RankerConfig),
    "cvr_base": (CvrBase, RankerConfig),
}
MODEL_NAMES = tuple(_MODELS)


def _entry(name: str) -> tuple[type[nn.Module], type[JsonConfig]]:
    try:
        return _MODELS[name]
    except KeyError:
        raise ConfigError(f"unknown model '{name}' (expected one of {list(MODEL_NAMES)})") from None


def config_class(name: str) -> type[JsonConfig]:
    return _entry(name)[1]


def default_config(name: str) -> JsonConfig:
    return config_class(name)()


def config_from_dict(name: str, data: dict[str, Any]) -> JsonConfig:
    """Parse the manifest's JSON config for model `name` (unknown keys are refused)."""
    return config_class(name).from_dict(data)


def build_model(
    name: str, schema: FeatureSchema, config: JsonConfig | dict[str, Any] | None = None
) -> nn.Module:
    """Build model `name` from the schema and a config (dataclass, JSON dict or default)."""
    model_cls, config_cls = _entry(name)
    if config is None:
        config = config_cls()
    elif isinstance(config, dict):
        config = config_cls.from_dict(config)
    elif not isinstance(config, config_cls):
        raise ConfigError(f"model '{name}' takes a {config_cls.__name__}, "
                          f"got {type(config).__name__}")
    return model_cls(schema, config)
