"""Step deadlines: later steps keep their shares, and queueing is spread over the steps."""

from __future__ import annotations

import time

import pytest

from services.common import wire
from services.common.deadline import Deadline
from services.gateway.cascade import STEPS, Cascade, GatewayConfig, RequestState, StageRecord


def _state(left_ms: float, budget_ms: float = 50.0) -> RequestState:
    request = wire.AdsRequest(request_id="r", user_id="u", scene="home_feed", slots=1)
    return RequestState(request, Deadline(time.monotonic() + left_ms / 1000), budget_ms,
                        time.time(), 12, {s.name: StageRecord(s.name) for s in STEPS})


def _cascade() -> Cascade:
    return Cascade(config=GatewayConfig(), store=None, catalog=None, qscores=None, pacer=None,
                   signer=None, retrieval=None, prerank=None, rank=None)  # type: ignore[arg-type]


def test_a_fresh_request_keeps_every_later_share() -> None:
    budget = _cascade()._step_budget_ms("features", _state(50.0))
    assert budget == pytest.approx(50.0 - 0.8 * 50.0, abs=0.5)  # features' own 10%


def test_a_queued_request_spreads_the_loss_instead_of_skipping_the_first_step() -> None:
    cascade = _cascade()
    # 20 ms of 50 lost in the queue: features still gets its proportional part (1/9 of 30)
    assert cascade._step_budget_ms("features", _state(30.0)) == pytest.approx(30 / 9, abs=0.3)
    # the last step may use whatever is left
    assert cascade._step_budget_ms("auction", _state(3.0)) == pytest.approx(3.0, abs=0.3)
    assert cascade._step_budget_ms("recall", _state(0.0)) == 0.0
