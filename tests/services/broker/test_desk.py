"""BrokerDesk without sockets: a FillModel, a journal and a SQLite file; replies and events caught in lists."""
from __future__ import annotations

import os
import sqlite3
from decimal import Decimal as D

import pytest

from services.broker import store
from services.broker.core import Account
from services.broker.desk import BrokerDesk
from services.broker.fill_model import FillModel
from services.broker.keeper import STORE_UNAVAILABLE, StoreKeeper
from services.broker.latency import LatencyModel
from services.broker.queue import make_queue_model
from shared.alerts import Alerter
from shared.db import close_db, init_db
from shared.enums import OrderKind, OrderStatus, Side
from shared.journal import Journal
from shared.messages import Ack, Book, Error, OrderRequest

MS = 1_000_000
T0 = 1_000 * MS  # the desk's clock is passed in: any ns will do
LATENCY_MS = 5


def _book() -> Book:
    return Book(ts=T0, symbol="BTCUSDT", exch_ts=0, update_id=1, bids=[[100.0, 1.0]], asks=[[100.5, 0.4], [101.0, 2.0]],
                mid=100.25, spread=0.5, spread_bps=49.9, imbalance=0.0, microprice=100.25, recv_ts=0)


def _order(coid: str, qty: str = "0.3", kind: OrderKind = OrderKind.MARKET, price: str | None = None) -> OrderRequest:
    return OrderRequest(ts=T0, client_order_id=coid, strategy="t", symbol="BTCUSDT", side=Side.BUY, kind=kind,
                        qty=D(qty), price=None if price is None else D(price))


class Bench:
    """A desk on its own: `replies` [(waiter, message)], `events` [(topic, message)], `now` its clock."""

    def __init__(self, tmp_path, known: store.KnownIds | None = None, account: Account | None = None) -> None:
        self.db = str(tmp_path / "desk.db")
        init_db(self.db)
        self.journal = Journal(self.db + ".broker-journal")
        self.stats: dict = {}
        self.keeper = StoreKeeper(self.journal, self.db, Alerter("broker"), self.stats)
        self.model = FillModel(D("0.001"), D("0.001"), make_queue_model("power", 2),
                               LatencyModel("constant", LATENCY_MS), symbols=["BTCUSDT"])
        self.now = T0
        self.replies: list = []
        self.events: list = []
        self.desk = BrokerDesk(self.model, account or Account(D(10000)), known or store.KnownIds(), self.keeper,
                               self.stats, lambda: self.now, lambda w, m: self.replies.append((w, m)),
                               lambda evs: self.events.extend((t, m) for t, m, _ in evs))
        self.desk.process(self.model.on_book(_book(), self.now))

    def advance(self, ms: float) -> None:
        self.now += int(ms * MS)
        self.desk.advance(self.now)

    def close(self) -> None:
        self.journal.close()
        close_db()


@pytest.fixture
def bench(tmp_path):
    b = Bench(tmp_path)
    try:
        yield b
    finally:
        b.close()


def _rows(db: str, sql: str) -> list:
    con = sqlite3.connect(db)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def test_an_order_is_answered_after_the_latency_once_durable_then_published(bench):
    bench.desk.place("w1", _order("a"), bench.now)
    assert bench.replies == [] and bench.desk.model.pending == 1  # in flight: nothing told yet
    bench.advance(LATENCY_MS - 1)
    assert bench.replies == []
    bench.advance(1)
    [(waiter, ack)] = bench.replies
    assert waiter == "w1" and isinstance(ack, Ack)
    assert (ack.client_order_id, ack.status, ack.filled_qty) == ("a", OrderStatus.FILLED, D("0.3"))
    assert [(f.price, f.qty) for f in ack.fills] == [(D("100.5"), D("0.3"))]
    assert len(bench.journal.pending) == 1  # durable in the journal before the answer, SQLite later
    assert [t for t, _ in bench.events] == ["fill.BTCUSDT", "order.BTCUSDT"]  # after the answer
    assert bench.stats["orders"] == 1 and bench.stats["fills"] == 1
    assert bench.keeper.store(force=True) and not bench.journal.pending
    assert _rows(bench.db, "SELECT client_order_id, status FROM orders") == [("a", "FILLED")]
    assert _rows(bench.db, "SELECT price, qty FROM fills") == [("100.5", "0.3")]


def test_a_repeated_client_order_id_is_answered_from_the_cache_never_run_twice(bench):
    bench.desk.place("w1", _order("a"), bench.now)
    bench.desk.place("w2", _order("a"), bench.now)  # a retry while in flight: waits for the same answer
    bench.advance(LATENCY_MS)
    assert [w for w, _ in bench.replies] == ["w1", "w2"] and bench.replies[0][1] is bench.replies[1][1]
    first = bench.replies[0][1]
    bench.desk.place("w3", _order("a"), bench.now)  # a retry after the answer: the cached one, at once
    assert bench.replies[-1] == ("w3", first)
    assert bench.desk.model.pending == 0 and len(bench.journal.pending) == 1 and bench.stats["orders"] == 1


