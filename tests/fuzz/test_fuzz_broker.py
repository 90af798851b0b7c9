"""Fuzz a running broker process: hostile frames at its ROUTER, hostile events on the md PUB it reads;
every request answered, no exit, no stall, and its database exact afterwards."""
from __future__ import annotations

import random
import sqlite3
import subprocess
import sys
import threading
from collections import defaultdict
from decimal import Context, Decimal as D, localcontext

import msgpack
import zmq

from services.broker import core
from shared import messages
from shared.bus import Publisher, Subscriber
from shared.config import load
from shared.errors import DecodeError
from shared.messages import Ack, Book, Error, Fill, Heartbeat, Trade
from tests.conftest import ROOT, clean_environ, journal_stored, tcp_env, stop_process, wait_for
from tests.fuzz.seeded import HOSTILE_DECIMALS, HOSTILE_FLOATS, HOSTILE_INTS, FuzzRun, hostile_value, mutate

START_CASH = D("100000")
SYMBOL = "BTCUSDT"
ANSWER_S = 5.0  # bound on each answer (the broker's own latency here is 1 ms)
ROUTER_FRAMES, ENVELOPES, MD_EVENTS, ORDER_EVERY = 8000, 600, 16000, 20
DECODE_CODES = {"oversized", "bad_msgpack", "not_a_map", "bad_version", "unknown_type", "missing_field", "bad_field",
                "unexpected_type", "UNKNOWN_ORDER", "STORE_UNAVAILABLE"}  # never "internal": an exception escaped
ACK_REASONS = {"", core.NO_BOOK, core.BAD_BOOK, core.NO_LIQUIDITY, core.IOC_REMAINDER, core.BAD_ORDER,
               core.NOT_OPEN, core.CANCELLED_BY_CLIENT}
FINAL_ASK, FINAL_BID = 123.45678, 123.0  # a book no storm event shows: the honest order after it fills on it


def book_wire(rng: random.Random, n: int) -> dict:
    """A sane book around 100 (its levels vary, so liquidity comes back)."""
    bid = 100 - rng.randrange(0, 5) / 100
    ask = bid + rng.randrange(1, 5) / 100
    bids = [[round(bid - i / 100, 2), rng.randrange(1, 300) / 100] for i in range(rng.randrange(0, 5))]
    asks = [[round(ask + i / 100, 2), rng.randrange(1, 300) / 100] for i in range(rng.randrange(0, 5))]
    return Book(ts=n, symbol=SYMBOL, exch_ts=1_700_000_000_000 + n, update_id=n, bids=bids, asks=asks, mid=100.0,
                spread=0.01, spread_bps=1.0, imbalance=0.0, microprice=100.0, recv_ts=n).to_wire()


def trade_wire(rng: random.Random, n: int) -> dict:
    return Trade(ts=n, symbol=SYMBOL, exch_ts=1_700_000_000_000 + n, trade_id=n,
                 price=D(100) + D(rng.randrange(-8, 8)) / 100, qty=D(rng.randrange(1, 200)) / 100,
                 buyer_is_maker=rng.random() < 0.5, recv_ts=n).to_wire()


def order_wire(rng: random.Random, coid: str) -> dict:
    """A sane order: market, IOC or GTC limit near the book."""
    kind = rng.choice(["MARKET", "LIMIT", "LIMIT"])
    wire = {"v": 1, "type": "order", "ts": 1, "client_order_id": coid, "strategy": "fuzz", "symbol": SYMBOL,
            "side": rng.choice(["BUY", "SELL"]), "kind": kind, "qty": str(D(rng.randrange(1, 150)) / 100)}
    if kind == "LIMIT":
        wire["price"] = str(D(100) + D(rng.randrange(-6, 7)) / 100)
        wire["tif"] = rng.choice(["GTC", "IOC"])
    return wire


def hostile_level(rng: random.Random) -> list:
    roll = rng.random()
    if roll < 0.6:
        return [rng.choice(HOSTILE_FLOATS + [100.0, 100.5, 99.5]), rng.choice(HOSTILE_FLOATS + [1.0, 0.5])]
    if roll < 0.8:
        return [rng.choice(HOSTILE_INTS), 1.0]
    return rng.choice([[1.0], [1.0, 2.0, 3.0], ["1", "2"], None, [None, 1.0]])


