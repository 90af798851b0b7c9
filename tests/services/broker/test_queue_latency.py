"""Queue position models and latency models, by hand."""
from __future__ import annotations

import statistics

import pytest

from services.broker.latency import MAX_LATENCY_NS, MS, FeedLag, LatencyModel
from services.broker.queue import ProbQueue, QueuePos, RiskAverseQueue, make_queue_model

U = 100_000_000  # units per 1.0


def test_risk_averse_advances_on_trades_and_is_capped_by_the_level():
    q, pos = RiskAverseQueue(), QueuePos()
    q.level(pos, 2 * U)  # first sight: behind everything displayed
    assert (pos.ahead, pos.level) == (2 * U, 2 * U)
    assert q.trade(pos, U // 2) == 0 and pos.ahead == 3 * U // 2
    q.level(pos, 3 * U)  # orders joined behind us
    assert pos.ahead == 3 * U // 2
    q.level(pos, U)  # a cancel: the conservative model assumes it was behind us, except what cannot be
    assert pos.ahead == U
    assert q.trade(pos, 3 * U // 2) == U // 2 and pos.ahead == 0  # half of that trade reached us
    assert q.trade(pos, 7) == 7


def test_unknown_position_ignores_trades_until_the_level_is_seen():
    q, pos = RiskAverseQueue(), QueuePos()
    assert q.trade(pos, U) == 0 and pos.ahead is None


def test_probabilistic_split_of_a_cancel():
    q = make_queue_model("power", 2)
    assert isinstance(q, ProbQueue) and q.name == "power2"
    pos = QueuePos(ahead=U // 2, level=2 * U)
    q.level(pos, 3 * U // 2)  # 0.5 cancelled; 1.5 behind us, 0.5 in front → p(behind) = 0.9
    assert pos.ahead == 45_000_000 and pos.level == 3 * U // 2
    pos = QueuePos(ahead=U, level=U)
    q.level(pos, U // 4)  # nobody behind us: every cancel was in front
    assert pos.ahead == U // 4
    pos = QueuePos(ahead=U // 2, level=2 * U)
    q.level(pos, 4 * U)  # an increase never moves us
    assert pos.ahead == U // 2


def test_cancels_beyond_what_is_behind_us_come_from_the_front():
    q = make_queue_model("power", 1)
    pos = QueuePos(ahead=U, level=5 * U // 4)  # 0.25 behind
    q.level(pos, U // 4)  # 1.0 cancelled: p = 0.25 / 1.25 = 0.2 → 1 - 0.8 + min(0.25 - 0.2, 0) = 0.2, capped 0.25
    assert pos.ahead == 20_000_000


def test_make_queue_model_rejects_unknown_names():
    with pytest.raises(ValueError):
        make_queue_model("fifo")
    with pytest.raises(ValueError):
        make_queue_model("power", 0)
    assert make_queue_model("log").name == "log" and make_queue_model("risk_averse").name == "risk_averse"


def test_feed_lag_is_the_median_when_the_clocks_allow():
    lag = FeedLag()
    assert lag.lag_ns is None
    for ms in (3, 4, 100, 5, 6):
        lag.observe(recv_ns=(1000 + ms) * MS, exch_ms=1000)
    assert lag.lag_ns == 5 * MS and lag.samples == 5
    lag.observe(recv_ns=0, exch_ms=1000)  # no receive time: ignored
    lag.observe(recv_ns=5 * MS, exch_ms=0)  # no exchange time (a snapshot's book): ignored
    assert lag.samples == 5


@pytest.mark.parametrize("lag_ms", [-1272, 0, 201, 86_400_000])
def test_feed_lag_is_refused_when_the_clocks_do_not_allow(lag_ms):
    lag = FeedLag()
    for _ in range(10):
        lag.observe(recv_ns=(2_000_000_000 + lag_ms) * MS, exch_ms=2_000_000_000)
    assert lag.lag_ns is None


def test_latency_modes():
    feed = FeedLag()
    model = LatencyModel("feed", 10, feed=feed)
    assert model.entry_ns() == 10 * MS and model.visible_ns() == 0  # no usable lag: the stated constant
    for _ in range(5):
        feed.observe(recv_ns=1007 * MS, exch_ms=1000)
    assert model.entry_ns() == 7 * MS and model.visible_ns() == 7 * MS
    assert LatencyModel("constant", 3, feed=feed).entry_ns() == 3 * MS
    assert LatencyModel("constant", 500).entry_ns() == MAX_LATENCY_NS


def test_lognormal_latency_is_seeded_with_the_stated_median_and_capped():
    a = LatencyModel("lognormal", 10, 0.5, seed=7)
    b = LatencyModel("lognormal", 10, 0.5, seed=7)
    draws = [a.entry_ns() for _ in range(2000)]
    assert draws[:50] == [b.entry_ns() for _ in range(50)]
    assert 9 * MS < statistics.median(draws) < 11 * MS
    assert max(LatencyModel("lognormal", 150, 3.0, seed=1).entry_ns() for _ in range(200)) == MAX_LATENCY_NS


def test_latency_model_rejects_bad_settings():
    with pytest.raises(ValueError):
        LatencyModel("gaussian", 1)
    with pytest.raises(ValueError):
        LatencyModel("constant", -1)
