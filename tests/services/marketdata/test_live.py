"""Live marketdata against the fake Binance; every published book is checked against the exchange's."""
import itertools

import orjson
import pytest

from services.marketdata.sync import Market
from shared import config as qfconfig
from tests.conftest import SPOT_CAPTURE, USDM_CAPTURE, tcp_env, wait_for
from tests.fakes.binance import FakeBinance
from tests.fakes.harness import ServiceThread, Tap, exact_books


def live_config(tmp_path, spot=None, usdm=None, **extra):
    env = tcp_env(tmp_path, **{"QF_FEED": "live", "QF_MD_BACKOFF_MAX_S": "0.3", "QF_MD_WATCHDOG_S": "5", **extra})
    if spot is not None:
        env.update(QF_BINANCE_WS=spot.ws_url, QF_BINANCE_REST=spot.rest_url)
    if usdm is not None:
        env.update(QF_BINANCE_USDM_WS=usdm.ws_url, QF_BINANCE_USDM_REST=usdm.rest_url)
    return qfconfig.load(env)


class Live:
    """A fake exchange, the service connected to it and a tap on what it publishes."""

    def __init__(self, tmp_path, captures=None, symbols="btcusdt", speed=25.0, fake_args=None, **env):
        self.fake = FakeBinance(captures or {"BTCUSDT": SPOT_CAPTURE}, speed=speed, **(fake_args or {}))
        self.tmp_path, self.symbols, self.env = tmp_path, symbols, env

    def __enter__(self):
        self.fake.start()
        cfg = live_config(self.tmp_path, self.fake, QF_SYMBOLS=self.symbols, **self.env)
        self.tap = Tap(cfg.bus.md_pub)
        self.runner = ServiceThread(cfg)
        self.svc = self.runner.__enter__()
        return self

    def __exit__(self, *exc):
        try:
            self.runner.__exit__(*exc)
        finally:
            self.tap.close()
            self.fake.stop()

    def books_after(self, mark, symbol="BTCUSDT", n=20, timeout=20):
        return wait_for(lambda: len([m for m in self.tap.since(mark, symbol) if m.TYPE == "book"]) >= n
                        and [m for m in self.tap.since(mark, symbol) if m.TYPE == "book"], timeout,
                        f"{n} books of {symbol}")


def assert_no_book_while_unsynced(msgs):
    """Between a SYNCING/DISCONNECTED status and the next SYNCED, not one book."""
    state = None
    for m in msgs:
        if m.TYPE == "md_status":
            state = m.state
        elif state is not None:
            assert state == "SYNCED", f"book {m.update_id} published while {state}"


def test_several_symbols_on_one_connection_give_exact_books_and_trades(tmp_path):
    with Live(tmp_path, {"BTCUSDT": SPOT_CAPTURE, "ETHUSDT": SPOT_CAPTURE}, "btcusdt,ethusdt",
              QF_MD_BOOK_TICKER="true") as lv:
        for sym in ("BTCUSDT", "ETHUSDT"):
            lv.books_after(0, sym, n=60)
        wait_for(lambda: lv.svc.router.m.ticker_checks[("BTCUSDT", "match")] >= 5, 20, "bookTicker checks")
        msgs = lv.tap.snapshot()
        svc, fake = lv.svc, lv.fake
    assert fake.connections == 1 and len(fake.paths) == 1
    assert sorted(fake.paths[0].split("=")[1].split("/")) == sorted(
        f"{s}@{k}" for s in ("btcusdt", "ethusdt") for k in ("depth@100ms", "aggTrade", "bookTicker"))
    for sym in ("BTCUSDT", "ETHUSDT"):
        books = [m for _, m in msgs if m.TYPE == "book" and m.symbol == sym]
        assert exact_books(fake, books) == []
        ids = [b.update_id for b in books]
        assert ids == sorted(set(ids))
    checks = svc.router.m.ticker_checks
    assert checks[("BTCUSDT", "mismatch")] == checks[("ETHUSDT", "mismatch")] == 0
    trades = [m for _, m in msgs if m.TYPE == "trade"]
    assert trades and all(t.price > 0 and t.qty > 0 and t.exch_ts > 0 for t in trades)
    # snapshot weight accounted: Binance's header is mirrored, our own sum matches the requests
    ok = [r for r in fake.requests if r["status"] == 200]
    assert svc.router.m.snapshot_weight["spot"] == 50 * len(fake.requests) and len(ok) == 2
    assert svc.router.m.used_weight["spot"] == 50 * len(fake.requests)
    assert svc.router.m.decode_errors == {} and svc.router.stats["gaps"] == 0


def test_pings_are_answered_and_the_connection_stays(tmp_path):
    # the fake's keepalive closes a connection whose pong is 0.5 s late, as Binance does after 1 min
    with Live(tmp_path, fake_args={"ping_interval": 0.2, "ping_timeout": 0.5}) as lv:
        lv.books_after(0, n=40)
        pongs = lv.fake.ping_clients()
        assert pongs and all(p.wait(5) for p in pongs)
        lv.books_after(0, n=150, timeout=30)  # several seconds of pings later
        assert lv.fake.connections == 1 and lv.svc.router.stats["reconnects"] == 0
        assert exact_books(lv.fake, lv.tap.books("BTCUSDT")) == []