def md_event(rng: random.Random, n: int) -> tuple[str, list[bytes]]:
    """One event for the md PUB: (class, frames)."""
    roll = rng.randrange(14)
    topic = f"book.{SYMBOL}".encode()
    if roll <= 2:
        return "md.book_sane", [topic, msgpack.packb(book_wire(rng, n))]
    wire = book_wire(rng, n)
    if roll == 3:  # crossed or locked
        wire["bids"], wire["asks"] = [[100.1, 1.0]], [[rng.choice([100.1, 100.0, 90.0]), 1.0]]
        cls = "md.book_crossed"
    elif roll == 4:  # worst first, or one price twice
        side = rng.choice(["bids", "asks"])
        wire[side] = [[100.2, 1.0], [100.2, 2.0]] if rng.random() < 0.5 else list(reversed(
            [[100 + i / 10, 1.0] for i in range(3)] if side == "asks" else [[100 - i / 10, 1.0] for i in range(3)]))
        cls = "md.book_unsorted"
    elif roll == 5:  # hostile floats and shapes in the levels (NaN, inf, 1e-300, 1e300, ints, short levels)
        wire[rng.choice(["bids", "asks"])] = [hostile_level(rng) for _ in range(rng.randrange(1, 4))]
        cls = "md.book_hostile_levels"
    elif roll == 6:
        wire["exch_ts"] = rng.choice(HOSTILE_INTS)
        cls = "md.book_exch_ts"
    elif roll == 7:
        wire["symbol"] = rng.choice([f"X{n}USDT", "", "x" * 300, "ETHUSDT", "btcusdt"])
        cls = "md.book_other_symbol"
    elif roll == 8:
        wire = mutate(rng, wire, rng.randrange(1, 4))
        cls = "md.book_mutated"
    elif roll == 9:
        return "md.trade_sane", [f"trade.{SYMBOL}".encode(), msgpack.packb(trade_wire(rng, n))]
    elif roll == 10:
        t = trade_wire(rng, n)
        key = rng.choice(["price", "qty", "exch_ts", "price"])
        t[key] = rng.choice(HOSTILE_INTS) if key == "exch_ts" else rng.choice(HOSTILE_DECIMALS)
        return "md.trade_hostile", [f"trade.{SYMBOL}".encode(), msgpack.packb(t)]
    elif roll == 11:
        return "md.trade_mutated", [f"trade.{SYMBOL}".encode(), msgpack.packb(mutate(rng, trade_wire(rng, n)))]
    elif roll == 12:
        return "md.random_bytes", [topic, rng.randbytes(rng.randrange(0, 200))]
    else:
        frames = rng.choice([[topic], [topic, msgpack.packb(wire), b"extra"], [topic, msgpack.packb([1, 2])],
                             [topic, msgpack.packb({**wire, "type": rng.choice(["fill", "order", "ack", "x"])})]])
        return "md.wrong_frames_or_type", frames
    return cls, [topic, msgpack.packb(wire)]


