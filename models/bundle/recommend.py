"""Record a measured K recommendation (K1, K2, K3) as a new bundle version.

Bundles are immutable, so the recommendation is not written into the measured bundle: a new
version is published beside it with the same files (hard links where the filesystem allows,
copies otherwise; checksums unchanged) and a manifest that adds `recommended_ks` and the
evidence behind it, and names the version it was derived from. The gateway reads
`recommended_ks` unless a K is set explicitly (services.gateway.cascade.GatewayConfig).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from models.bundle.bundle import CURRENT, MANIFEST, new_version, read_bundle, switch_current

KS = ("k1", "k2", "k3")


def check_ks(ks: dict[str, int]) -> dict[str, int]:
    """K1 >= K2 >= K3 >= 1, all three present."""
    if set(ks) != set(KS):
        raise ValueError(f"recommended K's must be exactly {list(KS)}, got {sorted(ks)}")
    values = [int(ks[k]) for k in KS]
    if min(values) < 1 or not values[0] >= values[1] >= values[2]:
        raise ValueError(f"recommended K's must satisfy K1 >= K2 >= K3 >= 1, got {ks}")
    return dict(zip(KS, values, strict=True))


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def publish_recommendation(path: str | Path, ks: dict[str, int],
                           evidence: dict[str, Any]) -> Path:
    """Publish a copy of the bundle at `path` carrying `recommended_ks`; returns its directory.
    `current` moves to it only when it pointed at the source version."""
    source = read_bundle(path)
    ks = check_ks(ks)
    root = source.path.parent
    version = new_version()
    staging = root / f".{version}.staging"
    staging.mkdir()
    try:
        for name in source.manifest["files"]:
            _link_or_copy(source.path / name, staging / name)
        manifest = dict(source.manifest)
        manifest.update(version=version, derived_from=source.version, recommended_ks=ks,
                        ks_evidence=evidence,
                        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        final = root / version
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    current = root / CURRENT
    if current.is_symlink() and current.resolve() == source.path:
        switch_current(root, version)
    return final
