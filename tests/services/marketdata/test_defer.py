"""Deferred deep levels: the published top n equals a full apply's at every event; bad deep levels resync."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.marketdata.service import MarketDataService
from services.marketdata.sync import BadEventError, BookSync, Market, SyncResult
from shared import config as qfconfig
from tests.services.marketdata.test_service import Bus, frame, spot  # noqa: F401 (a fixture)

N = 10


def _replay_both(records, market, settle_every: int) -> tuple[BookSync, BookSync, int]:
    """Feed a capture to a plain BookSync and a deferring one; compare their top N after each event.
    The deferring one settles after every `settle_every`-th event (else the next input does)."""
    ref, lazy = BookSync("BTCUSDT", market), BookSync("BTCUSDT", market)
    deferred = 0
    for i, rec in enumerate(records):
        if rec["k"] == "snapshot":
            assert ref.on_snapshot(rec["m"]) == lazy.on_snapshot(rec["m"])
        elif rec["k"] == "ws" and "@depth" in rec["m"]["stream"]:
            data = rec["m"]["data"]
            r1, r2 = ref.on_depth(data), lazy.on_depth(data, N)
            assert r1 == r2
            if r1 is SyncResult.APPLIED:
                deferred += lazy.deferred
                assert lazy.book.update_id == ref.book.update_id
                assert lazy.book.metrics(N) == ref.book.metrics(N), f"top {N} differs at u={data['u']}"
                assert lazy.book.best_bid() == ref.book.best_bid()
                if i % settle_every == 0:
                    lazy.settle()
    lazy.settle()
    assert lazy.book.levels() == ref.book.levels()
    lazy.book.check()
    return ref, lazy, deferred


@pytest.mark.parametrize("settle_every", [1, 3])
def test_spot_capture_top_is_exact_at_every_event(spot_records, settle_every):
    _, _, deferred = _replay_both(spot_records, Market.SPOT, settle_every)
    assert deferred > 1000  # the shortcut is really taken


def test_usdm_capture_top_is_exact_at_every_event(usdm_records):
    _replay_both(usdm_records, Market.USDM, 2)


def _synced(n_levels: int = 60) -> BookSync:
    s = BookSync("BTCUSDT")
    s.on_snapshot({"lastUpdateId": 10,
                   "bids": [[f"{60000 - i}.00000000", "1.00000000"] for i in range(n_levels)],
                   "asks": [[f"{60001 + i}.00000000", "1.00000000"] for i in range(n_levels)]})
    return s


def test_malformed_deep_level_drops_sync_when_settled():
    s = _synced()
    bad = {"U": 11, "u": 11, "b": [["60000.00000000", "2.00000000"], ["59000.0000000x", "1.00000000"]],
           "a": [["60500.00000000", "0.0000000y"]]}
    assert s.on_depth(bad, N) is SyncResult.APPLIED and s.deferred
    assert s.book.best_bid() == (60000 * 10**8, 2 * 10**8)
    with pytest.raises(BadEventError, match="59000.0000000x"):
        s.settle()
    assert not s.synced and s.needs_snapshot and s.book.depth() == (0, 0)


def test_unsettled_bad_level_fails_the_next_event_instead():
    s = _synced()
    s.on_depth({"U": 11, "u": 11, "b": [["59000.0000000x", "1.00000000"]], "a": []}, N)
    with pytest.raises(BadEventError):
        s.on_depth({"U": 12, "u": 12, "b": [], "a": []}, N)
    assert not s.synced and s.needs_snapshot


def test_eaten_top_is_settled_before_publishing():
    s, ref = _synced(), _synced()
    # Removes the 25 best bids and adds a deep one: the deep one becomes part of the top 10.
    ev = {"U": 11, "u": 11, "b": [[f"{60000 - i}.00000000", "0.00000000"] for i in range(25)]
          + [["59900.00000000", "5.00000000"]], "a": []}
    assert s.on_depth(ev, N) is ref.on_depth(ev) is SyncResult.APPLIED
    assert s.book.metrics(N) == ref.book.metrics(N)
    assert s.book.metrics(30) == ref.book.metrics(30)  # more than deferred for: settles first


def test_service_resyncs_on_a_bad_deep_level(spot, tmp_path):
    snap, events = spot
    bus = Bus()
    try:
        svc = MarketDataService(qfconfig.load({"QF_RUN_DIR": str(tmp_path), "QF_SYMBOLS": "btcusdt"}))
        svc.pub = bus.pub
        svc._dispatch(("snapshot", 1, "BTCUSDT", snap))
        events = [e for e in events if e["u"] > snap["lastUpdateId"]]
        for e in events[:5]:
            svc._dispatch(("raw", 2, frame("btcusdt@depth@100ms", e)))
            svc.settle()
        bad = dict(events[5], b=events[5]["b"] + [["1.0000000x", "1.00000000"]])
        svc._dispatch(("raw", 3, frame("btcusdt@depth@100ms", bad)))
        assert svc.m.decode_errors == {}  # the deep level waits: its book went out first
        svc.settle()
        assert svc.m.decode_errors == {"bad_event": 1}
        assert svc.state["BTCUSDT"] == "SYNCING" and not svc.syncs["BTCUSDT"].synced
        svc._dispatch(("raw", 4, frame("btcusdt@depth@100ms", events[6])))
        books = [m for t, m in bus.drain() if t == "book.BTCUSDT"]
        assert books and books[-1].update_id == events[5]["u"]  # nothing after the bad event
    finally:
        bus.close()


_price = st.integers(59_950, 60_050)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.tuples(st.booleans(), _price, st.integers(0, 3)), max_size=40), max_size=25),
       st.integers(1, 5))
def test_random_streams_keep_the_top_exact(events, n):
    snap = {"lastUpdateId": 1, "bids": [[f"{p}.00000000", "1.00000000"] for p in range(59_950, 60_000)],
            "asks": [[f"{p}.00000000", "1.00000000"] for p in range(60_001, 60_051)]}
    ref, lazy = BookSync("X"), BookSync("X")
    ref.on_snapshot(snap)
    lazy.on_snapshot(snap)
    for u, changes in enumerate(events, start=2):
        # bids at or below 60000 and asks above it, so the book never crosses
        b = [[f"{p - 50}.00000000", f"{q}.00000000"] for is_bid, p, q in changes if is_bid]
        a = [[f"{p + 51}.00000000", f"{q}.00000000"] for is_bid, p, q in changes if not is_bid]
        ev = {"U": u, "u": u, "b": b, "a": a}
        assert ref.on_depth(ev) is lazy.on_depth(ev, n) is SyncResult.APPLIED
        bb, ba = ref.book.depth()
        if bb and ba:
            assert lazy.book.metrics(n) == ref.book.metrics(n)
        if u % 2:
            lazy.settle()
    assert lazy.book.levels() == ref.book.levels()
