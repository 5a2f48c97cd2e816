"""Serving loads bundles without training code: the stages and the gateway never import
models.train (load_model and the bundle's file names live in models.bundle)."""

from __future__ import annotations

import subprocess
import sys

SERVING = ("services.gateway.app", "services.gateway.stage_loaders", "services.rank.ranker",
           "services.prerank.preranker", "services.retrieval.state",
           "services.retrieval.user_encoder")


def test_serving_modules_do_not_import_training():
    code = ("import sys\n" + "".join(f"import {m}\n" for m in SERVING)
            + "print(sorted(m for m in sys.modules if m.startswith('models.train')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]", proc.stdout
