"""Ranking backbones: one impression → one dense vector that the prediction towers read.

`DinBackbone` pools the behaviour sequence with target attention (the candidate ad is the
query); `SumPoolBackbone` sums it (the `base` model). Both embed every feature exactly once per
forward, so ESMM's two towers share one lookup instead of re-running the tables per tower.
The vector is [user | pooled behaviour | ad | scene], and DIN's adds the interest match
(`InterestMatch`) when the config asks for it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from models.features.schema import FeatureSchema
from models.nn.attention import ActivationUnit
from models.nn.config import RankerConfig
from models.nn.layers import Batch, EmbeddingCollection, masked_sum


def query_names(schema: FeatureSchema) -> list[str]:
    """The ad features the behaviour fields share tables with, in behaviour order.

    DIN's attention query and the interest match (here and in the DQM pre-ranker) pair each
    behaviour field with the candidate feature whose table it reads, so both sides are rows
    of the same table and their dot products and cosines mean something.
    """
    behaviour = schema.group("behaviour")
    if not behaviour:
        raise ValueError(f"schema '{schema.name}' has no behaviour features to attend over")
    ad_names = set(schema.names("ad"))
    query = []
    for feat in behaviour:
        if feat.shares not in ad_names:
            raise ValueError(
                f"behaviour feature '{feat.name}' must share the table of an ad feature"
            )
        query.append(feat.shares)
    return query


class _RankingInputs(nn.Module):
    """Names and embeddings shared by both backbones."""

    def __init__(self, schema: FeatureSchema, config: RankerConfig) -> None:
        super().__init__()
        self.embeddings = EmbeddingCollection(
            schema, sparse=config.sparse_embeddings, init_std=config.init_std
        )
        self.user_names = schema.names("user")
        self.behaviour_names = schema.names("behaviour")
        self.ad_names = schema.names("ad")
        self.scene_names = schema.names("scene")
        self.all_names = self.user_names + self.ad_names + self.scene_names + self.behaviour_names
        self.behaviour_dim = self.embeddings.dim(self.behaviour_names)
        self.out_dim = (
            self.embeddings.dim(self.user_names)
            + self.behaviour_dim
            + self.embeddings.dim(self.ad_names)
            + self.embeddings.dim(self.scene_names)
        )

    @staticmethod
    def _cat(embs: Mapping[str, torch.Tensor], names: list[str]) -> torch.Tensor:
        return torch.cat([embs[n] for n in names], dim=-1)

    def _assemble(self, embs: Mapping[str, torch.Tensor], pooled: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                self._cat(embs, self.user_names),
                pooled,
                self._cat(embs, self.ad_names),
                self._cat(embs, self.scene_names),
            ],
            dim=-1,
        )


class InterestMatch(nn.Module):
    """Per behaviour field, how well the candidate matches the user's most similar behaviours.

    For each field the candidate shares a table with (ad id, category), the cosine between the
    candidate's row and every behaviour's row is pooled by a softmax with a learnt sharpness
    (high: the best match; low: the mean), one number per field. Why: DIN's activation unit
    hands the tower a weighted SUM of behaviour vectors, from which the tower must recover how
    similar the candidate is to the user's interests, with products it can only approximate;
    a single relevant behaviour inside a long unrelated history is then easily washed out. The
    match itself, as a feature, is what interest-based click models turn on (SIM and ETA feed
    such relevance scores to the tower too). Cosine keeps it in [-1, 1] from the first step. An
    empty history gives 0: no evidence either way. The DQM pre-ranker adds the same numbers,
    weighted, to its inner-product logit (`models.nn.dqm`), so both stages see the match.
    """

    def __init__(self, fields: int, sharpness: float = 5.0) -> None:
        super().__init__()
        self.log_sharpness = nn.Parameter(torch.full((fields,), math.log(sharpness)))

    def _pool(self, field: int, sims: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        logits = sims * self.log_sharpness[field].exp()
        if mask is not None:  # pads: no weight, and no NaN from a pad's zero row
            logits = logits.masked_fill(~mask, float("-inf"))
            sims = sims.masked_fill(~mask, 0.0)
        return (torch.softmax(logits, dim=-1).nan_to_num(0.0) * sims).sum(-1)

    def forward(self, pairs: list[tuple[torch.Tensor, torch.Tensor]],
                mask: torch.Tensor) -> torch.Tensor:
        """[B, fields] from (query [B, D], keys [B, L, D]) per field and mask [B, L]."""
        return torch.stack([
            self._pool(i, F.cosine_similarity(q.unsqueeze(1), k, dim=-1), mask)
            for i, (q, k) in enumerate(pairs)], dim=-1)

    def for_candidates(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Serving: [N, fields] from (candidates [N, D], real behaviours [L, D]) per field."""
        out = []
        for i, (cand, hist) in enumerate(pairs):
            if hist.shape[0] == 0:
                out.append(cand.new_zeros(cand.shape[0]))
                continue
            sims = F.normalize(cand, dim=-1, eps=1e-8) @ F.normalize(hist, dim=-1, eps=1e-8).T
            out.append(self._pool(i, sims, None))
        return torch.stack(out, dim=-1)


