"""Load-test reporting and traffic model, on fixture text and a tiny users.parquet (fast)."""

from __future__ import annotations

import math
import random
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from loadtest.plot import plot_latency_vs_load
from loadtest.report import label_instance, parse_histograms, stage_quantiles
from loadtest.run import compare_to_ceiling
from loadtest.traffic import (
    SceneMix,
    Traffic,
    UserSampler,
    degraded_stages,
    feedback_events,
    load_user_ids,
)

# 100 rank observations: 10 <= 5 ms, 80 in (5, 10] ms, 10 in (10, 25] ms; retrieval under two
# worker labels; a counter and a summary that must not be mistaken for histograms.
METRICS = """\
# HELP cascade_stage_latency_seconds Time per cascade stage.
# TYPE cascade_stage_latency_seconds histogram
cascade_stage_latency_seconds_bucket{stage="rank",le="0.005"} 10.0
cascade_stage_latency_seconds_bucket{stage="rank",le="0.01"} 90.0
cascade_stage_latency_seconds_bucket{stage="rank",le="0.025"} 100.0
cascade_stage_latency_seconds_bucket{stage="rank",le="+Inf"} 100.0
cascade_stage_latency_seconds_count{stage="rank"} 100.0
cascade_stage_latency_seconds_sum{stage="rank"} 0.8
cascade_stage_latency_seconds_bucket{le="0.002",stage="retrieval",worker="1"} 40.0
cascade_stage_latency_seconds_bucket{le="0.004",stage="retrieval",worker="1"} 50.0
cascade_stage_latency_seconds_bucket{le="+Inf",stage="retrieval",worker="1"} 50.0
cascade_stage_latency_seconds_count{stage="retrieval",worker="1"} 50.0
cascade_stage_latency_seconds_bucket{le="0.002",stage="retrieval",worker="2"} 40.0
cascade_stage_latency_seconds_bucket{le="0.004",stage="retrieval",worker="2"} 50.0
cascade_stage_latency_seconds_bucket{le="+Inf",stage="retrieval",worker="2"} 50.0
cascade_stage_latency_seconds_count{stage="retrieval",worker="2"} 50.0
# TYPE cascade_requests_total counter
cascade_requests_total{route="/v1/ads",code="200"} 200.0
# TYPE rpc_seconds summary
rpc_seconds{quantile="0.5"} 0.1
rpc_seconds_count 3
"""

# Earlier scrape: 10 rank requests, all fast; only the 90 after it may count.
METRICS_BEFORE = """\
cascade_stage_latency_seconds_bucket{stage="rank",le="0.005"} 10.0
cascade_stage_latency_seconds_bucket{stage="rank",le="0.01"} 10.0
cascade_stage_latency_seconds_bucket{stage="rank",le="0.025"} 10.0
cascade_stage_latency_seconds_bucket{stage="rank",le="+Inf"} 10.0
cascade_stage_latency_seconds_count{stage="rank"} 10.0
"""

def test_histogram_quantiles_interpolate_like_prometheus() -> None:
    rank = parse_histograms(METRICS)["cascade_stage_latency_seconds"][(("stage", "rank"),)]
    assert rank.quantile(0.5) == pytest.approx(0.005 + 0.005 * 40 / 80)  # 7.5 ms
    assert rank.quantile(0.99) == pytest.approx(0.01 + 0.015 * 9 / 10)  # 23.5 ms
    assert rank.quantile(0.05) == pytest.approx(0.005 * 5 / 10)  # first bucket starts at 0


def test_stage_quantiles_in_ms_merge_label_sets_and_skip_other_families() -> None:
    stages = stage_quantiles(METRICS)
    assert set(stages) == {"rank", "retrieval"}
    assert stages["rank"] == {"p50_ms": 7.5, "p99_ms": 23.5, "count": 100}
    # retrieval: both workers summed -> 80 of 100 under 2 ms, the rest under 4 ms.
    assert stages["retrieval"]["count"] == 100
    assert stages["retrieval"]["p50_ms"] == pytest.approx(2 * 50 / 80, abs=1e-3)
    assert stages["retrieval"]["p99_ms"] == pytest.approx(2 + 2 * 19 / 20, abs=1e-3)


def test_stage_quantiles_count_only_what_happened_between_scrapes() -> None:
    rank = stage_quantiles(METRICS, METRICS_BEFORE)["rank"]
    assert rank["count"] == 90  # the 10 earlier fast requests are gone
    assert rank["p50_ms"] == pytest.approx(5 + 5 * 45 / 80, abs=1e-3)


