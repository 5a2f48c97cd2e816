"""Open-loop schedules, the figures computed from request records, and /proc CPU readings."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from loadtest.procstat import cpu_seconds, cpu_spent, descendants, listening_pids, server_pids
from loadtest.records import (
    NOT_SENT,
    UNANSWERED,
    RequestRecord,
    cpu_figures,
    read_records,
    summarize_records,
    write_records,
)
from loadtest.schedule import arrival_schedule, coefficient_of_variation, pool_size


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_poisson_schedule_has_unit_cv_and_the_offered_rate(seed: int) -> None:
    rate, seconds = 200.0, 60.0
    due = arrival_schedule(rate, seconds, "poisson", seed)
    assert len(due) == rate * seconds  # the offered count exactly; the gaps carry the noise
    assert due == sorted(due) and 0 <= due[0] and due[-1] < seconds
    # CV of 12,000 exponential gaps: standard error about 1/sqrt(12,000) ~ 0.01.
    assert coefficient_of_variation(due) == pytest.approx(1.0, abs=0.05)
    gaps = np.diff(due)
    assert np.mean(gaps) == pytest.approx(1 / rate, rel=0.05)
    # Memoryless: about e^-1 of the gaps are longer than the mean gap.
    assert np.mean(gaps > 1 / rate) == pytest.approx(math.exp(-1), abs=0.03)


def test_schedules_are_reproducible_and_differ_between_seeds() -> None:
    assert arrival_schedule(50, 10, "poisson", 7) == arrival_schedule(50, 10, "poisson", 7)
    assert arrival_schedule(50, 10, "poisson", 7) != arrival_schedule(50, 10, "poisson", 8)
    assert arrival_schedule(50, 10, "uniform", 7) != arrival_schedule(50, 10, "uniform", 8)


def test_uniform_schedule_is_evenly_spaced_from_a_random_phase() -> None:
    rate = 40.0
    phases = []
    for seed in range(20):
        due = arrival_schedule(rate, 10.0, "uniform", seed)
        assert coefficient_of_variation(due) < 1e-6
        assert np.diff(due) == pytest.approx(np.full(len(due) - 1, 1 / rate))
        assert len(due) in (399, 400)
        phases.append(due[0])
    assert all(0 <= p < 1 / rate for p in phases)
    assert np.std(phases) > 0.2 / rate  # phases spread over the gap, not one fixed offset


def test_burst_schedule_sends_n_at_once_every_n_over_rate_seconds() -> None:
    due = arrival_schedule(20.0, 3.0, "poisson", seed=4, burst=5)
    instants = sorted(set(due))
    assert all(due.count(t) == 5 for t in instants)
    assert np.diff(instants) == pytest.approx(np.full(len(instants) - 1, 5 / 20.0))
    assert len(instants) in (11, 12)  # 3 s / 0.25 s, from a random phase


def test_unknown_arrivals_and_bad_rates_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown arrivals 'bursty'"):
        arrival_schedule(10, 1, "bursty")
    with pytest.raises(ValueError, match="must be > 0"):
        arrival_schedule(0, 1)


def test_pool_covers_rate_times_latency_bound_and_bursts_within_the_cap() -> None:
    assert pool_size(100, 2.0) >= 200
    assert pool_size(10, 0.5, burst=50) >= 100
    assert pool_size(5000, 2.0, cap=300) == 300


def _record(index: int, due: float, sent: float, done: float, status: int = 200,
            degraded: int = 0) -> RequestRecord:
    return RequestRecord(index, due, sent, done, status, degraded)


def test_latency_counts_from_the_due_time_and_unanswered_requests_count_to_the_end() -> None:
    records = [_record(i, i * 0.1, i * 0.1, i * 0.1 + 0.010) for i in range(96)]
    # Due at 9.6 s, sent 0.5 s late (every user busy), answered 20 ms after the send: 520 ms.
    records.append(_record(96, 9.6, 10.1, 10.12))
    records.append(_record(97, 9.7, 9.7, 9.72, status=503))
    records.append(_record(98, 9.8, 9.8, math.nan, status=UNANSWERED))
    records.append(RequestRecord(99, 9.9))  # never sent
    summary = summarize_records(records, offered_rps=10, seconds=10, run_end_s=12.0)
    assert summary["requests"] == 100 and summary["sent"] == 99 and summary["not_sent"] == 1
    assert summary["answered"] == 97 and summary["shed_rate"] == 0.01
    assert summary["error_rate"] == 0.02  # the unanswered and the unsent, not the shed
    assert summary["p50_ms"] == pytest.approx(10.0)
    # The two slowest: the unsent (12 - 9.9 s) and the unanswered (12 - 9.8 s), counted to the
    # end of the run; then the late send at 520 ms, which a send-time clock would call 20 ms.
    assert summary["max_ms"] == pytest.approx(2200.0)
    latencies = sorted(r.latency_ms for r in records if not math.isnan(r.done_s))
    assert latencies[-1] == pytest.approx(520.0)
    assert summary["send_lag_max_ms"] == pytest.approx(500.0)
    assert summary["achieved_rps"] == pytest.approx(97 / 10.12, abs=1e-3)


def test_degraded_share_is_over_successful_answers() -> None:
    records = [_record(i, i, i, i + 0.01, degraded=int(i % 4 == 0)) for i in range(8)]
    records += [_record(8, 8, 8, 8.01, status=503)]
    assert summarize_records(records, offered_rps=1, seconds=9)["degraded_share"] == 0.25


def test_arrival_cv_is_measured_on_actual_sends() -> None:
    due = arrival_schedule(50, 20, "uniform", 3)
    rng = np.random.default_rng(0)
    # Sends jittered by up to 10 ms around perfectly even due times: CV ~ 0.01 / 0.02 / sqrt(6).
    records = [_record(i, t, t + rng.uniform(0, 0.01), t + 0.02) for i, t in enumerate(due)]
    summary = summarize_records(records, offered_rps=50, seconds=20)
    assert summary["scheduled_cv"] == 0.0
    assert 0.1 < summary["arrival_cv"] < 0.3


def test_records_round_trip_through_csv() -> None:
    records = [_record(0, 0.1, 0.11, 0.2, 200, 1), RequestRecord(1, 0.5),
               _record(2, 0.7, 0.7, math.nan, UNANSWERED)]
    back = read_records(write_records(records))
    assert [r.index for r in back] == [0, 1, 2] and back[0] == records[0]
    assert back[1].status == NOT_SENT and math.isnan(back[1].sent_s)
    assert math.isnan(back[2].done_s)


def test_cpu_figures_divide_by_answered_requests() -> None:
    figures = cpu_figures({"server_cpu_s": 1.5, "loadgen_cpu_s": 0.3, "server_pids": [1]}, 300)
    assert figures["cpu_ms_per_request"] == 5.0
    assert figures["loadgen_cpu_ms_per_request"] == 1.0
    assert cpu_figures({"server_cpu_s": None}, 300)["cpu_ms_per_request"] is None


def test_the_process_listening_on_a_port_is_found_with_its_children() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert listening_pids(port) == {os.getpid()}
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        try:
            assert child.pid in server_pids([port])
            assert server_pids([], explicit=[child.pid]) == {child.pid}
        finally:
            child.kill()
            child.wait()
    assert listening_pids(port) == set()


def test_cpu_seconds_grow_with_work_in_any_server_process() -> None:
    busy = subprocess.Popen([sys.executable, "-c",
                             "import time\nend = time.process_time() + 0.4\n"
                             "while time.process_time() < end: pass\ntime.sleep(30)"])
    try:
        pids = descendants([os.getpid()])
        assert busy.pid in pids and descendants([os.getpid()], exclude=[busy.pid]) == pids - {
            busy.pid}
        before = cpu_seconds(pids)
        time.sleep(0.1)
        deadline = time.monotonic() + 20
        while cpu_seconds([busy.pid]).get(busy.pid, 0.0) - before.get(busy.pid, 0.0) < 0.3:
            assert time.monotonic() < deadline, "the busy child never burned its CPU"
            time.sleep(0.05)
        assert cpu_spent(before, cpu_seconds(pids)) >= 0.3
    finally:
        busy.kill()
        busy.wait()


def test_the_cli_offers_exactly_the_schedule_arrivals() -> None:
    from cli.commands_bench_e2e import ARRIVALS as CLI_ARRIVALS
    from loadtest.schedule import ARRIVALS

    assert CLI_ARRIVALS == ARRIVALS


def test_thread_cpu_is_split_into_the_event_loop_and_named_stage_threads() -> None:
    """A thread named as the embedded stage pools name theirs counts under its own group, the
    main thread under event_loop, and a split of the process adds up to its total."""
    from loadtest.procstat import EVENT_LOOP, cpu_by_thread, thread_cpu_seconds
    from services.common.threads import init_stage_thread

    pid = os.getpid()
    before = thread_cpu_seconds([pid])
    process_before = cpu_seconds([pid])

    burnt, release = threading.Event(), threading.Event()

    def burn() -> None:
        init_stage_thread("test", 0)
        end = time.thread_time() + 0.3
        while time.thread_time() < end:
            pass
        burnt.set()
        release.wait(30)  # alive until read: an exited thread leaves /proc

    worker = threading.Thread(target=burn)
    worker.start()
    try:
        assert burnt.wait(30)
        end = time.thread_time() + 0.1  # the main thread burns too
        while time.thread_time() < end:
            pass
        after = thread_cpu_seconds([pid])
    finally:
        release.set()
        worker.join()
    spent = cpu_by_thread(before, after)
    assert spent["stage-test"] >= 0.25, spent
    assert spent[EVENT_LOOP] >= 0.05, spent
    assert {group for group, _ in after.values()} >= {EVENT_LOOP}
    total = cpu_spent(process_before, cpu_seconds([pid]))
    assert sum(spent.values()) <= total + 0.05


def test_cpu_figures_split_per_thread_group() -> None:
    side = {"server_cpu_s": 3.0, "server_cpu_s_by_thread": {"event_loop": 1.5, "stage-rank": 1.2},
            "server_pids": [1]}
    assert cpu_figures(side, 300)["cpu_ms_per_request_by_thread"] == {
        "event_loop": 5.0, "stage-rank": 4.0}
    assert cpu_figures({"server_cpu_s": 1.0}, 10)["cpu_ms_per_request_by_thread"] == {}
