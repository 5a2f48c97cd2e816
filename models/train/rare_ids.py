"""Frequency-thresholded ids: rare ids share one out-of-vocabulary row per table.

An id seen a handful of times in training has an embedding row that can only memorise those
impressions, which is how CTR models overfit from their second pass on. Below `min_count`
training occurrences, an id's rows are mapped to one shared row of its table (the table's
first rare row), which learns what a rare ad, campaign or brand looks like on average.

Serving is unchanged: after training, every rare (and never seen) row of a table is
overwritten with the shared row's vector, so the schema's own encoding of a rare id already
reads the out-of-vocabulary embedding, and the bundle needs no extra mapping.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from models.data.dataset import EncodedLog
from models.features import FeatureSchema
from models.nn import EmbeddingCollection


@dataclass
class RareIds:
    """Per table owner: a row lookup (rare rows -> the shared row) and the rare rows."""

    lookup: dict[str, np.ndarray]
    rare: dict[str, np.ndarray]
    owner_of: dict[str, str]
    min_count: int

    @classmethod
    def fit(cls, schema: FeatureSchema, log: EncodedLog, train_idx: np.ndarray,
            min_count: int) -> RareIds:
        """Count each id table's rows over the training rows' own (non-sequence) features."""
        lookup: dict[str, np.ndarray] = {}
        rare: dict[str, np.ndarray] = {}
        owner_of = {f.name: schema.table_owner(f.name).name for f in schema.features}
        if min_count > 1:
            for owner in schema.tables():
                if owner.kind != "id" or owner.name not in log.features:
                    continue
                counts = np.bincount(log.features[owner.name][train_idx], minlength=owner.rows)
                rows = np.flatnonzero(counts[1:] < min_count) + 1  # row 0 is padding
                if rows.shape[0] < 2:
                    continue
                table = np.arange(owner.rows, dtype=np.int64)
                table[rows] = rows[0]
                lookup[owner.name], rare[owner.name] = table, rows
        return cls(lookup, rare, owner_of, min_count)

    def summary(self) -> dict[str, int]:
        return {owner: int(rows.shape[0]) for owner, rows in self.rare.items()}

    def apply(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Map the batch's id features (sequences too) through their table's lookup."""
        for name, values in batch.items():
            owner = self.owner_of.get(name)
            if owner in self.lookup:
                batch[name] = self.lookup[owner][values]
        return batch

    @torch.no_grad()
    def export(self, model: torch.nn.Module) -> None:
        """Copy each table's shared row into all its rare rows (serving reads them as is)."""
        for module in model.modules():
            if not isinstance(module, EmbeddingCollection):
                continue
            for owner, rows in self.rare.items():
                if owner in module.tables:
                    weight = module.tables[owner].weight
                    index = torch.from_numpy(rows).to(weight.device)
                    weight[index] = weight[int(rows[0])].clone()


class RareIdSource:
    """A batch source that reads rare ids as their table's shared row."""

    def __init__(self, source, rare: RareIds):
        self.source, self.rare = source, rare

    def batch(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        return self.rare.apply(self.source.batch(idx))
