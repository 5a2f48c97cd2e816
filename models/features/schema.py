"""The feature schema: one declarative file, loaded into typed objects.

Training and serving both encode raw values through these objects, so a feature name,
vocabulary or bucket count exists in exactly one place and cannot drift between the two.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml

DEFAULT_SCHEMA_PATH = Path(__file__).with_name("schema.yaml")
GROUPS = ("user", "behaviour", "ad", "scene")
PAD = 0  # index 0 of every table means padding / unknown

FeatureKind = Literal["vocab", "range", "id"]


class SchemaError(ValueError):
    """A schema file that cannot describe a deployment (names the offending field)."""


@dataclass(frozen=True)
class Feature:
    """One feature: how raw values become embedding-table rows."""

    name: str
    group: str
    kind: FeatureKind
    dim: int = 0
    size: int = 0  # range: values 0..size-1
    buckets: int = 0  # id: table rows including the padding row
    values: tuple[str, ...] = ()  # vocab
    shares: str | None = None  # name of the feature whose table this one reuses

    @property
    def rows(self) -> int:
        """Rows of this feature's own table (0 for a feature that shares one)."""
        if self.shares:
            return 0
        if self.kind == "vocab":
            return len(self.values) + 1
        if self.kind == "range":
            return self.size + 1
        return self.buckets

    def encode(self, raw: Any) -> np.ndarray:
        """Map raw values (any shape) to int64 table rows; unknown and padding become 0.

        Ids stay integers end to end: folding never goes through float, so large ids
        never collide silently.
        """
        if self.kind == "vocab":
            lookup = {v: i + 1 for i, v in enumerate(self.values)}
            arr = np.asarray(raw, dtype=object)
            flat = [lookup.get(v if isinstance(v, str) else str(v), PAD) for v in arr.ravel()]
            return np.asarray(flat, dtype=np.int64).reshape(arr.shape)
        arr = np.asarray(raw)
        if arr.dtype.kind not in "iu":
            raise SchemaError(f"feature '{self.name}' expects integers, got {arr.dtype}")
        arr = arr.astype(np.int64, copy=False)
        if self.kind == "range":
            ok = (arr >= 0) & (arr < self.size)
            return np.where(ok, arr + 1, PAD)
        ok = arr >= 0
        return np.where(ok, 1 + np.mod(arr, self.buckets - 1), PAD)

    def encode_one(self, raw: Any) -> int:
        """Encode a single raw value (serving path for scalar context features)."""
        dtype = object if self.kind == "vocab" else None
        return int(self.encode(np.asarray([raw], dtype=dtype))[0])


@dataclass(frozen=True)
class FeatureSchema:
    """All features of a deployment, grouped by the tower that reads them."""

    name: str
    version: int
    sequence_len: int
    features: tuple[Feature, ...]
    sha256: str = field(compare=False)
    source: dict[str, Any] = field(compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {f.name: f for f in self.features})

    def __getitem__(self, name: str) -> Feature:
        try:
            return self._by_name[name]  # type: ignore[attr-defined]
        except KeyError:
            raise KeyError(f"schema '{self.name}' has no feature '{name}'") from None

    def __contains__(self, name: str) -> bool:
        return name in self._by_name  # type: ignore[attr-defined]

    def group(self, group: str) -> tuple[Feature, ...]:
        return tuple(f for f in self.features if f.group == group)

    def names(self, group: str) -> list[str]:
        return [f.name for f in self.group(group)]

    def table_owner(self, name: str) -> Feature:
        """The feature that owns the embedding table `name` reads from."""
        feat = self[name]
        return self[feat.shares] if feat.shares else feat

    def tables(self) -> tuple[Feature, ...]:
        """Features that own an embedding table, in schema order."""
        return tuple(f for f in self.features if not f.shares)

    def encode(self, columns: dict[str, Any]) -> dict[str, np.ndarray]:
        """Encode every schema feature present in `columns` (others are ignored)."""
        return {n: self[n].encode(v) for n, v in columns.items() if n in self}

    def to_dict(self) -> dict[str, Any]:
        return self.source


