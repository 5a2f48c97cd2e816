"""Write, read and verify versioned model bundles; rebuild their networks for serving."""

from models.bundle.bundle import (
    Bundle,
    BundleError,
    BundleWriter,
    read_bundle,
    resolve_bundle_dir,
    switch_current,
)
from models.bundle.files import (
    CAMPAIGNS_FILE,
    CATALOG_FILE,
    COLD_START_FILE,
    QSCORE_COUNTS_FILE,
    ad_vectors_file,
    weights_file,
)
from models.bundle.loading import load_model
from models.bundle.recommend import publish_recommendation

__all__ = ["CAMPAIGNS_FILE", "CATALOG_FILE", "COLD_START_FILE", "QSCORE_COUNTS_FILE", "Bundle",
           "BundleError", "BundleWriter", "ad_vectors_file", "load_model", "publish_recommendation",
           "read_bundle", "resolve_bundle_dir", "switch_current", "weights_file"]
