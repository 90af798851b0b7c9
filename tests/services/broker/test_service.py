"""BrokerService over real ZeroMQ sockets and a real SQLite file, zero latency: fills, idempotency, cancels."""
from __future__ import annotations

import logging
import time
from decimal import Decimal as D

import msgpack
import pytest
import zmq
from prometheus_client import REGISTRY

from services.broker.service import BrokerService
from shared import messages
from shared.bus import Subscriber
from shared.config import load
from shared.enums import OrderKind, OrderStatus, Side, TimeInForce
from shared.messages import Ack, Cancel, Error, Fill, Heartbeat, OrderEvent, OrderRequest

ASKS = [[100.5, 0.4], [101.0, 0.5], [102.0, 10.0]]
BIDS = [[100.0, 0.3], [99.0, 2.0]]


def order(coid: str, qty: str = "1.0", side=Side.BUY, kind=OrderKind.MARKET, price=None,
          tif=TimeInForce.GTC, symbol="BTCUSDT") -> OrderRequest:
    return OrderRequest(ts=1, client_order_id=coid, strategy="test", symbol=symbol, side=side, kind=kind,
                        qty=D(qty), price=None if price is None else D(price), tif=tif)


@pytest.fixture
def broker(cfg, runner, md_pub, make_book, feed):
    """A running broker that has seen the hand-made book."""
    svc = runner.start(BrokerService(cfg))
    feed(md_pub, make_book(bids=BIDS, asks=ASKS), lambda: "BTCUSDT" in svc.books)
    return svc


@pytest.fixture
def client(cfg, clients):
    return clients(cfg.bus.broker_rep)


@pytest.fixture
def events(cfg, wait_until):
    """A SUB on broker_pub, live (a heartbeat came through) before the test sends anything."""
    sub = Subscriber(cfg.bus.broker_pub, ["fill.", "order.", "heartbeat."], cfg.bus.hwm)
    received: list = []

    def pump() -> list:
        while sub.sock.poll(0):
            received.append(sub.recv()[1])
        return received
    sub.pump = pump
    try:
        yield sub
    finally:
        sub.close()


def live(sub, wait_until) -> None:
    wait_until(lambda: any(isinstance(m, Heartbeat) for m in sub.pump()), "a broker heartbeat")


def test_market_buy_walks_the_book_at_exact_vwap_and_fee(broker, client, cfg, events, wait_until, db_rows):
    live(events, wait_until)
    ack = client.request(order("m1", "1.0"))
    assert isinstance(ack, Ack)
    assert (ack.status, ack.filled_qty, ack.avg_price) == (OrderStatus.FILLED, D("1.0"), D("100.9"))
    assert [(str(f.price), str(f.qty), str(f.fee)) for f in ack.fills] == [
        ("100.5", "0.4", "0.0402"), ("101", "0.5", "0.0505"), ("102", "0.1", "0.0102")]
    assert sum(f.fee for f in ack.fills) == D("0.1009")  # 100.9 notional * 0.001
    assert len({f.fill_id for f in ack.fills}) == 3
    rows = db_rows(cfg.common.db, "SELECT price, qty, fee, fee_asset, liquidity FROM fills ORDER BY fill_id")
    assert rows == [("100.5", "0.4", "0.0402", "USDT", "TAKER"), ("101", "0.5", "0.0505", "USDT", "TAKER"),
                    ("102", "0.1", "0.0102", "USDT", "TAKER")]
    assert db_rows(cfg.common.db, "SELECT status, filled_qty, avg_price FROM orders") == [("FILLED", "1.0", "100.9")]
    cash = D("10000") - D("100.9") - D("0.1009")
    snapshots = db_rows(cfg.common.db, "SELECT cash, equity FROM equity WHERE note != 'periodic'")
    assert snapshots == [(str(cash), str(cash + D("100.25")))]
    def trading_events():
        return [m for m in events.pump() if isinstance(m, (Fill, OrderEvent))]
    got = wait_until(lambda: len(trading_events()) >= 4 and trading_events(), "fill and order events")
    assert [type(m).__name__ for m in got] == ["Fill", "Fill", "Fill", "OrderEvent"]
    assert [m.fill_id for m in got[:3]] == [f.fill_id for f in ack.fills]
    assert (got[3].status, got[3].filled_qty, got[3].avg_price) == (OrderStatus.FILLED, D("1.0"), D("100.9"))