def _parse_feature(group: str, spec: dict[str, Any]) -> Feature:
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise SchemaError(f"groups.{group}: every feature needs a 'name'")
    where = f"groups.{group}.{name}"
    kind = spec.get("kind")
    if kind not in ("vocab", "range", "id"):
        raise SchemaError(f"{where}.kind: must be vocab, range or id (got {kind!r})")
    unknown = set(spec) - {"name", "kind", "dim", "size", "buckets", "values", "shares"}
    if unknown:
        raise SchemaError(f"{where}: unknown keys {sorted(unknown)}")
    shares = spec.get("shares")
    dim = int(spec.get("dim", 0))
    if not shares and dim <= 0:
        raise SchemaError(f"{where}.dim: must be a positive integer")
    if kind == "vocab" and not shares and not spec.get("values"):
        raise SchemaError(f"{where}.values: a vocab feature needs a non-empty list")
    if kind == "range" and not shares and int(spec.get("size", 0)) <= 0:
        raise SchemaError(f"{where}.size: must be a positive integer")
    if kind == "id" and not shares and int(spec.get("buckets", 0)) < 2:
        raise SchemaError(f"{where}.buckets: must be at least 2")
    return Feature(
        name=name,
        group=group,
        kind=kind,
        dim=dim,
        size=int(spec.get("size", 0)),
        buckets=int(spec.get("buckets", 0)),
        values=tuple(str(v) for v in spec.get("values", ())),
        shares=shares,
    )


def schema_hash(source: dict[str, Any]) -> str:
    """Content hash of a parsed schema: formatting and comments do not change it."""
    canonical = json.dumps(source, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def parse_schema(source: dict[str, Any]) -> FeatureSchema:
    if not isinstance(source, dict):
        raise SchemaError("schema: the file must hold a mapping")
    groups = source.get("groups")
    if not isinstance(groups, dict):
        raise SchemaError("groups: missing")
    unknown = set(groups) - set(GROUPS)
    if unknown:
        raise SchemaError(f"groups: unknown groups {sorted(unknown)} (expected {list(GROUPS)})")
    features: list[Feature] = []
    for group in GROUPS:
        for spec in groups.get(group) or []:
            features.append(_parse_feature(group, spec))
    names = [f.name for f in features]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise SchemaError(f"groups: duplicate feature names {sorted(dupes)}")
    by_name = {f.name: f for f in features}
    resolved: list[Feature] = []
    for f in features:
        if f.shares:
            owner = by_name.get(f.shares)
            if owner is None or owner.shares:
                raise SchemaError(f"groups.{f.group}.{f.name}.shares: no table '{f.shares}'")
            f = Feature(f.name, f.group, owner.kind, owner.dim, owner.size, owner.buckets,
                        owner.values, owner.name)
        resolved.append(f)
    seq = source.get("sequence") or {}
    max_len = int(seq.get("max_len", 0))
    if max_len <= 0:
        raise SchemaError("sequence.max_len: must be a positive integer")
    for needed, group in (("user", "user"), ("ad", "ad"), ("scene", "scene")):
        if not any(f.group == group for f in resolved):
            raise SchemaError(f"groups.{needed}: needs at least one feature")
    return FeatureSchema(
        name=str(source.get("name", "unnamed")),
        version=int(source.get("version", 1)),
        sequence_len=max_len,
        features=tuple(resolved),
        sha256=schema_hash(source),
        source=source,
    )


def load_schema(path: str | Path | None = None) -> FeatureSchema:
    """Load a schema file (the built-in marketplace schema when `path` is None)."""
    path = Path(path) if path else DEFAULT_SCHEMA_PATH
    try:
        source = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SchemaError(f"schema file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise SchemaError(f"schema file {path} is not valid YAML: {exc}") from None
    return parse_schema(source)
