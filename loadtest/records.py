"""One row per scheduled ad request, and the open-loop figures computed from those rows.

The locustfile writes `requests.csv`: for each due time of the schedule, when it was sent, when
its answer came back, the status and whether the answer was degraded. Every latency here counts
from the due time, not the send, so a request that waited for a free user or queued behind a
stalled server carries that wait. Times are seconds from the start of the schedule.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Mapping
from dataclasses import astuple, dataclass, fields

import numpy as np

from loadtest.schedule import coefficient_of_variation

SHED = 503
NOT_SENT = -1  # the run ended before a user took this due time
UNANSWERED = 0  # sent, but no HTTP answer (connection error, timeout, or the run ended)


@dataclass
class RequestRecord:
    """One scheduled ad request (times in seconds from the schedule's start; NaN: not yet)."""

    index: int
    due_s: float
    sent_s: float = math.nan
    done_s: float = math.nan
    status: int = NOT_SENT
    degraded: int = 0

    @property
    def latency_ms(self) -> float:
        return (self.done_s - self.due_s) * 1000.0


COLUMNS = [f.name for f in fields(RequestRecord)]


def write_records(records: Iterable[RequestRecord]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(COLUMNS)
    for record in records:
        writer.writerow(astuple(record))
    return buffer.getvalue()


def read_records(text: str) -> list[RequestRecord]:
    rows = csv.DictReader(io.StringIO(text))
    return [RequestRecord(int(r["index"]), float(r["due_s"]), float(r["sent_s"]),
                          float(r["done_s"]), int(r["status"]), int(r["degraded"]))
            for r in rows]


def _percentile(values: np.ndarray, q: float) -> float:
    return round(float(np.percentile(values, q)), 3) if len(values) else math.nan


def summarize_records(records: list[RequestRecord], *, offered_rps: float, seconds: float,
                      run_end_s: float | None = None) -> dict:
    """Latency, rates, sheds and errors of one run, all counted from the due times.

    - Latency percentiles cover every request that was due: an answer of any status counts at
      its answer time; one never answered counts at the end of the run (a lower bound), so a
      server that stops answering cannot improve its percentiles.
    - `error_rate`: neither a 200 nor a shed 503 (5xx, 4xx, connection error, no answer);
      `shed_rate`: answered 503 (overload, by design).
    - `achieved_rps`: 200 answers per second over the offered window, or over the time until
      the last answer if that ran longer.
    - `arrival_cv`: of the gaps between actual sends (≈1 Poisson, ≈0 uniform);
      `send_lag_*`: how late sends left against their due times (the load generator keeping up).
    """
    if not records:
        raise ValueError("no ad request was scheduled")
    end = run_end_s if run_end_s is not None else max(
        (r.done_s for r in records if not math.isnan(r.done_s)), default=seconds)
    latency = np.array([r.latency_ms if not math.isnan(r.done_s) else (end - r.due_s) * 1000.0
                        for r in records])
    sent = np.array([r.sent_s for r in records if not math.isnan(r.sent_s)])
    lag = np.array([(r.sent_s - r.due_s) * 1000.0 for r in records if not math.isnan(r.sent_s)])
    ok = [r for r in records if r.status == 200]
    shed = sum(r.status == SHED for r in records)
    errors = len(records) - len(ok) - shed
    last_answer = max((r.done_s for r in ok), default=seconds)
    window = max(seconds, last_answer)
    return {
        "offered_rps": round(float(offered_rps), 3),
        "scheduled_rps": round(len(records) / seconds, 3),
        "achieved_rps": round(len(ok) / window, 3),
        "p50_ms": _percentile(latency, 50),
        "p95_ms": _percentile(latency, 95),
        "p99_ms": _percentile(latency, 99),
        "p999_ms": _percentile(latency, 99.9),
        "max_ms": round(float(latency.max()), 3),
        "error_rate": round(errors / len(records), 6),
        "shed_rate": round(shed / len(records), 6),
        "degraded_share": round(sum(r.degraded for r in ok) / len(ok), 6) if ok else 0.0,
        "arrival_cv": round(coefficient_of_variation(sent), 4),
        "scheduled_cv": round(coefficient_of_variation([r.due_s for r in records]), 4),
        "send_lag_p99_ms": _percentile(lag, 99),
        "send_lag_max_ms": round(float(lag.max()), 3) if len(lag) else math.nan,
        # overload figures: how late the 200s came, how fast the sheds were answered
        "ok_p99_ms": _percentile(np.array([r.latency_ms for r in ok]), 99) if ok else math.nan,
        "ok_max_ms": round(max(r.latency_ms for r in ok), 3) if ok else math.nan,
        "shed_p99_ms": _percentile(np.array([r.latency_ms for r in records
                                             if r.status == SHED]), 99) if shed else math.nan,
        "shed_service_p99_ms": _percentile(np.array([(r.done_s - r.sent_s) * 1000.0
                                                     for r in records if r.status == SHED]),
                                           99) if shed else math.nan,
        "requests": len(records),
        "sent": int(len(sent)),
        "answered": len(ok),
        "not_sent": len(records) - len(sent),
    }


def cpu_figures(side: Mapping, answered: int) -> dict:
    """Server and load-generator CPU per answered ad request, from the sidecar's readings."""
    server = side.get("server_cpu_s")
    loadgen = side.get("loadgen_cpu_s")

    def per(seconds: float | None) -> float | None:
        return round(1000.0 * seconds / answered, 3) if seconds is not None and answered else None

    by_thread = side.get("server_cpu_s_by_thread") or {}
    return {"cpu_ms_per_request": per(server), "loadgen_cpu_ms_per_request": per(loadgen),
            "cpu_ms_per_request_by_thread": {group: per(s) for group, s in by_thread.items()},
            "server_cpu_s": server, "loadgen_cpu_s": loadgen,
            "server_pids": side.get("server_pids", [])}