def test_market_sell_walks_bids_and_cancels_the_rest(broker, client):
    ack = client.request(order("s1", "3", side=Side.SELL))
    assert (ack.status, ack.filled_qty, ack.reason) == (OrderStatus.CANCELLED, D("2.3"), "IOC_REMAINDER")
    assert [(str(f.price), str(f.qty)) for f in ack.fills] == [("100", "0.3"), ("99", "2")]


def test_fills_are_committed_before_the_reply(broker, client, cfg, db_rows):
    # Read from a separate connection right as each reply arrives: what a
    # crash at that instant would leave behind.
    for i in range(20):
        ack = client.request(order(f"c{i}", "0.01"))
        stored = db_rows(cfg.common.db, "SELECT fill_id FROM fills WHERE client_order_id = ?", f"c{i}")
        assert sorted(r[0] for r in stored) == sorted(f.fill_id for f in ack.fills) and stored
        assert db_rows(cfg.common.db, "SELECT status FROM orders WHERE client_order_id = ?", f"c{i}") == [("FILLED",)]


def test_fill_events_are_published_only_after_commit(broker, client, cfg, events, wait_until, db_rows):
    live(events, wait_until)
    client.request(order("p1", "0.5"))
    fills = wait_until(lambda: [m for m in events.pump() if isinstance(m, Fill)], "a fill event")
    for fill in fills:
        assert db_rows(cfg.common.db, "SELECT 1 FROM fills WHERE fill_id = ?", fill.fill_id) == [(1,)]


def test_repeated_client_order_id_returns_the_first_answer(broker, client, cfg, db_rows):
    first = client.request(order("dup", "0.5"))
    again = client.request(order("dup", "0.5"))
    different = client.request(order("dup", "7", side=Side.SELL))  # same key, other content: still the first
    assert first == again == different
    assert db_rows(cfg.common.db, "SELECT COUNT(*) FROM fills") == [(2,)]
    assert db_rows(cfg.common.db, "SELECT COUNT(*) FROM orders") == [(1,)]


def test_idempotent_across_a_restart_on_the_same_database(cfg, env, runner, md_pub, make_book, feed, clients,
                                                          db_rows):
    first_svc = runner.start(BrokerService(cfg))
    feed(md_pub, make_book(bids=BIDS, asks=ASKS), lambda: "BTCUSDT" in first_svc.books)
    first = clients(cfg.bus.broker_rep).request(order("r1", "0.6"))
    runner.stop(first_svc)

    # new endpoints, same database file
    cfg2 = load({**env, "QF_BROKER_REP": cfg.bus.broker_rep + "-2", "QF_BROKER_PUB": cfg.bus.broker_pub + "-2"})
    second_svc = runner.start(BrokerService(cfg2))
    feed(md_pub, make_book(bids=[[49.5, 1.0]], asks=[[50.0, 100.0]]), lambda: "BTCUSDT" in second_svc.books)
    c2 = clients(cfg2.bus.broker_rep)
    assert c2.request(order("r1", "0.6")) == first
    assert db_rows(cfg.common.db, "SELECT COUNT(*) FROM fills") == [(2,)]
    # the rebuilt account continues from the first run's cash
    assert second_svc.desk.account.cash == D("10000") - D("60.4") - D("0.0604")
    fresh = c2.request(order("r2", "1"))
    assert fresh.avg_price == D("50") and fresh.order_id != first.order_id


def test_no_book_rejects_and_is_idempotent(cfg, runner, clients):
    runner.start(BrokerService(cfg))
    c = clients(cfg.bus.broker_rep)
    ack = c.request(order("nb", "1", symbol="ETHUSDT"))
    assert (ack.status, ack.reason, ack.fills) == (OrderStatus.REJECTED, "NO_BOOK", [])
    assert c.request(order("nb", "1", symbol="ETHUSDT")) == ack


def test_invalid_orders_are_rejected_not_crashed(broker, client):
    assert client.request(order("z", "0")).reason == "BAD_ORDER"
    assert client.request(order("lim", "1", kind=OrderKind.LIMIT)).reason == "BAD_ORDER"
    assert client.request(order("q", "1", symbol="BTCXYZ")).reason == "BAD_ORDER"
    assert client.request(order("ok", "0.1")).status is OrderStatus.FILLED


