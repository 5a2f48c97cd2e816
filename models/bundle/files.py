"""The names of a bundle's files: written by training, read by every serving stage.

Defined here, beside the reader, so serving never imports training code to find a file.
"""

from __future__ import annotations

CATALOG_FILE = "catalog.parquet"
CAMPAIGNS_FILE = "campaigns.parquet"
QSCORE_COUNTS_FILE = "qscore_counts.safetensors"
COLD_START_FILE = "cold_start.safetensors"


def weights_file(model: str) -> str:
    return f"{model}.safetensors"


def ad_vectors_file(model: str) -> str:
    return f"{model}_ad_vectors.safetensors"