def test_a_dropped_event_is_a_gap_then_a_resync_and_exact_books_again(tmp_path):
    with Live(tmp_path) as lv:
        lv.books_after(0, n=20)
        mark = lv.tap.mark()
        lv.fake.drop_depth("BTCUSDT", 1)
        wait_for(lambda: "SYNCING" in [m.state for m in lv.tap.since(mark, "BTCUSDT") if m.TYPE == "md_status"],
                 10, "the gap to be noticed")
        after = lv.books_after(mark, n=30)
        msgs = lv.tap.since(mark, "BTCUSDT")
        svc, fake = lv.svc, lv.fake
    dropped = fake.dropped[0]
    assert svc.router.m.gaps["BTCUSDT"] == 1 and svc.router.m.resyncs["BTCUSDT"] == 1
    assert dropped not in [b.update_id for b in after]
    changes = [k for k, _ in itertools.groupby(m.state for m in msgs if m.TYPE == "md_status")]
    assert changes[:2] == ["SYNCING", "SYNCED"]  # (heartbeats repeat a status that is not SYNCED)
    assert_no_book_while_unsynced(msgs)
    assert exact_books(fake, after) == []
    resync = [r for r in fake.requests if r["status"] == 200][-1]["lastUpdateId"]
    assert min(b.update_id for b in after if b.update_id > dropped) >= resync


def test_a_connection_cut_mid_stream_reconnects_and_resyncs(tmp_path):
    with Live(tmp_path) as lv:
        lv.books_after(0, n=20)
        mark = lv.tap.mark()
        lv.fake.cut()
        wait_for(lambda: lv.fake.connections == 2, 10, "a new connection")
        after = lv.books_after(mark, n=30)
        msgs = lv.tap.since(mark, "BTCUSDT")
        svc, fake = lv.svc, lv.fake
    states = [m.state for m in msgs if m.TYPE == "md_status"]
    assert states[0] == "DISCONNECTED" and states.index("SYNCED") > states.index("SYNCING") > 0
    assert_no_book_while_unsynced(msgs)
    assert exact_books(fake, after) == []
    assert svc.router.m.reconnects["spot"] == 1 and svc.router.stats["reconnects"] >= 0


def test_garbage_frames_are_counted_and_the_service_goes_on(tmp_path):
    ev = {"e": "depthUpdate", "E": 1, "s": "BTCUSDT", "U": "5", "u": 6, "b": [], "a": []}
    with Live(tmp_path) as lv:
        lv.books_after(0, n=20)
        mark = lv.tap.mark()
        for frame in ('{"stream": "btcusdt@depth@100ms", "data": {', "not json at all",
                      orjson.dumps({"stream": "dogeusdt@depth@100ms", "data": {}}),
                      orjson.dumps({"stream": "btcusdt@kline_1m", "data": {}}),
                      orjson.dumps({"id": 1, "result": None}),  # a subscription reply: fine
                      orjson.dumps([1, 2, 3]),
                      orjson.dumps({"stream": "btcusdt@aggTrade", "data": {"a": "x", "p": 1.0}}),
                      orjson.dumps({"stream": "btcusdt@depth@100ms", "data": ev})):
            lv.fake.inject(frame)
        wait_for(lambda: lv.svc.router.stats["bad_messages"] >= 7, 10, "the garbage to be counted")
        after = lv.books_after(mark, n=30)
        svc, fake, msgs = lv.svc, lv.fake, lv.tap.since(mark, "BTCUSDT")
    assert svc.router.m.decode_errors == {"malformed_json": 2, "unknown_stream": 2, "not_combined_stream": 1,
                                          "bad_fields": 1, "bad_event": 1}
    assert_no_book_while_unsynced(msgs)  # the bad depth event cost a resync, nothing worse
    assert exact_books(fake, after) == []


def test_a_slow_snapshot_leaves_events_buffered_then_applied(tmp_path):
    with Live(tmp_path) as lv:
        lv.fake.snapshot_delay_s = 1.0  # the market moves on while the snapshot travels
        lv.fake.snapshot_events_behind = 60  # by at least 60 events, whatever the machine's load
        books = lv.books_after(0, n=10)
        fake = lv.fake
    snap_id = fake.requests[0]["lastUpdateId"]
    first = books[0]
    # ≥ 60 events (~1 s at 25x is ~250), buffered meanwhile and applied on top of the snapshot
    piled_up = [u for u, _ in fake.emitted["BTCUSDT"] if snap_id < u <= first.update_id]
    assert len(piled_up) >= 50
    assert exact_books(fake, books) == []


