"""Registry, JSON configs, safetensors round trip and the baselines' training signals."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.features import load_schema
from models.nn.baselines import BaseModel, CvrBase
from models.nn.config import ConfigError, RankerConfig
from models.nn.registry import MODEL_NAMES, build_model, config_from_dict, default_config
from tests.test_nn_support import random_batch, rows, tiny_schema, with_extra_pads

SMALL = {
    "two_tower": {"hidden": [16], "out_dim": 8},
    "dqm": {"hidden": [16], "out_dim": 8},
    "dqm_rocket": {"hidden": [16], "out_dim": 8},
    "din_esmm": {"attention_hidden": [8], "tower_hidden": [16, 8]},
    "base": {"attention_hidden": [8], "tower_hidden": [16, 8]},
    "cvr_base": {"attention_hidden": [8], "tower_hidden": [16, 8]},
}


def _score(name, model, batch):
    if name == "two_tower":
        return torch.cat([model.user_vector(batch), model.ad_vector(batch)], dim=-1)
    if name in ("dqm", "dqm_rocket"):
        return model(batch)
    return torch.stack(list(model.predict(batch).values()), dim=-1)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_config_round_trips_through_json(name):
    config = config_from_dict(name, SMALL[name])
    again = config_from_dict(name, json.loads(json.dumps(config.to_dict())))
    assert again == config
    full = default_config(name).to_dict()
    assert default_config(name) == config_from_dict(name, full)
    # a key an older manifest lacks means what it meant then (rankers before interest_match)
    older = config_from_dict(name, {})
    assert older == replace(default_config(name), **type(older).absent_means)


def test_a_ranker_bundle_from_before_interest_match_rebuilds_without_it():
    assert RankerConfig().interest_match
    assert not config_from_dict("din_esmm", {"tower_hidden": [8]}).interest_match


def test_bad_configs_are_refused_with_the_field_named():
    with pytest.raises(ConfigError, match="tower_hiden"):
        config_from_dict("din_esmm", {"tower_hiden": [8]})
    with pytest.raises(ConfigError, match="attention_activation"):
        RankerConfig(attention_activation="gelu")
    with pytest.raises(ConfigError, match="unknown model 'din'"):
        build_model("din", tiny_schema())


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_weights_round_trip_through_safetensors(name, tmp_path):
    schema = tiny_schema()
    torch.manual_seed(0)
    model = build_model(name, schema, SMALL[name])
    model.train()
    with torch.no_grad():
        model.training_loss(random_batch(schema, size=16))  # move Dice running statistics
    model.eval()
    path = tmp_path / f"{name}.safetensors"
    save_file(model.state_dict(), str(path))
    torch.manual_seed(1)
    clone = build_model(name, schema, SMALL[name]).eval()
    clone.load_state_dict(load_file(str(path)))
    batch = random_batch(schema, size=8, seed=9)
    assert torch.equal(_score(name, model, batch), _score(name, clone, batch))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_is_padding_invariant_and_batch_independent(name):
    schema = tiny_schema()
    model = build_model(name, schema, SMALL[name])
    model.train()
    with torch.no_grad():
        model.training_loss(random_batch(schema, size=32))
    model.eval()
    batch = random_batch(schema, size=8)
    full = _score(name, model, batch)
    assert torch.allclose(full, _score(name, model, with_extra_pads(batch, 4)), atol=1e-5)
    single = torch.cat([_score(name, model, rows(batch, torch.tensor([i]))) for i in range(8)])
    assert torch.allclose(full, single, atol=1e-5)


def test_production_schema_builds_every_model_with_shared_tables_once():
    schema = load_schema()
    for name in MODEL_NAMES:
        keys = list(build_model(name, schema).state_dict())
        assert sum(k.endswith("tables.ad_id.weight") for k in keys) == 1
        assert not any("hist_ad_id" in k for k in keys)


def test_cvr_base_learns_from_clicked_rows_only():
    schema = tiny_schema()
    model = CvrBase(schema, config_from_dict("cvr_base", SMALL["cvr_base"])).train()
    batch = random_batch(schema, size=16)
    out = model(batch)
    flipped = batch["conversion"].clone()
    flipped[batch["click"] == 0] = 1.0  # labels on unclicked rows carry no information
    a = model.loss(out, batch["click"], batch["conversion"])
    b = model.loss(out, batch["click"], flipped)
    assert torch.allclose(a, b)
    model.zero_grad()
    none_clicked = model.loss(out, torch.zeros(16), torch.zeros(16))
    none_clicked.backward()
    assert none_clicked.item() == 0.0
    assert all(p.grad is None or torch.count_nonzero(p.grad.to_dense()) == 0
               for p in model.parameters())


def test_base_model_ctr_loss_is_plain_bce():
    schema = tiny_schema()
    model = BaseModel(schema, config_from_dict("base", SMALL["base"]))
    batch = random_batch(schema, size=16)
    out = model(batch)
    expected = torch.nn.functional.binary_cross_entropy(out["pctr"], batch["click"])
    assert torch.allclose(model.loss(out, batch["click"]), expected, atol=1e-6)
