"""The schema guard every reload passes: a bundle trained on another feature schema is refused.

A bundle's embedding rows mean what its schema says (vocabularies, hash buckets). Swapping in a
bundle built on another schema would score every request with rows that mean something else,
silently. So a stage that serves schema A refuses a reload to a bundle whose manifest records
schema B, before loading anything, and says both hashes. The check reads only the manifest's
`schema_sha256` (the loader verifies that hash against the schema text, and the checksums).
"""

from __future__ import annotations

import json
from pathlib import Path

from models.bundle import resolve_bundle_dir

MANIFEST = "manifest.json"


class SchemaMismatch(ValueError):
    """The new bundle's schema differs from the served one (the message names both hashes)."""


def bundle_schema_sha256(path: str | Path) -> str | None:
    """The schema hash a bundle's manifest records; None when it records none."""
    try:
        manifest = json.loads((resolve_bundle_dir(path) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    value = manifest.get("schema_sha256") if isinstance(manifest, dict) else None
    return str(value) if value else None


def check_same_schema(serving_sha256: str | None, path: str | Path) -> str | None:
    """The new bundle's schema hash; SchemaMismatch when it is not the one being served."""
    new = bundle_schema_sha256(path)
    if serving_sha256 and new and new != serving_sha256:
        raise SchemaMismatch(
            f"bundle {path} was trained on schema {new}, but this deployment serves schema "
            f"{serving_sha256}: refused, the old bundle is kept")
    return new