class Broker:
    """The broker as an OS process on loopback TCP, and what it told: acks (latest per
    client_order_id), fills (from acks and fill.* events), its heartbeats' stats."""

    def __init__(self, tmp_path) -> None:
        self.settings = tcp_env(tmp_path, QF_SYMBOLS="btcusdt,ethusdt", QF_BROKER_LATENCY_MODE="constant",
                                QF_BROKER_LATENCY_MS="1", QF_HEARTBEAT_MS="100", QF_START_CASH=str(START_CASH),
                                QF_BROKER_TAKER_FEE="0.001", QF_BROKER_MAKER_FEE="0.0002", QF_LOG_LEVEL="ERROR")
        self.cfg = load(self.settings)
        self.md = Publisher(self.cfg.bus.md_pub, 1_000_000)
        self.events = Subscriber(self.cfg.bus.broker_pub, ["fill.", "heartbeat."], 1_000_000)
        self.fills: dict[str, dict] = {}
        self.acks: dict[str, Ack] = {}
        self.first: dict[str, Ack] = {}  # the first answer per client_order_id: repeats must match it
        self.stats: dict = {}
        self.pid = None
        self._halt = threading.Event()
        self._listener = threading.Thread(target=self._listen, name="broker-events", daemon=True)
        self._listener.start()
        self.stderr = tmp_path / "broker.stderr"
        with open(self.stderr, "wb") as err:  # a file, not a pipe: a full pipe would stall the broker
            self.proc = subprocess.Popen([sys.executable, "-m", "services.cli", "broker"],
                                         env={**clean_environ(), **self.settings, "PYTHONPATH": ROOT}, cwd=ROOT,
                                         stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL)
        wait_for(lambda: self.pid == self.proc.pid or self.proc.poll() is not None, 30, "the broker's heartbeat")
        assert self.proc.poll() is None, f"broker exited with {self.proc.returncode}"
        self.req = self._req()

    def _listen(self) -> None:
        while not self._halt.is_set():
            if self.events.sock.poll(50):
                try:
                    msg = self.events.recv()[1]
                except DecodeError as exc:  # the broker's own events must always be readable
                    self.fills["unreadable"] = {"error": str(exc)}
                    continue
                if isinstance(msg, Fill):
                    self.fills[msg.fill_id] = msg.to_wire()
                elif isinstance(msg, Heartbeat):
                    self.pid, self.stats = msg.pid, dict(msg.stats or {})

    def _req(self) -> zmq.Socket:
        sock = zmq.Context.instance().socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.cfg.bus.broker_rep)
        return sock

    def ask(self, payload: bytes, run: FuzzRun) -> messages.Message:
        """Send one request; the typed answer (fails the test on silence or an untyped one)."""
        self.req.send(payload)
        assert self.req.poll(int(ANSWER_S * 1000)), run.why(f"no answer within {ANSWER_S}s to {payload[:80]!r}")
        return self.check(self.req.recv(), run)

    def check(self, raw: bytes, run: FuzzRun) -> messages.Message:
        try:
            reply = messages.decode(raw, messages.REQUESTS)
        except DecodeError as exc:
            raise AssertionError(run.why(f"an unreadable answer: {exc}")) from None
        if isinstance(reply, Error):
            assert reply.code in DECODE_CODES, run.why(f"untyped error {reply}")
            run.count(f"answer.error.{reply.code}")
            return reply
        assert isinstance(reply, Ack), run.why(f"unexpected answer {reply}")
        assert reply.reason in ACK_REASONS, run.why(f"unknown reason {reply}")
        run.count(f"answer.ack.{reply.status.value}")
        first = self.first.setdefault(reply.client_order_id, reply)
        assert reply.order_id == first.order_id, run.why(f"a second order for {reply.client_order_id}")
        for fill in reply.fills:  # every fill told is a readable fill (decoded with the ack, every field checked)
            assert fill.price > 0 and 0 < fill.qty, run.why(f"a fill at {fill.price} x {fill.qty}")
            self.fills[fill.fill_id] = fill.to_wire()
        assert reply.filled_qty == sum((f.qty for f in reply.fills), D(0)), run.why(str(reply))
        self.acks[reply.client_order_id] = reply
        return reply

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int:
        self._halt.set()
        self.req.close(linger=0)
        stop_process(self.proc)
        self._listener.join(5)
        self.events.close()
        self.md.close()
        return self.proc.returncode


def hostile_request(rng: random.Random, n: int, known: list[tuple[str, bytes]]) -> tuple[str, bytes]:
    """One request frame for the ROUTER: (class, payload)."""
    roll = rng.randrange(16)
    coid = f"f{n}"
    if roll == 0:
        return "router.random_bytes", rng.randbytes(rng.randrange(0, 300))
    if roll == 1:
        return "router.wrong_shape", msgpack.packb(hostile_value(rng))
    if roll == 2:
        return "router.bad_header", msgpack.packb({"v": rng.choice([0, 2, "1", None, 1.0, 1]),
                                                   "type": rng.choice(["order", "nope", None, 5, "decision", "ack",
                                                                       "fill", "control", "error"]), "ts": 1})
    if roll <= 5:
        return "router.order_sane", msgpack.packb(order_wire(rng, coid))
    if roll <= 7:  # hostile amounts: huge, NaN, negative, exponents, off-grid
        wire = order_wire(rng, coid)
        wire["qty"] = rng.choice(HOSTILE_DECIMALS)
        if rng.random() < 0.5:
            wire["kind"], wire["price"] = "LIMIT", rng.choice(HOSTILE_DECIMALS)
        return "router.order_hostile_amount", msgpack.packb(wire)
    if roll <= 9:
        return "router.order_mutated", msgpack.packb(mutate(rng, order_wire(rng, coid), rng.randrange(1, 3)))
    if roll == 10 and known:  # the same client_order_id again: the same payload, or other content
        old_coid, payload = rng.choice(known)
        if rng.random() < 0.5:
            return "router.repeat_same", payload
        return "router.repeat_other_content", msgpack.packb(order_wire(rng, old_coid))
    if roll <= 12:
        target = rng.choice(known)[0] if known and rng.random() < 0.7 else rng.choice([f"none{n}", "x" * 200, ""])
        cancel = {"v": 1, "type": "cancel", "ts": n, "client_order_id": target}
        return "router.cancel", msgpack.packb(cancel if rng.random() < 0.8 else mutate(rng, cancel))
    if roll == 13:
        return "router.other_type", messages.encode(rng.choice([
            messages.Control(ts=1, action="HALT", by="fuzz"),
            messages.Decision(ts=1, client_order_id=coid, verdict="APPROVED"),
            messages.Error(ts=1, code="x", text="y")]))
    if roll == 14 and n % 10 == 0:
        return "router.oversized", b"\x81" + rng.randbytes(messages.MAX_FRAME)
    return "router.order_extra_fields", msgpack.packb({**order_wire(rng, coid), "extra": {"deep": [[[[1]]]] * 10}})


