"""Rebuild a bundle's network for serving or evaluation: config from the manifest, weights
from safetensors. No training code is imported, so a stage loads models without it."""

from __future__ import annotations

import torch

from models.bundle.bundle import Bundle
from models.nn import build_model


def load_model(bundle: Bundle, name: str, device: torch.device | str = "cpu") -> torch.nn.Module:
    """Rebuild a network from its manifest config and load its safetensors weights."""
    entry = bundle.model_entry(name)
    model = build_model(name, bundle.schema, entry["config"])
    model.load_state_dict(bundle.tensors(entry["file"]))
    return model.to(device).eval()
