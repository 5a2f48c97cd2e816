"""Numpy serving copies of the small ReLU towers (DQM user/scene/ad, two-tower user).

Why: one request runs a tower on ONE row. In eager torch that is ~30 tiny ops at 5-10 µs of
dispatch overhead each (~0.3 ms for the DQM user tower, measured), which alone would spend the
pre-ranking budget. The same arithmetic in numpy on a [1, D] row costs a few µs per op. The
weights are the torch module's own tensors viewed as numpy (zero copy), so a bundle is loaded
once; tests check the outputs equal the torch towers to float tolerance.

Only Linear + ReLU (+ Dropout, a no-op in eval) towers are copied; anything else (Dice, PReLU)
raises, so a config change in the networks cannot silently serve different maths.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from torch import nn

from models.nn.layers import MLP, EmbeddingCollection


class NumpyMLP:
    """y = relu(...relu(x W1 + b1)...) Wn + bn, with the module's weights (float32)."""

    def __init__(self, mlp: MLP) -> None:
        self.layers: list[tuple[np.ndarray, np.ndarray, bool]] = []
        modules = [m for m in mlp.net if not isinstance(m, nn.Dropout)]
        for i, module in enumerate(modules):
            if isinstance(module, nn.Linear):
                relu = i + 1 < len(modules) and isinstance(modules[i + 1], nn.ReLU)
                weight = np.ascontiguousarray(module.weight.detach().cpu().numpy().T)
                bias = module.bias.detach().cpu().numpy().copy()
                self.layers.append((weight, bias, relu))
            elif not isinstance(module, nn.ReLU):
                raise TypeError(f"NumpyMLP copies Linear/ReLU towers only, got {module}")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        for weight, bias, relu in self.layers:
            x = x @ weight
            x += bias
            if relu:
                np.maximum(x, 0.0, out=x)
        return x


class NumpyEmbeddings:
    """Row lookups into an EmbeddingCollection's tables (numpy views of the weights)."""

    def __init__(self, embeddings: EmbeddingCollection) -> None:
        self.tables = {name: table.weight.detach().cpu().numpy()
                       for name, table in embeddings.tables.items()}
        self.owner = dict(embeddings.owner)

    def group(self, encoded: Mapping[str, np.ndarray], names: Sequence[str]) -> np.ndarray:
        """Concatenated rows of `names`: [..., sum of dims]."""
        return np.concatenate([self.tables[self.owner[n]][encoded[n]] for n in names], axis=-1)

    def mean_pooled(self, encoded: Mapping[str, np.ndarray], names: Sequence[str]) -> np.ndarray:
        """Masked mean over a [B, L] sequence (a position is real when any field is non-pad),
        zeros for an empty history: the same rule as `layers.masked_mean`."""
        seq = self.group(encoded, names)  # [B, L, D]
        mask = encoded[names[0]] != 0
        for name in names[1:]:
            mask = mask | (encoded[name] != 0)
        count = np.maximum(mask.sum(axis=1, keepdims=True), 1).astype(np.float32)
        return (seq * mask[..., None]).sum(axis=1) / count


def user_tower_input(emb: NumpyEmbeddings, encoded: Mapping[str, np.ndarray],
                     user_names: Sequence[str], behaviour_names: Sequence[str]) -> np.ndarray:
    """[user embeddings | mean-pooled behaviour], the input of both models' user towers."""
    return np.concatenate([emb.group(encoded, user_names),
                           emb.mean_pooled(encoded, behaviour_names)], axis=-1)
