"""`cascade replay`: the real cascade, closed loop, against the simulator's truth."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from models.bundle import resolve_bundle_dir
from services.replay.arms import ARMS
from services.replay.engine import FUNNEL_STAGES, ReplayConfig
from services.replay.replay import load_shared, run_arms, run_replay
from services.replay.traffic import draw_traffic

CASCADE = [sys.executable, "-m", "cli.main"]
SMALL = ReplayConfig(funnel_requests=3)


def _without_timings(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "timings"}


def test_same_seed_same_json_other_seed_other_json(tiny_data, tiny_bundle):
    arms = ("cascade", "qscore-only", "oracle")
    first = run_replay(tiny_data, tiny_bundle, 12, seed=3, arms=arms, config=SMALL)
    again = run_replay(tiny_data, tiny_bundle, 12, seed=3, arms=arms, config=SMALL)
    assert json.dumps(_without_timings(first)) == json.dumps(_without_timings(again))
    other = run_replay(tiny_data, tiny_bundle, 12, seed=4, arms=arms, config=SMALL)
    assert _without_timings(other)["arms"] != _without_timings(first)["arms"]
    assert first["arms"]["cascade"]["impressions"] > 0
    assert set(first["arms"]) == set(arms)


@pytest.fixture(scope="module")
def all_arms(tiny_data, tiny_bundle):
    """Per-request logs of every arm over the same 15 requests."""
    shared = load_shared(tiny_data, str(tiny_bundle), ARMS)
    traffic = draw_traffic(tiny_data, 15, seed=1)
    return asyncio.run(run_arms(ARMS, shared, ReplayConfig(funnel_requests=2), traffic, None))


def test_oracle_allocates_at_least_every_other_arm(all_arms):
    """Sum of the winners' true eCPM: the oracle's is the largest (its second-price revenue
    need not be). On the first request every arm's store is still identical, so it holds
    request by request there, not only in total."""
    oracle = all_arms["oracle"].columns["allocated_value"]
    assert oracle.sum() > 0
    for name, log in all_arms.items():
        allocated = log.columns["allocated_value"]
        assert oracle.sum() >= allocated.sum() * (1 - 1e-9), name
        assert oracle[0] >= allocated[0] * (1 - 1e-9), name


def test_events_flow_back_through_the_real_event_path(all_arms):
    """Clicks drawn from the truth are charged by the event worker (revenue is what it
    charged), and every arm saw the same requests and slot counts."""
    oracle = all_arms["oracle"].columns
    assert oracle["clicks"].sum() > 0 and oracle["revenue"].sum() > 0
    slots = [log.columns["slots"] for log in all_arms.values()]
    assert all(np.array_equal(slots[0], s) for s in slots)
    for log in all_arms.values():
        clicked = log.columns["clicks"] > 0
        assert (log.columns["revenue"][~clicked] == 0).all()


def test_funnel_shares_shrink_stage_by_stage(all_arms):
    for name, log in all_arms.items():
        for shares in (log.funnel, log.vs_oracle):
            means = [np.mean(shares[s]) for s in FUNNEL_STAGES[:3]]
            assert 1.0 >= means[0] >= means[1] >= means[2] >= 0.0, name
    assert np.mean(all_arms["oracle"].vs_oracle["prerank"]) == 1.0
    assert np.mean(all_arms["full-ranker"].funnel["prerank"]) == 1.0


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(CASCADE + ["replay", *args], capture_output=True, text=True,
                          timeout=300)


def test_cli_bad_input_is_one_line_and_exit_2(tiny_data, tiny_bundle, tmp_path):
    out = str(tmp_path / "replay.json")
    missing = _run(["--data", str(tmp_path / "nope"), "--bundle", str(tiny_bundle),
                    "--requests", "5", "--out", out])
    zero = _run(["--data", str(tiny_data), "--bundle", str(tiny_bundle), "--requests", "0",
                 "--out", out])
    version = resolve_bundle_dir(tiny_bundle)
    partial = tmp_path / "partial"
    shutil.copytree(version, partial)
    manifest = json.loads((partial / "manifest.json").read_text())
    del manifest["models"]["din_esmm"]
    (partial / "manifest.json").write_text(json.dumps(manifest))
    no_ranker = _run(["--data", str(tiny_data), "--bundle", str(partial), "--requests", "5",
                      "--out", out, "--arms", "full-ranker"])
    for proc, needle in ((missing, "not found"), (zero, "at least 1"),
                         (no_ranker, "din_esmm")):
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert not (tmp_path / "replay.json").exists()


@pytest.mark.slow
def test_cli_writes_json_table_and_plot(tiny_data, tiny_bundle, tmp_path):
    out = tmp_path / "replay.json"
    proc = _run(["--data", str(tiny_data), "--bundle", str(tiny_bundle), "--requests", "4",
                 "--out", str(out), "--arms", "cascade,oracle", "--funnel-requests", "1"])
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    for arm in ("cascade", "oracle"):
        assert {"expected_revenue_per_1k", "revenue_per_1k", "ctr", "cvr",
                "advertiser_value_per_1k", "allocated_value_per_1k", "funnel",
                "funnel_vs_oracle"} <= set(result["arms"][arm])
    assert out.with_suffix(".png").stat().st_size > 1000
    assert "cascade" in proc.stdout and "oracle" in proc.stdout


@pytest.mark.slow
def test_url_mode_replays_the_cascade_arm_over_http(tiny_data, tiny_bundle, tmp_path):
    """`--url`: a real gateway process (`cascade serve all`) gets the requests and every
    impression, click and conversion event; only the cascade arm runs, without a funnel."""
    import os
    import socket
    import time

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "CASCADE_AUTH": "off", "CASCADE_TOKEN_SECRET": "replay-test-secret-0123"}
    env.pop("REDIS_URL", None)
    proc = subprocess.Popen(CASCADE + ["serve", "all", "--bundle", str(tiny_bundle), "--data",
                                       str(tiny_data), "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                if httpx.get(url + "/readyz", timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "gateway not ready"
            time.sleep(0.3)
        result = run_replay(tiny_data, tiny_bundle, 6, seed=2, url=url)
        assert result["mode"] == "http" and list(result["arms"]) == ["cascade"]
        cascade = result["arms"]["cascade"]
        assert cascade["impressions"] > 0 and cascade["funnel"]["retrieval"] is None
        metrics = httpx.get(url + "/metrics", timeout=5.0).text
        accepted = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                       if line.startswith("cascade_gateway_events_total")
                       and 'type="impression"' in line and 'outcome="ok"' in line)
        assert accepted == cascade["impressions"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
