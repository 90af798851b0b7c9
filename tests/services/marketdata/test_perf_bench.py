"""The market-data benchmark's parts: its baseline book is exact, its pipeline runs on real sockets."""

import pytest

from bench import marketdata as md_bench
from bench.naive_book import NaiveBook
from tests.conftest import free_port
from services.marketdata.book import EmptyBookError
from services.marketdata.sync import BookSync, SyncResult


def test_naive_book_equals_order_book_on_the_capture(spot_records):
    """A baseline that computed something else would make the comparison meaningless."""
    ours, naive = BookSync("BTCUSDT"), BookSync("BTCUSDT")
    naive.book = NaiveBook("BTCUSDT")
    checked = 0
    for rec in spot_records:
        if rec["k"] == "snapshot":
            assert ours.on_snapshot(rec["m"]) == naive.on_snapshot(rec["m"])
        elif "@depth" in rec["m"]["stream"]:
            res = ours.on_depth(rec["m"]["data"])
            assert naive.on_depth(rec["m"]["data"]) is res
            if res is SyncResult.APPLIED and (checked < 400 or checked % 50 == 0):
                assert naive.book.metrics(10) == ours.book.metrics(10)
                assert naive.book.top(25) == ours.book.top(25)
            checked += 1
    assert naive.book.levels() == ours.book.levels() and naive.book.update_id == ours.book.update_id
    naive.book.check()


def test_naive_book_edges():
    b = NaiveBook("X")
    with pytest.raises(EmptyBookError):
        b.metrics(1)
    with pytest.raises(ValueError):
        b.apply_diff([["1", "-1"]], [], 1)
    with pytest.raises(ValueError):
        b.apply_snapshot(1, [[5, "1"]], [])
    assert b.best_bid() is None and b.best_ask() is None and b.top(0) == ([], [])


@pytest.fixture(scope="module")
def items():
    return md_bench.load()[:4000]


def test_core_pipeline_runs(items):
    assert len(md_bench.core_latencies(items, naive=False, passes=1)) > 200
    assert len(md_bench.core_latencies(items, naive=True, passes=1)) > 200


@pytest.mark.timeout(120)
def test_service_pipeline_publishes_every_timed_event(items):
    """The benchmark's own path: the service's router.dispatch, a real PUB socket, a SUB process."""
    from services.marketdata.service import MarketDataService
    from shared import config as qfconfig
    from shared.bus import Publisher

    cfg = qfconfig.load({"QF_SYMBOLS": "btcusdt"})
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    svc = MarketDataService(cfg)
    svc.router.pub = pub = Publisher(endpoint, cfg.bus.hwm)
    try:
        drain = md_bench.Drain(endpoint, pub.sock)
        try:
            for naive in (False, True):
                samples, sizes, published = md_bench.service_latencies(items, svc, naive, passes=1)
                assert len(samples) == len(sizes) == published > 200 and min(sizes) > 0
        finally:
            received = drain.stop()
    finally:
        pub.close()
    assert received == sum(pub.seqs.values())