def test_a_repeat_after_a_restart_is_answered_from_the_journal_and_the_database(tmp_path):
    first = Bench(tmp_path)
    try:
        first.desk.place("w1", _order("a"), first.now)
        first.advance(LATENCY_MS)
        ack = first.replies[0][1]
        first.desk.place("w2", _order("b", "0.1"), first.now)
        first.advance(LATENCY_MS)
        assert first.keeper.store(force=True)
        first.desk.place("w3", _order("c", "0.1"), first.now)
        first.advance(LATENCY_MS)  # "c" stays in the journal only
    finally:
        first.close()
    second = Bench(tmp_path, known=None)
    try:
        second.desk.known = store.known_ids()  # as rebuild() makes it: "a" and "b" are stored
        second.desk.known.add("c")
        second.desk.place("again", _order("a"), second.now)
        assert second.replies[-1][1] == ack and second.desk.model.pending == 0
        # the journal's unstored record ("c") is found too, before the database has it
        second.desk.place("again-c", _order("c", "0.1"), second.now)
        reply = second.replies[-1][1]
        assert isinstance(reply, Ack) and reply.client_order_id == "c" and reply.status is OrderStatus.FILLED
        assert second.desk.model.pending == 0
    finally:
        second.close()


def test_a_cancel_of_a_finished_order_says_not_open_and_of_an_unknown_one_unknown_order(bench):
    bench.desk.place("w1", _order("a"), bench.now)
    bench.advance(LATENCY_MS)
    filled = bench.replies[-1][1]
    bench.desk.cancel("c1", "a", bench.now)
    reply = bench.replies[-1]
    assert reply[0] == "c1" and isinstance(reply[1], Ack)
    assert (reply[1].status, reply[1].reason, reply[1].fills) == (OrderStatus.FILLED, "not open", filled.fills)
    bench.desk.cancel("c2", "nobody", bench.now)
    assert isinstance(bench.replies[-1][1], Error) and bench.replies[-1][1].code == "UNKNOWN_ORDER"


def test_a_resting_order_is_cancelled_after_the_latency(bench):
    bench.desk.place("w1", _order("r", "0.1", OrderKind.LIMIT, "99"), bench.now)
    bench.advance(LATENCY_MS)
    assert bench.replies[-1][1].status is OrderStatus.PENDING
    bench.desk.cancel("c1", "r", bench.now)
    assert len(bench.replies) == 1  # takes effect at the exchange first
    bench.advance(LATENCY_MS)
    assert bench.replies[-1][0] == "c1" and bench.replies[-1][1].status is OrderStatus.CANCELLED


def test_a_journal_that_refuses_a_record_freezes_the_desk_until_a_probe_rebuilds_it(bench):
    bench.desk.place("w1", _order("boom"), bench.now)
    good = bench.journal.fd
    full = os.open("/dev/full", os.O_WRONLY)
    try:
        bench.journal.fd = full  # every write fails with ENOSPC
        bench.advance(LATENCY_MS)
        [(waiter, refused)] = bench.replies  # the order in flight: refused, never told as done
        assert waiter == "w1" and isinstance(refused, Error) and refused.code == STORE_UNAVAILABLE
        assert bench.keeper.health.frozen and bench.stats["commit_failures"] == 1 and not bench.events
        bench.desk.place("w2", _order("next"), bench.now)  # refused at once: nothing of it kept
        assert bench.replies[-1][1].code == STORE_UNAVAILABLE and bench.desk.model.pending == 0
        bench.keeper.probe(lambda: pytest.fail("no reload while the journal refuses"))
        assert bench.keeper.health.down
    finally:
        bench.journal.fd = good
        os.close(full)
    reloaded = []
    bench.keeper.probe(lambda: reloaded.append(1))
    assert reloaded == [1] and not bench.keeper.health.down


def test_the_keeper_stores_when_the_policy_says_and_a_failed_store_is_an_outage(bench):
    bench.desk.place("w1", _order("a"), bench.now)
    bench.advance(LATENCY_MS)
    assert not bench.keeper.store()  # one fresh record: waits for an idle turn, more records or age
    assert bench.keeper.store(idle=True) and not bench.journal.pending
    con = sqlite3.connect(bench.db)
    con.execute("CREATE TRIGGER refuse BEFORE INSERT ON fills BEGIN SELECT RAISE(ABORT, 'disk says no'); END")
    con.commit()
    bench.desk.place("w2", _order("b", "0.1"), bench.now)
    bench.advance(LATENCY_MS)
    assert isinstance(bench.replies[-1][1], Ack)  # durable in the journal: answered
    assert not bench.keeper.store(idle=True)
    assert bench.keeper.health.down and not bench.keeper.health.frozen and bench.stats["store_failures"] == 1
    assert bench.keeper.describe()["store"] == "unavailable"
    con.execute("DROP TRIGGER refuse")
    con.commit()
    con.close()
    bench.keeper.probe(lambda: pytest.fail("not frozen: nothing to rebuild"))
    assert not bench.keeper.health.down and not bench.journal.pending
    assert _rows(bench.db, "SELECT client_order_id FROM orders ORDER BY created_ts") == [("a",), ("b",)]
