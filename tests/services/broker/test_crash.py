"""kill -9 the broker process 20 times during a replay with a steady order flow: nothing told is ever lost."""
from __future__ import annotations

import dataclasses
import os
import random
import sqlite3
import subprocess
import sys
import threading
import time
from collections import defaultdict
from decimal import Decimal as D

import zmq

from services.broker.replay import market_events
from shared import messages
from shared.bus import Publisher, Subscriber
from shared.config import load
from shared.db import close_db, init_db
from shared.journal import journal_path, recover
from shared.enums import OrderKind, Side, TimeInForce
from shared.messages import Ack, Book, Cancel, Fill, Heartbeat, OrderRequest
from tests.conftest import ROOT, SPOT_CAPTURE, clean_environ, tcp_env, wait_for

KILLS = 20
START_CASH = D("100000")
TICK = D("0.01")


class Replay(threading.Thread):
    """The test's marketdata: the capture's books and trades, looped, stamped with now."""

    def __init__(self, endpoint: str, events: list) -> None:
        super().__init__(daemon=True, name="replay")
        self.pub = Publisher(endpoint, 100_000)
        self.events, self.stop, self.last_book = events, threading.Event(), None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                for i, ev in enumerate(self.events):
                    if self.stop.is_set():
                        break
                    now = time.time_ns()
                    ev = dataclasses.replace(ev, ts=now, recv_ts=now)
                    self.pub.publish(f"{ev.TYPE}.BTCUSDT", ev)
                    if isinstance(ev, Book):
                        self.last_book = ev
                    if i % 5 == 0:
                        self.stop.wait(0.002)  # pacing: at most 2.5k events/s, ~60 times the recorded pace
        finally:
            self.pub.close()


class Listener(threading.Thread):
    """Every fill the broker published, and the pid of the latest heartbeat."""

    def __init__(self, endpoint: str) -> None:
        super().__init__(daemon=True, name="listener")
        self.sub = Subscriber(endpoint, ["fill.", "heartbeat."], 100_000)
        self.fills: dict[str, Fill] = {}
        self.pid, self.stop = None, threading.Event()

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                if self.sub.sock.poll(50):
                    msg = self.sub.recv()[1]
                    if isinstance(msg, Fill):
                        self.fills[msg.fill_id] = msg
                    elif isinstance(msg, Heartbeat):
                        self.pid = msg.pid
        finally:
            self.sub.close()


class OrderFlow(threading.Thread):
    """A steady stream of orders and cancels, each resent (same client_order_id) until answered."""

    def __init__(self, endpoint: str, replay: Replay, seed: int) -> None:
        super().__init__(daemon=True, name="orders")
        self.endpoint, self.replay, self.rng = endpoint, replay, random.Random(seed)
        self.acks: dict[str, Ack] = {}  # latest answer per client_order_id
        self.stop, self.error, self.n = threading.Event(), None, 0
        self.resting: list[str] = []

    def next_request(self):
        self.n += 1
        book, rng = self.replay.last_book, self.rng
        bid, ask = D(repr(book.bids[0][0])), D(repr(book.asks[0][0]))
        side = rng.choice([Side.BUY, Side.SELL])
        qty = D(rng.randint(1, 20)) / 1000
        roll = rng.random()
        if roll < 0.1 and self.resting:
            return Cancel(ts=1, client_order_id=self.resting.pop(rng.randrange(len(self.resting))))
        coid = f"k{self.n}"
        if roll < 0.5:
            return OrderRequest(ts=1, client_order_id=coid, strategy="crash", symbol="BTCUSDT", side=side,
                                kind=OrderKind.MARKET, qty=qty)
        ticks = rng.randint(-3, 3)
        price = (bid if side is Side.BUY else ask) + TICK * (ticks if side is Side.BUY else -ticks)
        tif = TimeInForce.IOC if roll < 0.65 else TimeInForce.GTC
        if tif is TimeInForce.GTC:
            self.resting.append(coid)
        return OrderRequest(ts=1, client_order_id=coid, strategy="crash", symbol="BTCUSDT", side=side,
                            kind=OrderKind.LIMIT, qty=qty, price=price, tif=tif)

    def run(self) -> None:
        ctx = zmq.Context.instance()
        sock = None
        try:
            while not self.stop.is_set():
                req = self.next_request()
                payload = messages.encode(req)
                while not self.stop.is_set():  # Lazy Pirate: same payload on a fresh socket until answered
                    if sock is None:
                        sock = ctx.socket(zmq.REQ)
                        sock.setsockopt(zmq.LINGER, 0)
                        sock.connect(self.endpoint)
                        sock.send(payload)
                    if sock.poll(300):
                        reply = messages.decode(sock.recv(), messages.REQUESTS)
                        assert isinstance(reply, Ack), reply
                        self.acks[reply.client_order_id] = reply
                        sock.close()
                        sock = None
                        break
                    sock.close()
                    sock = None
        except Exception as exc:  # reported by the test
            self.error = exc
        finally:
            if sock is not None:
                sock.close()


