"""One pricing module: the formulas, and no other module carrying its own prior CVR."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from models.pricing import MILLE, PRIOR_CVR, click_value, ecpm, qscore_ecpm

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("models", "services", "cli", "loadtest", "scripts")


def test_click_value_is_the_bid_or_target_cpa_times_pcvr():
    ocpa = np.array([False, True, True])
    bid = np.array([300_000, 0, 0])
    tcpa = np.array([0, 10_000_000, 20_000_000])
    np.testing.assert_allclose(click_value(ocpa, bid, tcpa, np.array([0.5, 0.1, 0.02])),
                               [300_000, 1_000_000, 400_000])
    np.testing.assert_allclose(click_value(ocpa, bid, tcpa), [300_000, 10_000_000 * PRIOR_CVR,
                                                              20_000_000 * PRIOR_CVR])


def test_ecpm_and_qscore_ecpm_per_mille():
    assert MILLE == 1000.0
    assert ecpm(0.02, 300_000.0) == 6_000_000.0  # 0.02 clicks per impression x 0.3 per click
    assert qscore_ecpm(0.01, True, 0, 10_000_000, 0.1) == 1000 * 0.01 * 10_000_000 * 0.1
    np.testing.assert_allclose(qscore_ecpm(np.array([0.01]), np.array([False]),
                                           np.array([200_000]), np.array([0])), [2_000_000])


def _python_files():
    for top in SOURCES:
        for path in (ROOT / top).rglob("*.py"):
            if ".venv" not in path.parts:
                yield path


def test_no_module_hard_codes_the_prior_cvr_or_the_click_value():
    """The 0.05 prior and `target_cpa_micros * <number>` live in models/pricing.py only."""
    prior = re.compile(r"(prior_cvr|PRIOR_CVR|base_cvr|\bcvr\b)[^\n=]*=[^\n]*\b0\.05\b"
                       r"|else 0\.05\b|target_cpa_micros\"?\]?\s*\*\s*0\.\d")
    offenders = []
    for path in _python_files():
        if path == ROOT / "models" / "pricing.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if prior.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_the_grep_would_catch_a_copy():
    """The guard above is not vacuous: it flags the forms the issue found."""
    prior = re.compile(r"(prior_cvr|PRIOR_CVR|base_cvr|\bcvr\b)[^\n=]*=[^\n]*\b0\.05\b"
                       r"|else 0\.05\b|target_cpa_micros\"?\]?\s*\*\s*0\.\d")
    for line in ('PRIOR_CVR = 0.05', 'DEFAULT_PRIOR_CVR = 0.05',
                 'x = float(y.mean()) if clicked.any() else 0.05',
                 'value = np.where(o, ads["target_cpa_micros"] * 0.05, b)'):
        assert prior.search(line), line
    assert not prior.search("band: float = 0.05")