def test_cancel_of_a_filled_market_order_answers_its_stored_state(broker, client):
    filled = client.request(order("mc", "0.2"))
    ack = client.request(Cancel(ts=2, client_order_id="mc"))
    assert (ack.status, ack.order_id, ack.filled_qty, ack.reason) == (
        OrderStatus.FILLED, filled.order_id, D("0.2"), "not open")
    unknown = client.request(Cancel(ts=2, client_order_id="nope"))
    assert isinstance(unknown, Error) and unknown.code == "UNKNOWN_ORDER"


def test_resting_limit_order_fills_on_a_later_book_and_cancels(broker, client, md_pub, make_book, feed, cfg,
                                                               wait_until, db_rows):
    rest = client.request(order("g1", "1.0", kind=OrderKind.LIMIT, price="100.6"))
    assert (rest.status, rest.filled_qty) == (OrderStatus.PARTIALLY_FILLED, D("0.4"))
    feed(md_pub, make_book(bids=BIDS, asks=[[100.6, 0.25], [100.7, 9.0]]),
         lambda: broker.open["g1"].filled_qty == D("0.65"), "the resting order to fill on the new book")
    ack = client.request(Cancel(ts=3, client_order_id="g1"))
    assert (ack.status, ack.filled_qty, ack.reason) == (OrderStatus.CANCELLED, D("0.65"), "CANCELLED_BY_CLIENT")
    assert len(ack.fills) == 2 and "g1" not in broker.open
    assert db_rows(cfg.common.db, "SELECT status, filled_qty FROM orders") == [("CANCELLED", "0.65")]
    again = client.request(Cancel(ts=4, client_order_id="g1"))
    assert (again.status, again.reason) == (OrderStatus.CANCELLED, "not open")


def test_open_orders_survive_a_restart(cfg, env, runner, md_pub, make_book, feed, clients):
    svc = runner.start(BrokerService(cfg))
    feed(md_pub, make_book(bids=BIDS, asks=ASKS), lambda: "BTCUSDT" in svc.books)
    clients(cfg.bus.broker_rep).request(order("keep", "2", side=Side.SELL, kind=OrderKind.LIMIT, price="105"))
    runner.stop(svc)
    cfg2 = load({**env, "QF_BROKER_REP": cfg.bus.broker_rep + "-2", "QF_BROKER_PUB": cfg.bus.broker_pub + "-2"})
    svc2 = runner.start(BrokerService(cfg2))
    assert svc2.open["keep"].status is OrderStatus.PENDING
    feed(md_pub, make_book(bids=[[105.5, 1.0], [105.0, 5.0]], asks=[[106.0, 1.0]]),
         lambda: "keep" not in svc2.open, "the rebuilt order to fill")
    ack = clients(cfg2.bus.broker_rep).request(order("keep", "2"))
    # the bids that now cross it arrived after it: it sells to them at its own price, as maker
    assert (ack.status, [(f.fill_id, str(f.price), str(f.qty), f.liquidity) for f in ack.fills]) == (
        OrderStatus.FILLED, [(f"{ack.order_id}-1", "105", "2", "MAKER")])


def test_garbage_gets_an_error_and_the_broker_keeps_serving(broker, client, cfg, wait_until):
    for junk in (b"\xc1\x00garbage", msgpack.packb([1, 2, 3]),
                 msgpack.packb({"v": 1, "type": "order", "client_order_id": "g"}),
                 msgpack.packb({"v": 1, "type": "order", "client_order_id": "g", "strategy": "s",
                                "symbol": "BTCUSDT", "side": "BUY", "kind": "MARKET", "qty": 1.5, "ts": 1}),
                 messages.encode(messages.Control(ts=1, action="HALT", by="t"))):
        reply = messages.decode(client.raw(junk), messages.REQUESTS)
        assert isinstance(reply, Error), junk
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(cfg.bus.broker_rep)
    try:
        dealer.send(b"no envelope")  # no empty delimiter: nothing to reply to, only counted
        wait_until(lambda: broker.stats["decode_errors"] >= 6, "the bad envelope to be counted")
    finally:
        dealer.close()
    assert client.request(order("after", "0.1")).status is OrderStatus.FILLED


def _bad_md(svc) -> int:
    return svc.stats.get("bad_market_data", 0) + svc.stats["decode_errors"]