def check_ledger(db: str, told: dict[str, dict], run: FuzzRun) -> dict:
    """The stored orders, fills and cash, exact and consistent: every told fill stored once and
    unchanged; each order's filled_qty the sum of its fills, within its qty; the last equity
    snapshot's cash = start - signed notional - fees of every stored fill."""
    journal_stored(db)
    con = sqlite3.connect(db, timeout=5)
    try:
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        stored = {r[0]: r for r in con.execute(
            "SELECT fill_id, order_id, client_order_id, side, price, qty, fee, fee_asset FROM fills")}
        assert con.execute("SELECT COUNT(*) FROM fills").fetchone()[0] == len(stored), run.why("a fill stored twice")
        for fill_id, f in told.items():
            assert fill_id in stored, run.why(f"told fill {fill_id} is not stored")
            row = stored[fill_id]
            assert (row[2], row[3], D(row[4]), D(row[5]), D(row[6])) == (
                f["client_order_id"], f["side"], D(f["price"]), D(f["qty"]), D(f["fee"])), run.why(fill_id)
        assert con.execute("SELECT client_order_id FROM orders GROUP BY client_order_id HAVING COUNT(*) > 1"
                           ).fetchall() == [], run.why("one client_order_id, two orders")
        per_order, cash = defaultdict(lambda: D(0)), START_CASH
        with localcontext(Context(prec=100)):  # exact: hostile orders make sums beyond 28 digits
            for _, order_id, _, side, price, qty, fee, asset in stored.values():
                assert asset == "USDT" and D(price) > 0 and D(qty) > 0, run.why(f"stored {price} x {qty} {asset}")
                per_order[order_id] += D(qty)
                cash -= (1 if side == "BUY" else -1) * D(price) * D(qty) + D(fee)
        orders = 0
        for order_id, qty, filled, status in con.execute("SELECT order_id, qty, filled_qty, status FROM orders"):
            orders += 1
            assert D(filled) == per_order.pop(order_id, D(0)), run.why(order_id)
            if status == "REJECTED":  # kept as asked (a repeat gets the same answer), never filled
                assert D(filled) == 0, run.why(order_id)
                continue
            assert D(0) <= D(filled) <= D(qty), run.why(order_id)
            assert (status == "FILLED") == (D(filled) == D(qty)), run.why(f"{order_id} {status}")
        assert not per_order, run.why(f"fills without an order: {list(per_order)[:3]}")
        last = con.execute("SELECT cash FROM equity ORDER BY id DESC LIMIT 1").fetchone()
        assert (D(last[0]) if last else START_CASH) == cash, run.why(f"cash {last} != {cash}")
        return {"orders_stored": orders, "fills_stored": len(stored), "cash": str(cash)}
    finally:
        con.close()


