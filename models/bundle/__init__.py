"""Write, read and verify versioned model bundles."""

from models.bundle.bundle import (
    Bundle,
    BundleError,
    BundleWriter,
    read_bundle,
    resolve_bundle_dir,
    switch_current,
)

__all__ = ["Bundle", "BundleError", "BundleWriter", "read_bundle", "resolve_bundle_dir",
           "switch_current"]
