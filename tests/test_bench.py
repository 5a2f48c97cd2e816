"""`cascade bench stages --scale tiny`: the contract's JSON shape, naive figures beside."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

STAGES = ("retrieval", "prerank", "rank")
FIGURES = ("p50_ms", "p99_ms", "per_s")


def test_bench_stages_tiny_writes_the_fixed_shape(tmp_path: Path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "cli.main", "bench", "stages", "--scale", "tiny",
           "--requests", "20", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert set(STAGES) <= set(result)
    for stage in STAGES:
        entry = result[stage]
        for key in FIGURES:
            assert entry[key] > 0, (stage, key)
            assert entry["naive"][key] > 0, (stage, "naive", key)
        assert entry["p99_ms"] >= entry["p50_ms"]
    assert 0.0 <= result["retrieval"]["recall"] <= 1.0
    assert result["retrieval"]["recall"] >= 0.9  # the index is tuned to 0.95 at K=2000
    assert result["prerank"]["candidates"] == 2000 and result["rank"]["history"] == 50
    # the printed JSON is the written JSON
    assert '"retrieval"' in done.stdout


def test_unknown_scale_is_one_line_and_exit_2(tmp_path: Path):
    cmd = [sys.executable, "-m", "cli.main", "bench", "stages", "--scale", "huge",
           "--out", str(tmp_path / "x.json")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "--scale" in done.stderr