class DinBackbone(_RankingInputs):
    """Embeddings + DIN activation unit with the candidate ad as the query."""

    def __init__(self, schema: FeatureSchema, config: RankerConfig) -> None:
        super().__init__(schema, config)
        self.query_names = query_names(schema)
        self.attention = ActivationUnit(
            self.behaviour_dim,
            config.attention_hidden,
            config.attention_activation,
            config.attention_softmax,
        )
        self.match = InterestMatch(len(self.behaviour_names)) if config.interest_match else None
        if self.match is not None:
            self.out_dim += len(self.behaviour_names)

    def _with_match(self, features: torch.Tensor, match: torch.Tensor | None) -> torch.Tensor:
        return features if match is None else torch.cat([features, match], dim=-1)

    def forward(self, batch: Batch) -> torch.Tensor:
        embs = self.embeddings.lookup(batch, self.all_names)
        query = self._cat(embs, self.query_names)
        keys = self._cat(embs, self.behaviour_names)
        mask = self.embeddings.sequence_mask(batch)
        pooled = self.attention(query, keys, mask)
        match = None if self.match is None else self.match(
            [(embs[q], embs[b]) for q, b in zip(self.query_names, self.behaviour_names,
                                                strict=True)], mask)
        return self._with_match(self._assemble(embs, pooled), match)

    def candidate_features(self, user: Batch, candidates: Batch) -> torch.Tensor:
        """Serving: [N, F] for one user (user feats [1], history [1, L]) and N candidates.

        The history is embedded once and attention uses the decomposed first layer. Scene
        features come from `candidates` ([N] or [1]) or, failing that, from `user` ([1]).
        """
        n = candidates[self.ad_names[0]].reshape(-1).shape[0]
        user_rows = {name: _column(user, name, 1) for name in self.user_names}
        hist_rows = {name: user[name].reshape(-1) for name in self.behaviour_names}
        ad_rows = {name: _column(candidates, name, n) for name in self.ad_names}
        # a request-level scene value ([1], the served case) is embedded once, then broadcast
        scene_rows = {
            name: _values(candidates if name in candidates else user, name, n)
            for name in self.scene_names
        }
        embs = self.embeddings.lookup(user_rows, self.user_names)
        embs.update(self.embeddings.lookup(scene_rows, self.scene_names))
        embs = {k: v.expand(n, -1) for k, v in embs.items()}
        embs.update(self.embeddings.lookup(ad_rows, self.ad_names))
        hist_embs = self.embeddings.lookup(hist_rows, self.behaviour_names)
        hist = self._cat(hist_embs, self.behaviour_names)
        mask = self.embeddings.sequence_mask(hist_rows)
        pooled = self.attention.pool_candidates(self._cat(embs, self.query_names), hist, mask)
        match = None if self.match is None else self.match.for_candidates(
            [(embs[q], hist_embs[b][mask]) for q, b in zip(self.query_names,
                                                           self.behaviour_names, strict=True)])
        return self._with_match(self._assemble(embs, pooled), match)


class SumPoolBackbone(_RankingInputs):
    """Embeddings + sum-pooled behaviour: the `base` model's input, same sizes as DIN's."""

    def forward(self, batch: Batch) -> torch.Tensor:
        embs = self.embeddings.lookup(batch, self.all_names)
        keys = self._cat(embs, self.behaviour_names)
        pooled = masked_sum(keys, self.embeddings.sequence_mask(batch))
        return self._assemble(embs, pooled)


def _column(source: Batch, name: str, n: int) -> torch.Tensor:
    """A scalar feature as [n]: a [1] value is broadcast (request-level context)."""
    return _values(source, name, n).expand(n)


def _values(source: Batch, name: str, n: int) -> torch.Tensor:
    """A scalar feature's values as given: [1] (request-level) or [n] (per candidate)."""
    if name not in source:
        raise KeyError(f"missing feature '{name}'")
    values = source[name].reshape(-1)
    if values.shape[0] in (1, n):
        return values
    raise ValueError(f"feature '{name}' has {values.shape[0]} values, expected 1 or {n}")