def test_books_it_cannot_trust_and_absurd_orders_each_get_a_typed_answer(broker, client, md_pub, make_book, feed,
                                                                          wait_until):
    # Before: a level at 1e-300 filled at price 0 (InvalidTransition escaped to the loop: no answer),
    # one at 1e300 answered `internal`, a crossed book filled through the mid, and a qty of 9e999999
    # answered `internal` (the Decimal context overflowed).
    good = make_book(bids=BIDS, asks=ASKS)
    hostile = [make_book(bids=[[1e-300, 1.0]], asks=ASKS), make_book(bids=BIDS, asks=[[1e300, 1.0]]),
               make_book(bids=[[110.0, 1.0]], asks=[[90.0, 1.0]]), make_book(bids=BIDS, asks=[[101.0, 1.0], [100.5, 1.0]]),
               make_book(bids=BIDS, asks=[[100.5, 0.0]]), make_book(bids=[[100.0, 1.0]], asks=[[100.0, 1.0]])]
    nan_wire = {**good.to_wire(1), "asks": [[float("nan"), 1.0]]}  # msgpack carries NaN: refused when decoded
    before = REGISTRY.get_sample_value("qf_broker_bad_market_data_total", {"reason": "level_range"}) or 0
    for n, book in enumerate([*hostile, None]):
        seen = _bad_md(broker)
        if book is None:
            md_pub.send_raw(b"book.BTCUSDT", msgpack.packb(nan_wire))
        else:
            md_pub.publish("book.BTCUSDT", book)
        wait_until(lambda: _bad_md(broker) > seen, f"hostile book {n} to be refused")
        if book is None:  # the NaN frame never reached the model: the last (sane) book stands
            break
        for side in (Side.BUY, Side.SELL):
            ack = client.request(order(f"h{n}-{side.value}", "0.5", side=side))
            assert isinstance(ack, Ack) and ack.fills == [], (n, ack)
            assert (ack.status, ack.reason) == (OrderStatus.REJECTED, "BAD_BOOK"), (n, ack)
        feed(md_pub, good, lambda: broker.desk.model.markets["BTCUSDT"].trusted, "the sane book again")
    assert (REGISTRY.get_sample_value("qf_broker_bad_market_data_total", {"reason": "level_range"}) or 0) >= before + 3
    for qty, code in (("9e999999", "bad_field"), ("1e-999999", "bad_field"), ("1" * 70, "bad_field")):
        raw = msgpack.packb({**order("big", "1").to_wire(), "qty": qty})
        reply = messages.decode(client.raw(raw), messages.REQUESTS)
        assert isinstance(reply, Error) and reply.code == code, (qty, reply)
    for coid, qty in (("too-big", "1e13"), ("off-grid", "0.000000001"), ("many-digits", "1" * 25 + ".5")):
        ack = client.request(order(coid, qty))
        assert (ack.status, ack.reason) == (OrderStatus.REJECTED, "BAD_ORDER"), (qty, ack)
    ack = client.request(order("sane", "0.5"))
    assert (ack.status, [(str(f.price), str(f.qty)) for f in ack.fills]) == (OrderStatus.FILLED, [("100.5", "0.4"),
                                                                                              ("101", "0.1")])


def test_a_flood_of_bad_market_data_is_counted_and_logged_at_most_once_a_second(broker, client, md_pub, make_book,
                                                                                 wait_until, caplog):
    # one warning per bad frame used to reach the log: a broken feed at 1,000 frames/s was 1,000 lines/s
    caplog.set_level(logging.WARNING, logger="qf.broker")
    start, seen = time.monotonic(), _bad_md(broker)
    crossed, nan = make_book(bids=[[110.0, 1.0]], asks=[[90.0, 1.0]]), {**make_book().to_wire(1), "mid": float("nan")}
    for _ in range(500):
        md_pub.publish("book.BTCUSDT", crossed)
        md_pub.send_raw(b"book.BTCUSDT", msgpack.packb(nan))
    wait_until(lambda: _bad_md(broker) >= seen + 1000, "the flood to be counted")
    lines = [r for r in caplog.records if r.getMessage() in ("bad_md_frame", "market_data_refused")]
    assert 1 <= len(lines) <= time.monotonic() - start + 2, len(lines)
    assert client.request(order("after-flood", "0.1")).reason == "BAD_BOOK"  # the last book was crossed