def test_fuzz_broker(tmp_path):
    run = FuzzRun("broker")
    rng = run.rng
    broker = Broker(tmp_path)
    known: list[tuple[str, bytes]] = []  # (client_order_id, payload) of orders sent
    try:
        wait_for(lambda: (broker.md.sock.send_multipart([f"book.{SYMBOL}".encode(), msgpack.packb(book_wire(rng, 0))]),
                          broker.stats.get("open") is not None)[1], 10, "the broker's stats")

        # (a) frames at the ROUTER: one REQ, every one answered in turn
        for n in range(run.n(ROUTER_FRAMES)):
            if n % 50 == 0:  # a sane book now and then, so that sane orders fill
                broker.md.sock.send_multipart([f"book.{SYMBOL}".encode(), msgpack.packb(book_wire(rng, n))])
            cls, payload = hostile_request(rng, n, known)
            run.count(cls)
            if cls.startswith("router.order"):
                known.append((f"f{n}", payload))
            broker.ask(payload, run)
        # frames that are no REQ envelope (nothing to answer: counted), in-flight repeats on a DEALER
        dealer = zmq.Context.instance().socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(broker.cfg.bus.broker_rep)
        try:
            expect = 0
            for i in range(run.n(ENVELOPES)):
                if i % 3 == 0:  # an order and its repeat back to back: the second waits for the same answer
                    payload = msgpack.packb(order_wire(rng, f"d{i}"))
                    dealer.send_multipart([b"", payload])
                    dealer.send_multipart([b"", payload])
                    expect += 2
                    run.count("router.repeat_in_flight", 2)
                else:
                    frames = rng.choice([[b"no delimiter"], [b"", b"a", b"b"], [rng.randbytes(5)] * 3, [b"x", b""]])
                    dealer.send_multipart(frames)
                    run.count("router.bad_envelope")
            for _ in range(expect):
                assert dealer.poll(int(ANSWER_S * 1000)), run.why("a DEALER request went unanswered")
                broker.check(dealer.recv_multipart()[-1], run)
            giant = zmq.Context.instance().socket(zmq.REQ)
            giant.setsockopt(zmq.LINGER, 0)
            giant.connect(broker.cfg.bus.broker_rep)
            giant.send(b"\x00" * (3 << 20))  # past the ROUTER's MAXMSGSIZE: libzmq drops the connection
            run.count("router.over_socket_limit")
            giant.close(linger=0)
        finally:
            dealer.close(linger=0)
        assert broker.alive(), run.why("the broker exited during the ROUTER storm")

        # (b) events on the md PUB, with a sane order every ORDER_EVERY events (answered meanwhile)
        for n in range(run.n(MD_EVENTS)):
            cls, frames = md_event(rng, 10**6 + n)
            run.count(cls)
            broker.md.sock.send_multipart(frames)
            if n % ORDER_EVERY == 0:
                coid = f"m{n}"
                payload = msgpack.packb(order_wire(rng, coid))
                known.append((coid, payload))
                run.count("md.order_during_storm")
                broker.ask(payload, run)
        assert broker.alive(), run.why("the broker exited during the md storm")

        # no stall: every order still open is cancelled, then an honest order fills on an honest book
        for coid, ack in list(broker.acks.items()):
            if ack.status.value in ("PENDING", "PARTIALLY_FILLED"):
                reply = broker.ask(messages.encode(messages.Cancel(ts=1, client_order_id=coid)), run)
                assert isinstance(reply, Ack) and reply.status.value in ("CANCELLED", "FILLED"), run.why(str(reply))
        final = Book(ts=1, symbol=SYMBOL, exch_ts=1_800_000_000_000, update_id=1, bids=[[FINAL_BID, 3.0]],
                     asks=[[FINAL_ASK, 2.0], [123.5, 5.0]], mid=123.2, spread=0.45, spread_bps=36.5, imbalance=0.0,
                     microprice=123.2)
        attempts = []

        def honest_fill():
            broker.md.publish(f"book.{SYMBOL}", final)
            coid = f"honest{len(attempts)}"
            ack = broker.ask(messages.encode(messages.OrderRequest(
                ts=1, client_order_id=coid, strategy="fuzz", symbol=SYMBOL, side="BUY", kind="LIMIT",
                qty=D("0.5"), price=D(str(FINAL_ASK)), tif="IOC")), run)
            attempts.append(ack)
            return ack.status.value == "FILLED" and ack
        ack = wait_for(honest_fill, 10, run.why("an honest order to fill after the storm"))
        assert [(str(f.price), str(f.qty), str(f.fee), f.liquidity) for f in ack.fills] == [
            (str(FINAL_ASK), "0.5", "0.06172839", "TAKER")], run.why(str(ack))
        # its own counters saw the storm (a heartbeat every 100 ms carries them)
        stats = wait_for(lambda: broker.stats.get("bad_market_data", 0) > 0 and broker.stats.get("decode_errors", 0) > 0
                         and dict(broker.stats), 5, run.why(f"the broker's counters, last seen {broker.stats}"))
        assert broker.alive(), run.why("the broker exited")
        assert "unreadable" not in broker.fills, run.why(str(broker.fills.get("unreadable")))
    finally:
        code = broker.stop()
    errors = broker.stderr.read_text(errors="replace")[-2000:]
    assert code == 0, run.why(f"the broker's exit status on SIGTERM: {code}; {errors}")
    ledger = check_ledger(broker.cfg.common.db, broker.fills, run)
    run.report(answered=len(broker.first), fills_told=len(broker.fills), honest_attempts=len(attempts),
               broker_stats={k: stats.get(k) for k in ("orders", "fills", "rejects", "decode_errors",
                                                       "bad_market_data")}, **ledger)
