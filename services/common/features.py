"""Raw wire features -> encoded int64 arrays/tensors, through the bundle's feature schema.

Every serving stage (the retrieval user tower, DQM pre-ranking, DIN ranking) receives the same
raw values on the wire (`user`, `hist`, `context`, `ad_features`) and must turn them into the
table rows the networks were trained on. Doing it here, once, through `FeatureSchema.encode`,
is what keeps serving from drifting from training: a vocabulary or a hash bucket exists in the
schema file only.

Conventions (the same as training):
- unknown or missing values encode to 0 (the padding row), never an error: a new device name or
  a missing profile must not fail a request;
- behaviour sequences are newest first and cut to `schema.sequence_len` (the newest kept); the
  raw pad value -1 encodes to 0; an empty history is one padded position, so the networks see a
  well-formed [1, 1] sequence that pools to zeros;
- `position` is not known before the auction: it defaults to 0 (the top slot), a row the models
  saw in training, so every candidate is scored as if shown first (ranking is unchanged by it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from models.bundle import CATALOG_FILE, Bundle
from models.features.schema import FeatureSchema

DEFAULT_CONTEXT = {"position": 0}
ScalarValue = int | float | str


def _as_int(raw: Any) -> Any:
    """Integral floats and numeric strings become ints (JSON may carry 3.0 or "3")."""
    if isinstance(raw, bool):
        return int(raw)
    if isinstance(raw, float) and raw.is_integer():
        return int(raw)
    if isinstance(raw, str):
        try:
            return int(raw)
        except ValueError:
            return -1  # not an id: encodes to the unknown row
    return raw


class FeatureEncoder:
    """Encodes one deployment's raw features; built once per loaded bundle (cheap)."""

    def __init__(self, schema: FeatureSchema) -> None:
        self.schema = schema
        self.user_names = schema.names("user")
        self.behaviour_names = schema.names("behaviour")
        self.ad_names = schema.names("ad")
        self.scene_names = schema.names("scene")
        self.sequence_len = int(schema.sequence_len)
        # Scalar encodings repeat endlessly (a few genders, hours, devices): cache them.
        self._scalar = lru_cache(maxsize=65536)(self._encode_scalar)

    # ---- scalars (user, scene, one new ad) -----------------------------------------------

    def _encode_scalar(self, name: str, raw: ScalarValue | None) -> int:
        if raw is None:
            return 0
        feature = self.schema[name]
        if feature.kind != "vocab":
            raw = _as_int(raw)
            if not isinstance(raw, int):
                return 0
        return feature.encode_one(raw)

    def scalar(self, name: str, raw: ScalarValue | None) -> int:
        """One encoded value; anything unhashable or unknown is the padding row."""
        try:
            return self._scalar(name, raw)
        except TypeError:
            return 0

    def _scalars(self, names: Sequence[str], raw: Mapping[str, Any]) -> dict[str, np.ndarray]:
        return {n: np.array([self.scalar(n, raw.get(n))], dtype=np.int64) for n in names}

    def user(self, user: Mapping[str, ScalarValue]) -> dict[str, np.ndarray]:
        """User-group features, each shaped [1]."""
        return self._scalars(self.user_names, user)

    def scene(self, scene: str, context: Mapping[str, ScalarValue] | None = None
              ) -> dict[str, np.ndarray]:
        """Scene-group features ([1] each): the scene name plus context (hour, device...)."""
        raw: dict[str, Any] = {**DEFAULT_CONTEXT, **(context or {})}
        if "scene" in self.scene_names:
            raw["scene"] = scene
        return self._scalars(self.scene_names, raw)

    def ad(self, features: Mapping[str, ScalarValue]) -> dict[str, np.ndarray]:
        """One ad's features ([1] each), e.g. from a CatalogUpdate; ad_id must be present."""
        return self._scalars(self.ad_names, features)

    # ---- columns (history, candidates, catalog) -------------------------------------------

    def _column(self, name: str, values: Any) -> np.ndarray:
        feature = self.schema[name]
        if isinstance(values, np.ndarray) and values.dtype.kind in "iu":
            return feature.encode(values)
        if feature.kind == "vocab":
            return feature.encode(np.asarray(list(values), dtype=object))
        return feature.encode(np.asarray([_as_int(v) for v in values], dtype=np.int64))

    def history(self, hist: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Behaviour features, each [1, L] with L = min(longest field, sequence_len), >= 1.

        `hist` values are wire Columns or plain sequences. A field that is missing or shorter
        than the others is padded with 0, so all fields stay position-aligned.
        """
        raw = {n: _values(hist[n]) for n in self.behaviour_names if n in hist}
        length = min(max((len(v) for v in raw.values()), default=0), self.sequence_len)
        length = max(length, 1)
        out: dict[str, np.ndarray] = {}
        for name in self.behaviour_names:
            row = np.zeros((1, length), dtype=np.int64)
            values = raw.get(name)
            if values is not None and len(values):
                cut = self._column(name, values[:length])
                row[0, :cut.shape[0]] = cut
            out[name] = row
        return out

    def ads(self, columns: Mapping[str, Any], n: int) -> dict[str, np.ndarray]:
        """Ad-group features for n ads ([n] each); a missing column is all padding."""
        out: dict[str, np.ndarray] = {}
        for name in self.ad_names:
            values = columns.get(name)
            if values is None:
                out[name] = np.zeros(n, dtype=np.int64)
                continue
            values = _values(values)
            if len(values) != n:
                raise ValueError(f"ad feature '{name}' has {len(values)} values for {n} ads")
            out[name] = np.ascontiguousarray(self._column(name, values), dtype=np.int64)
        return out

    # ---- requests -------------------------------------------------------------------------

    def user_batch(self, user: Mapping[str, ScalarValue],
                   hist: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """User + behaviour tensors for one request: user [1], history [1, L]."""
        return to_tensors({**self.user(user), **self.history(hist)})


def _values(column: Any) -> Any:
    """A wire Column's values, or the sequence itself."""
    values = getattr(column, "values", None)
    return values() if callable(values) else column


def to_tensors(arrays: Mapping[str, np.ndarray],
               device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Zero-copy int64 tensors (ids never go through float)."""
    out = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    if device is not None and torch.device(device).type != "cpu":
        out = {k: v.to(device, non_blocking=True) for k, v in out.items()}
    return out


def catalog_ad_features(bundle: Bundle, encoder: FeatureEncoder
                        ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(ad ids, encoded ad features) of the bundle's catalog, in its row order: the table the
    pre-rank and rank stages hold at load. An ad feature the catalog lacks is all padding."""
    present = set(pq.read_schema(bundle.file(CATALOG_FILE)).names)
    if "ad_id" not in present:
        raise ValueError(f"{CATALOG_FILE} lacks column 'ad_id'")
    columns = ["ad_id", *(n for n in encoder.ad_names if n in present and n != "ad_id")]
    table = pq.read_table(bundle.file(CATALOG_FILE), columns=columns)
    raw = {n: table.column(n).to_numpy(zero_copy_only=False) for n in columns}
    ad_ids = raw["ad_id"].astype(np.int64)
    return ad_ids, encoder.ads(raw, ad_ids.size)
