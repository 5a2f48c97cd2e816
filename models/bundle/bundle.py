"""Versioned, immutable model bundles: what training writes and every serving stage loads.

A bundle is a directory `BUNDLES/<version>/` holding safetensors weights, JSON, Parquet and faiss
files, described by `manifest.json` (version, creation time, schema + hash, model configs, split,
metrics, and every file with its sha256). Training writes a new version in a staging directory,
renames it into place, then switches the `BUNDLES/current` symlink atomically, so the bundle being
served is never overwritten and a reader never sees half a bundle.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file as load_torch
from safetensors.torch import save_file as save_torch

from models.features import FeatureSchema, parse_schema

MANIFEST = "manifest.json"
CURRENT = "current"
FORMAT_VERSION = 1


class BundleError(ValueError):
    """A bundle that cannot be served: missing, corrupt, or built for another schema."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def new_version() -> str:
    """Sortable, unique version name: UTC time plus a random suffix."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


class BundleWriter:
    """Builds one bundle in a staging directory; `commit()` publishes it."""

    def __init__(self, root: str | Path, schema: FeatureSchema, version: str | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.schema = schema
        self.version = version or new_version()
        self.staging = self.root / f".{self.version}.staging"
        if self.staging.exists():
            shutil.rmtree(self.staging)
        self.staging.mkdir()
        self.manifest: dict[str, Any] = {
            "format": FORMAT_VERSION,
            "version": self.version,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "schema": schema.to_dict(),
            "schema_sha256": schema.sha256,
            "models": {},
        }

    def path(self, name: str) -> Path:
        """Where a file of the bundle goes (for writers such as faiss or pyarrow)."""
        return self.staging / name

    def save_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Weights as safetensors; shared storage is cloned so each tensor saves once."""
        plain = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
        save_torch(plain, str(self.path(name)))

    def save_arrays(self, name: str, arrays: dict[str, np.ndarray]) -> None:
        save_numpy({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(self.path(name)))

    def save_json(self, name: str, obj: Any) -> None:
        self.path(name).write_text(json.dumps(obj, indent=2, sort_keys=True))

    def add_model(self, name: str, entry: dict[str, Any]) -> None:
        """Record a model: its config, files and metrics (JSON-serialisable)."""
        self.manifest["models"][name] = entry

    def commit(self, **fields: Any) -> Path:
        """Checksum every file, write the manifest, publish, and point `current` at it."""
        self.manifest.update(fields)
        files = {}
        for path in sorted(self.staging.rglob("*")):
            if path.is_file():
                rel = path.relative_to(self.staging).as_posix()
                files[rel] = {"sha256": _sha256(path), "bytes": path.stat().st_size}
        self.manifest["files"] = files
        (self.staging / MANIFEST).write_text(json.dumps(self.manifest, indent=2, sort_keys=True))
        final = self.root / self.version
        os.replace(self.staging, final)
        switch_current(self.root, self.version)
        return final

    def abort(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


def switch_current(root: str | Path, version: str) -> None:
    """Point `root/current` at `version` atomically (symlink + rename)."""
    root = Path(root)
    tmp = root / f".current.{secrets.token_hex(4)}"
    os.symlink(version, tmp)
    os.replace(tmp, root / CURRENT)


def resolve_bundle_dir(path: str | Path) -> Path:
    """Accept a version directory or a BUNDLES root (which resolves `current`)."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path.resolve()
    if (path / CURRENT / MANIFEST).is_file():
        return (path / CURRENT).resolve()
    if not path.exists():
        raise BundleError(f"bundle not found: {path}")
    raise BundleError(f"{path} is neither a bundle (no {MANIFEST}) nor a bundles root with "
                      f"'{CURRENT}'")


@dataclass
class Bundle:
    """A verified bundle on disk. Loading is lazy: stages read only the files they need."""

    path: Path
    manifest: dict[str, Any]
    schema: FeatureSchema

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    def file(self, name: str) -> Path:
        if name not in self.manifest.get("files", {}):
            raise BundleError(f"bundle {self.version} has no file '{name}'")
        return self.path / name

    def has(self, name: str) -> bool:
        return name in self.manifest.get("files", {})

    def tensors(self, name: str, device: str = "cpu") -> dict[str, torch.Tensor]:
        return load_torch(str(self.file(name)), device=device)

    def arrays(self, name: str) -> dict[str, np.ndarray]:
        return load_numpy(str(self.file(name)))

    def json(self, name: str) -> Any:
        return json.loads(self.file(name).read_text())

    def model_entry(self, name: str) -> dict[str, Any]:
        try:
            return self.manifest["models"][name]
        except KeyError:
            raise BundleError(f"bundle {self.version} has no model '{name}'") from None


def read_bundle(path: str | Path, schema: FeatureSchema | None = None,
                verify: bool = True) -> Bundle:
    """Open and check a bundle: manifest, file checksums, and the schema hash.

    `schema` is the schema being served; a bundle trained on another schema is refused,
    because its embedding rows would silently mean different things.
    """
    root = resolve_bundle_dir(path)
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{root / MANIFEST} is not valid JSON: {exc}") from None
    for key in ("version", "schema", "schema_sha256", "files", "models"):
        if key not in manifest:
            raise BundleError(f"{root / MANIFEST} lacks '{key}'")
    bundle_schema = parse_schema(manifest["schema"])
    if bundle_schema.sha256 != manifest["schema_sha256"]:
        raise BundleError(f"bundle {manifest['version']}: schema does not match its recorded hash")
    if schema is not None and schema.sha256 != manifest["schema_sha256"]:
        raise BundleError(
            f"bundle {manifest['version']} was trained on schema {manifest['schema_sha256'][:12]} "
            f"but this deployment serves schema {schema.sha256[:12]}")
    if verify:
        for name, meta in manifest["files"].items():
            file = root / name
            if not file.is_file():
                raise BundleError(f"bundle {manifest['version']}: file '{name}' is missing")
            if file.stat().st_size != meta["bytes"] or _sha256(file) != meta["sha256"]:
                raise BundleError(f"bundle {manifest['version']}: checksum mismatch for '{name}'")
    return Bundle(path=root, manifest=manifest, schema=bundle_schema)