def test_a_snapshot_older_than_the_buffer_is_fetched_again(tmp_path):
    fake = FakeBinance({"BTCUSDT": SPOT_CAPTURE}, speed=25)
    with fake:
        stale_id = wait_for(lambda: fake.last_update_id("BTCUSDT") > 0 and fake.serve_stale_snapshots(1), 5,
                            "a snapshot to keep")
        wait_for(lambda: fake.last_update_id("BTCUSDT") > stale_id, 10, "the market to move on")
        cfg = live_config(tmp_path, fake, QF_SYMBOLS="btcusdt")
        tap = Tap(cfg.bus.md_pub)
        try:
            with ServiceThread(cfg):
                books = tap.wait_books("BTCUSDT", 20)
        finally:
            tap.close()
    got = [r["lastUpdateId"] for r in fake.requests if r["status"] == 200]
    assert got[0] == stale_id and len(got) >= 2 and got[1] > stale_id
    assert books[0].update_id >= got[1] and exact_books(fake, books) == []


def test_429_and_418_are_honoured_with_retry_after(tmp_path):
    fake = FakeBinance({"BTCUSDT": SPOT_CAPTURE}, speed=25)
    fake.rest_error(429, 0.6)
    fake.rest_error(418, 0.9)
    with fake:
        cfg = live_config(tmp_path, fake, QF_SYMBOLS="btcusdt")
        with ServiceThread(cfg) as svc:
            wait_for(lambda: svc.router.state["BTCUSDT"] == "SYNCED", 20, "a synced book")
            counts = dict(svc.router.m.snapshots)
    r = fake.requests
    assert [x["status"] for x in r[:3]] == [429, 418, 200]
    assert r[1]["t"] - r[0]["t"] >= 0.6 and r[2]["t"] - r[1]["t"] >= 0.9
    assert counts == {("spot", "http_429"): 1, ("spot", "http_418"): 1, ("spot", "ok"): 1}


def test_a_silent_connection_is_replaced_by_the_watchdog(tmp_path):
    with Live(tmp_path, QF_MD_WATCHDOG_S="0.5") as lv:
        lv.books_after(0, n=20)
        mark = lv.tap.mark()
        lv.fake.silent = True
        wait_for(lambda: lv.fake.connections >= 2, 10, "the watchdog to reconnect")
        lv.fake.silent = False
        after = lv.books_after(mark, n=20)
        msgs = lv.tap.since(mark, "BTCUSDT")
        fake = lv.fake
    disconnects = [m for m in msgs if m.TYPE == "md_status" and m.state == "DISCONNECTED"]
    assert disconnects and "silent" in disconnects[0].detail
    assert_no_book_while_unsynced(msgs)
    assert exact_books(fake, after) == []


def test_unreachable_binance_is_retried_with_backoff_and_said(tmp_path):
    from tests.conftest import free_port
    port = free_port()  # nothing listens there
    cfg = qfconfig.load(tcp_env(tmp_path, QF_FEED="live", QF_BINANCE_WS=f"ws://127.0.0.1:{port}",
                                QF_BINANCE_REST=f"http://127.0.0.1:{port}", QF_MD_BACKOFF_MAX_S="0.2"))
    tap = Tap(cfg.bus.md_pub)
    try:
        with ServiceThread(cfg) as svc:
            link = wait_for(lambda: svc.feed is not None and svc.feed.links[Market.SPOT], 5, "the feed")
            wait_for(lambda: link.backoff.attempt >= 3, 10, "several attempts")
            wait_for(lambda: "DISCONNECTED" in tap.states("BTCUSDT"), 5, "a DISCONNECTED status")
        assert tap.books("BTCUSDT") == [] and svc.router.state["BTCUSDT"] == "DISCONNECTED"
        assert "Connect" in svc.router.state_detail["BTCUSDT"] or "refused" in svc.router.state_detail["BTCUSDT"]
    finally:
        tap.close()


@pytest.mark.parametrize("both", [False, True])
def test_usdm_symbols_use_fapi_snapshots_and_their_own_topics(tmp_path, both):
    usdm = FakeBinance({"BTCUSDT": USDM_CAPTURE}, market="usdm", speed=25)
    spot = FakeBinance({"BTCUSDT": SPOT_CAPTURE}, speed=25)
    with usdm, spot:
        cfg = live_config(tmp_path, spot, usdm, QF_SYMBOLS="btcusdt,usdm:btcusdt" if both else "usdm:btcusdt")
        tap = Tap(cfg.bus.md_pub)
        try:
            with ServiceThread(cfg) as svc:
                fut = tap.wait_books("USDM:BTCUSDT", 40)
                if both:
                    sp = tap.wait_books("BTCUSDT", 40)
                weights = dict(svc.router.m.snapshot_weight)
        finally:
            tap.close()
    assert exact_books(usdm, fut) == []
    assert all(b.symbol == "USDM:BTCUSDT" for b in fut)
    assert [r["status"] for r in usdm.requests] == [200]  # the fake answers 404 off /fapi/v1/depth
    assert weights["usdm"] == 20  # limit 1000 on /fapi/v1/depth
    if both:
        assert exact_books(spot, sp) == [] and spot.connections == usdm.connections == 1
        assert weights["spot"] == 50
    else:
        assert spot.connections == 0