def test_a_renamed_stage_histogram_is_still_found_by_its_stage_label() -> None:
    renamed = METRICS.replace("cascade_stage_latency_seconds", "gateway_stage_duration_ms")
    stages = stage_quantiles(renamed)
    assert stages["rank"]["p99_ms"] == pytest.approx(0.0235, abs=1e-3)  # ms: no scaling
    assert stage_quantiles("# nothing here\n") == {}


def test_gateway_view_first_then_each_service_own_histogram() -> None:
    """Stages the gateway times itself win; the rest come from the stage services' scrapes."""
    service = ('# TYPE cascade_request_seconds histogram\n'
               'cascade_request_seconds_bucket{stage="prerank",endpoint="/p",le="0.002"} 4\n'
               'cascade_request_seconds_bucket{stage="prerank",endpoint="/p",le="+Inf"} 4\n'
               'cascade_request_seconds_count{stage="prerank",endpoint="/p"} 4\n'
               'cascade_request_seconds_bucket{stage="rank",endpoint="/r",le="0.1"} 4\n'
               'cascade_request_seconds_bucket{stage="rank",endpoint="/r",le="+Inf"} 4\n'
               'cascade_request_seconds_count{stage="rank",endpoint="/r"} 4\n')
    joined = label_instance(METRICS, "http://gw:8000") + label_instance(service, "http://p:8002")
    stages = stage_quantiles(joined)
    assert set(stages) == {"rank", "retrieval", "prerank"}
    assert stages["rank"]["count"] == 100  # the gateway's own view of rank, not the service's
    assert stages["prerank"] == {"p50_ms": 1.0, "p99_ms": 1.98, "count": 4}


def test_joined_scrapes_of_identical_series_add_up() -> None:
    twice = label_instance(METRICS, "a") + label_instance(METRICS, "b")
    assert stage_quantiles(twice)["rank"]["count"] == 200
    assert 'instance="a",stage="rank"' in label_instance(METRICS, "a")


def test_quantile_in_the_inf_bucket_is_the_highest_finite_bound() -> None:
    text = ('h_seconds_bucket{stage="x",le="0.01"} 1\nh_seconds_bucket{stage="x",le="+Inf"} 10\n'
            'h_seconds_count{stage="x"} 10\n')
    assert stage_quantiles(text, families=("h_seconds",))["x"]["p99_ms"] == 10.0


@pytest.fixture
def users_dir(tmp_path):
    ids = list(range(1000, 1200))
    table = pa.table({"user_id": pa.array(ids, pa.int64()),
                      "age_bucket": pa.array([1] * 200, pa.int8()),
                      "gender": ["female"] * 200, "city_tier": pa.array([2] * 200, pa.int8())})
    pq.write_table(table, tmp_path / "users.parquet")
    return tmp_path


def test_users_are_marketplace_users_with_zipf_popularity(users_dir) -> None:
    ids = load_user_ids(users_dir)
    sampler = UserSampler(ids, zipf_s=1.1, seed=3)
    counts = Counter(sampler.sample() for _ in range(20_000))
    assert set(counts) <= set(ids) and all(isinstance(u, str) for u in counts)
    ranked = [n for _, n in counts.most_common()]
    top = sampler.user_ids[0]
    assert counts[top] == ranked[0]  # the head of the seeded ranking is the busiest user
    # Zipf(1.1) over 200 users: the top user gets ~19% of requests, the top 10 about half.
    assert 0.15 < counts[top] / 20_000 < 0.24
    assert 0.45 < sum(ranked[:10]) / 20_000 < 0.62
    assert UserSampler(ids, seed=3).user_ids == sampler.user_ids  # reproducible


def test_scene_mix_and_slots(users_dir) -> None:
    mix = SceneMix.parse("home_feed:0.6:4,search:0.3:3,product_detail:0.1:2", seed=1)
    drawn = Counter(mix.sample().name for _ in range(10_000))
    assert abs(drawn["home_feed"] / 10_000 - 0.6) < 0.03
    assert abs(drawn["product_detail"] / 10_000 - 0.1) < 0.02
    traffic = Traffic.from_env({"CASCADE_DATA": str(users_dir), "CASCADE_LOAD_SCENES":
                                "search:1:3"})
    request = traffic.ad_request()
    assert request["scene"] == "search" and request["slots"] == 3
    assert request["context"]["device"] in {"ios", "android", "web"}
    assert request["request_id"] != traffic.ad_request()["request_id"]
    with pytest.raises(ValueError, match="bad scene 'search:3'"):
        SceneMix.parse("search:3")


