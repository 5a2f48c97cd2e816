"""`cascade bench chaos` bookkeeping: how a fault's row is counted from what the load saw, and
the README table it writes. (The faults themselves run on real processes in test_faults.py,
test_breaker.py and the command itself.)"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from services.bench.chaos import (
    COLUMNS,
    README_BEGIN,
    README_END,
    AdSample,
    Ledger,
    fault_row,
    markdown_table,
    update_readme,
)


def test_fault_row_counts_errors_shed_degraded_and_the_event_ledger() -> None:
    ledger = Ledger(
        ads=[AdSample(0.5, 10, 200), AdSample(1.5, 30, 200, degraded=True),
             AdSample(2.0, 900, 503, shed=True), AdSample(2.5, 40, 500), AdSample(3.0, 0, 0),
             AdSample(9.0, 10, 500)],  # outside the window: not counted
        accepted={"a": 1.0, "b": 2.0, "c": 2.5, "late": 9.0},
        applied=Counter({"a": 1, "b": 2, "late": 1}))
    row = fault_row("x", ledger, window=(0.0, 5.0), fault_span=(1.0, 3.5), recovery_s=1.234)
    assert set(COLUMNS) <= set(row)
    assert row["requests"] == 5
    assert row["errors"] == 2  # the 500 and the request without an answer; not the shed 503
    assert row["degraded_share"] == 0.5  # of the two answered
    assert row["events_accepted"] == 3 and row["events_applied"] == 2
    assert row["events_lost"] == 1 and row["events_double"] == 1
    assert row["recovery_s"] == 1.23


def test_a_wipe_forgets_what_it_destroyed() -> None:
    """Redis restarted empty: an event applied only before the wipe is lost with the store; one
    applied before and again after (a re-send whose dedupe marker was wiped) counts once; one
    applied twice after the wipe is a real double count."""
    ledger = Ledger(accepted={"gone": 1.0, "resent": 1.0, "twice": 2.0},
                    applied=Counter({"gone": 1, "resent": 1}))
    ledger.wipe()
    ledger.applied.update({"resent": 1, "twice": 2})
    row = fault_row("wipe", ledger, window=(0.0, 5.0), fault_span=(0.0, 5.0), recovery_s=0.1)
    assert row["events_accepted"] == 3 and row["events_applied"] == 2
    assert row["events_lost"] == 1 and row["events_double"] == 1
    ledger.wipe()  # a second wipe destroys what the first left standing
    assert [ledger.live(e) for e in ("gone", "resent", "twice")] == [0, 0, 0]


def test_readme_table_is_rewritten_between_the_markers(tmp_path: Path) -> None:
    result = {"faults": [{c: 0 for c in COLUMNS} | {"fault": "f1", "p99_ms": None}],
              "rps": 8.0, "budget_ms": 200.0, "replay_share": 0.2}
    readme = tmp_path / "README.md"
    readme.write_text(f"# t\n\n{README_BEGIN}\nold table\n{README_END}\n\n## next\n")
    assert update_readme(readme, result)
    text = readme.read_text()
    assert "old table" not in text and markdown_table(result) in text
    assert "| f1 | 0 | 0 | 0 | - |" in text and text.endswith("## next\n")
    (tmp_path / "other.md").write_text("no markers\n")
    assert not update_readme(tmp_path / "other.md", result)