def check_database(path: str, told: dict[str, dict]) -> int:
    """With no broker running: integrity_check ok; every told fill stored once, unchanged; orders and
    cash balance. Returns fills stored. What the broker made durable but had not stored yet is in its
    journal: it is stored first, as by any process that opens the journal (risk rebuilding, the next broker)."""
    init_db(path, create=False)
    try:
        assert recover(journal_path(path, ""), wait_s=0)["journal"] == "recovered"  # no broker holds it
    finally:
        close_db()
    con = sqlite3.connect(path, timeout=5)
    try:
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        return check_rows(lambda sql: con.execute(sql).fetchall(), told)
    finally:
        con.close()


def check_rows(rows, told: dict[str, dict]) -> int:
    """check_database's invariants over `rows(sql)` (a list of tuples; tests/services/pg reads a server)."""
    stored = {r[0]: r for r in rows(
        "SELECT fill_id, order_id, client_order_id, side, price, qty, fee FROM fills")}
    for fill_id, f in told.items():
        assert fill_id in stored, f"told fill {fill_id} is not in the database"
        row = stored[fill_id]
        assert (row[2], row[3], D(row[4]), D(row[5]), D(row[6])) == (
            f["client_order_id"], f["side"], D(f["price"]), D(f["qty"]), D(f["fee"])), fill_id
    assert rows("SELECT client_order_id FROM orders GROUP BY client_order_id HAVING COUNT(*) > 1") == []
    per_order = defaultdict(lambda: D(0))
    cash = START_CASH
    for _, order_id, _, side, price, qty, fee in stored.values():
        per_order[order_id] += D(qty)
        cash -= (1 if side == "BUY" else -1) * D(price) * D(qty) + D(fee)
    for order_id, qty, filled, status in rows("SELECT order_id, qty, filled_qty, status FROM orders"):
        assert D(filled) == per_order.pop(order_id, D(0)), order_id
        assert D(0) <= D(filled) <= D(qty)
        assert (status == "FILLED") == (D(filled) == D(qty)), (order_id, status)
        assert status != "PARTIALLY_FILLED" or D(0) < D(filled)
    assert not per_order, f"fills without an order: {list(per_order)[:3]}"
    # the cash of the latest snapshot (one is written with every fill) is what the fills add up to
    last = (rows("SELECT cash FROM equity ORDER BY id DESC LIMIT 1") or [None])[0]
    assert (D(last[0]) if last else START_CASH) == cash, (last, cash)
    return len(stored)


def test_kill_9_twenty_times_loses_nothing_anyone_was_told(tmp_path):
    kill_nine_times(tmp_path)


def kill_nine_times(tmp_path, check=check_database, **extra: str) -> None:
    """The test above, with `extra` QF_ settings over its own and `check(QF_DB, told fills)` after each kill
    (tests/services/pg: QF_DB=postgresql://…, checked on the server)."""
    settings = tcp_env(tmp_path, QF_SYMBOLS="btcusdt", QF_BROKER_LATENCY_MODE="constant", QF_BROKER_LATENCY_MS="2",
                       QF_BROKER_EQUITY_S="0.2", QF_HEARTBEAT_MS="50", QF_START_CASH=str(START_CASH),
                       QF_LOG_LEVEL="WARNING", **extra)
    cfg = load(settings)
    env = {**clean_environ(), **settings, "PYTHONPATH": ROOT}
    events = list(market_events(SPOT_CAPTURE, "BTCUSDT"))
    rng = random.Random(20240808)
    replay, listener = Replay(cfg.bus.md_pub, events), Listener(cfg.bus.broker_pub)
    flow = OrderFlow(cfg.bus.broker_rep, replay, seed=7)
    procs: list[subprocess.Popen] = []

    def start_broker() -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", "services.cli", "broker"], env=env, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        procs.append(proc)
        wait_for(lambda: listener.pid == proc.pid or proc.poll() is not None, 30, "the broker's heartbeat")
        assert proc.poll() is None, f"broker exited with {proc.returncode}"
        return proc

    replay.start()
    listener.start()
    try:
        wait_for(lambda: replay.last_book is not None, 10, "the replay")
        proc = start_broker()
        flow.start()
        counts = []
        for kill in range(KILLS):
            answered = len(flow.acks)
            wait_for(lambda: len(flow.acks) > answered or flow.error, 20, "orders answered by this broker")
            flow.stop.wait(rng.uniform(0.0, 0.3))  # a random moment, not a synchronisation
            proc.kill()  # SIGKILL: no handler, no flush, no goodbye
            proc.wait(10)
            told = {fid: f.to_wire() for fid, f in listener.fills.items()}
            for ack in list(flow.acks.values()):
                told.update((f.fill_id, f.to_wire()) for f in ack.fills)
            counts.append((len(told), check(cfg.common.db, told)))
            proc = start_broker()
        assert flow.error is None, flow.error
        answered = len(flow.acks)
        wait_for(lambda: len(flow.acks) > answered + 5, 20, "the last broker to serve")
    finally:
        flow.stop.set()
        replay.stop.set()
        listener.stop.set()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        for t in (flow, replay, listener):
            if t.is_alive():
                t.join(10)
    assert flow.error is None, flow.error
    told = {fid: f.to_wire() for fid, f in listener.fills.items()}
    for ack in flow.acks.values():
        told.update((f.fill_id, f.to_wire()) for f in ack.fills)
    stored = check(cfg.common.db, told)
    assert len(counts) == KILLS and stored >= len(told) > 100, (counts, stored, len(told))
    assert len(flow.acks) > 200 and ("://" in cfg.common.db or os.path.exists(cfg.common.db))