def test_traffic_needs_the_marketplace(tmp_path) -> None:
    with pytest.raises(ValueError, match="CASCADE_DATA is not set"):
        Traffic.from_env({})
    with pytest.raises(FileNotFoundError, match="users.parquet not found"):
        Traffic.from_env({"CASCADE_DATA": str(tmp_path)})


def test_feedback_follows_pctr_and_pcvr() -> None:
    rng = random.Random(0)
    always = feedback_events([{"token": "a", "pctr": 1.0, "pcvr": 1.0},
                              {"token": "b", "pctr": 0.0, "pcvr": 1.0}], rng)
    assert always == [("impression", "a"), ("click", "a"), ("conversion", "a"),
                      ("impression", "b")]
    slots = [{"token": str(i), "pctr": 0.2, "pcvr": 0.5} for i in range(20_000)]
    kinds = Counter(kind for kind, _ in feedback_events(slots, rng))
    assert kinds["impression"] == 20_000
    assert abs(kinds["click"] / 20_000 - 0.2) < 0.015
    assert abs(kinds["conversion"] / kinds["click"] - 0.5) < 0.04  # conversions only after clicks


@pytest.mark.parametrize("body,expected", [
    ({"stages": {"retrieval": {"degraded": False}, "rank": {"degraded": True}}}, ["rank"]),
    ({"stages": [{"name": "prerank", "degraded": True}, {"name": "rank"}]}, ["prerank"]),
    ({"degraded": ["rank"], "stages": {}}, ["rank"]),
    ({"stages": {"rank": {"degraded": False}}}, []),
])
def test_degraded_stages_read_from_responses(body, expected) -> None:
    assert degraded_stages(body) == expected


def test_plot_writes_a_png(tmp_path) -> None:
    steps = [{"offered_rps": r, "achieved_rps": r, "p50_ms": 5, "p95_ms": 9, "p99_ms": p}
             for r, p in ((50, 12), (100, 20), (150, math.nan))]
    out = plot_latency_vs_load(steps, 40, tmp_path / "plot.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_ceiling_ratios_compare_the_same_offered_rate_and_bound_an_unbroken_ceiling() -> None:
    gateway = {"offered_rps": 45.0, "cpu_ms_per_request": 10.0, "p50_ms": 20.0, "p99_ms": 70.0,
               "capacity_rps": 45.0}
    steps = [{"offered_rps": r, "cpu_ms_per_request": c, "p50_ms": 2.0, "p99_ms": 7.0}
             for r, c in ((30.0, 0.8), (45.0, 0.5), (67.5, 0.4))]
    unbroken = {**steps[-1], "steps": steps, "capacity_rps": 67.5,
                "capacity_exceeds_last_step": True}
    ratios = compare_to_ceiling(gateway, unbroken)
    assert ratios["offered_rps"] == 45.0 and ratios["cpu_ms_per_request"] == 20.0  # 10 / 0.5
    assert ratios["p99_ms"] == 10.0
    assert ratios["capacity_rps_at_most"] == pytest.approx(45 / 67.5, abs=1e-3)
    assert "capacity_rps" not in ratios
    broken = {**unbroken, "capacity_exceeds_last_step": False, "capacity_rps": 90.0}
    assert compare_to_ceiling(gateway, broken)["capacity_rps"] == 0.5
    single = {k: v for k, v in gateway.items() if k != "capacity_rps"}
    assert "capacity_rps" not in compare_to_ceiling(single, steps[1])


def test_the_gateway_own_stage_histogram_wins_over_the_stage_services() -> None:
    """Stack mode: the gateway's cascade_gateway_stage_seconds beside the services' own."""
    gateway = ('cascade_gateway_stage_seconds_bucket{stage="recall",le="0.01"} 3\n'
               'cascade_gateway_stage_seconds_bucket{stage="recall",le="+Inf"} 3\n'
               'cascade_gateway_stage_seconds_count{stage="recall"} 3\n'
               'cascade_gateway_stage_seconds_bucket{stage="screen",le="0.002"} 3\n'
               'cascade_gateway_stage_seconds_bucket{stage="screen",le="+Inf"} 3\n'
               'cascade_gateway_stage_seconds_count{stage="screen"} 3\n')
    service = ('cascade_request_seconds_bucket{stage="retrieval",le="0.004"} 3\n'
               'cascade_request_seconds_bucket{stage="retrieval",le="+Inf"} 3\n'
               'cascade_request_seconds_count{stage="retrieval"} 3\n')
    stages = stage_quantiles(label_instance(gateway, "gw") + label_instance(service, "r"))
    assert set(stages) == {"recall", "screen", "retrieval"}
    assert stages["screen"]["p50_ms"] == 1.0
