"""`cascade simulate` as a user runs it: the real entry point in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from models.data import layout
from tests.fixtures_data import MICRO_OVERRIDES

ROOT = Path(__file__).resolve().parents[1]
# the installed console script, as a user runs it (`python -m cli.main` would load cli.main
# twice, as __main__ and as cli.main, and the commands register on the other copy)
CASCADE = str(Path(sys.executable).with_name("cascade"))


def cascade(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CASCADE, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0]


def test_simulate_writes_a_dataset_and_prints_the_summary(tmp_path: Path):
    config = tmp_path / "micro.json"
    config.write_text(json.dumps(MICRO_OVERRIDES))
    out = tmp_path / "data"
    result = cascade("simulate", "--scale", "tiny", "--seed", "3", "--out", str(out),
                     "--config", str(config))
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / layout.SUMMARY_FILE).read_text())
    assert summary["ads"] == 2_000 and summary["seed"] == 3
    for text in ("oracle CTR AUC", "oracle CTR GAUC", "oracle CVR AUC", "home_feed",
                 "product_detail", "rates by position", f"{summary['impressions']:,}"):
        assert text in result.stdout
    assert layout.require_dataset(out) == out
    # a previous dataset may be replaced; nothing half-written is left beside it
    again = cascade("simulate", "--seed", "4", "--out", str(out), "--config", str(config))
    assert again.returncode == 0, again.stderr
    assert json.loads((out / layout.SUMMARY_FILE).read_text())["seed"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "micro.json"]


@pytest.mark.parametrize(("config", "needle"), [
    ('{"scenes": {"search": {"slots": 0}}}', "scenes.search.slots must be >= 1 (got 0)"),
    ('{"scenes": {"video": {}}}', "unknown scene 'video'"),
    ('{"users": {"n_users": -1}}', "users.n_users"),
    ("log: [", "not valid"),
])
def test_bad_config_is_one_line_exit_2(tmp_path: Path, config: str, needle: str):
    path = tmp_path / ("c.yaml" if config.startswith("log") else "c.json")
    path.write_text(config)
    assert_one_line_error(cascade("simulate", "--out", str(tmp_path / "d"), "--config",
                                  str(path)), needle)
    assert not (tmp_path / "d").exists()


def test_bad_scale_missing_dirs_and_foreign_dirs_are_one_line_exit_2(tmp_path: Path):
    assert_one_line_error(cascade("simulate", "--scale", "huge", "--out", str(tmp_path / "d")),
                          "scale must be one of tiny, small, large")
    assert_one_line_error(cascade("simulate", "--out", str(tmp_path / "no" / "such" / "d")),
                          "does not exist")
    assert_one_line_error(cascade("simulate", "--config", str(tmp_path / "nope.yaml"), "--out",
                                  str(tmp_path / "d")), "config file not found")
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("keep me")
    assert_one_line_error(cascade("simulate", "--out", str(foreign)), "not empty")
    assert (foreign / "todo.txt").read_text() == "keep me"
    assert_one_line_error(cascade("simulate", "--seed", "x", "--out", str(tmp_path / "d")),
                          "--seed")
