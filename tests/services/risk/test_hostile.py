"""Hostile input over real tcp sockets: 10,000 bad request frames and bad bus events, all answered or counted."""
from __future__ import annotations

import random
import sqlite3
from decimal import Decimal as D

import msgpack
import pytest

from bench.common import free_port
import zmq
from prometheus_client import REGISTRY

from services.broker.service import BrokerService
from services.risk.checks import Reason
from services.risk.service import RiskService
from shared import messages
from shared.bus import Publisher, Subscriber
from shared.config import load
from shared.enums import OrderKind, Side, Verdict
from shared.errors import DecodeError
from shared.messages import Ack, ControlReply, Decision, Error, OrderRequest
from tests.conftest import journal_stored

FRAMES = 10_000
DECODE_CODES = {"oversized", "bad_msgpack", "not_a_map", "bad_version", "unknown_type", "missing_field", "bad_field",
                "unexpected_type"}
DENIAL_CODES = {v for k, v in vars(Reason).items() if k.isupper()}
HOSTILE_DECIMALS = ["-1", "0", "-0", "NaN", "nan", "sNaN", "Infinity", "-Infinity", "1e999999", "9" * 40, "9" * 41,
                    "1e-20", "0.0000000001", " 1", "1_000", "0x10", "", "１", "1e12", "0.001", "0.00100000"]
HOSTILE_STRINGS = ["", "BTCUSDT\x00", "btcusdt", "DOGEUSDT", "ÉTHUSDT", "x" * 10_000, "🚀", "BUY ", "SELL\n"]
HOSTILE_VALUES = [None, True, 1.5, float("nan"), float("inf"), -1, 2**63, -(2**63), b"bytes", [], {}, [1, [2]],
                  {"a": {"b": {}}}, "0.001", 0]


def valid_order(rng: random.Random, n: int) -> dict:
    return {"v": 1, "type": "order", "ts": n, "client_order_id": f"h{n}", "strategy": "hostile",
            "symbol": rng.choice(["BTCUSDT", "ETHUSDT"]), "side": rng.choice(["BUY", "SELL"]),
            "kind": "MARKET", "qty": rng.choice(["0.001", "0.002", "0.005", "0.02"])}


def hostile_frame(rng: random.Random, n: int) -> bytes:
    """One request frame: mostly broken, sometimes valid (those must be judged like any other)."""
    kind = rng.randrange(12)
    if kind == 0:
        return rng.randbytes(rng.randrange(0, 300))
    if kind == 1:
        return msgpack.packb(rng.choice(HOSTILE_VALUES + HOSTILE_STRINGS))
    if kind == 2:
        return msgpack.packb({"v": rng.choice([0, 2, "1", None, 1.0]), "type": "order", "ts": 1})
    if kind == 3:
        return msgpack.packb({"v": 1, "type": rng.choice(["nope", "", None, 5, "decision", "ack", "fill"]), "ts": 1})
    msg = valid_order(rng, n)
    if kind == 4:  # a required field missing
        del msg[rng.choice(["ts", "client_order_id", "strategy", "symbol", "side", "kind", "qty"])]
    elif kind == 5:  # a field of the wrong type
        msg[rng.choice(list(msg))] = rng.choice(HOSTILE_VALUES)
    elif kind == 6:  # hostile amounts
        msg["qty"] = rng.choice(HOSTILE_DECIMALS)
        if rng.random() < 0.5:
            msg["kind"], msg["price"] = "LIMIT", rng.choice(HOSTILE_DECIMALS)
    elif kind == 7:  # hostile names
        key = rng.choice(["symbol", "side", "kind", "tif", "client_order_id", "strategy"])
        msg[key] = rng.choice(HOSTILE_STRINGS)
    elif kind == 8:
        return msgpack.packb({"v": 1, "type": "cancel", "ts": n, "client_order_id": rng.choice(
            [f"unknown-{n}", "", "x" * 500, f"h{n - 1}"])})
    elif kind == 9:
        return msgpack.packb({"v": 1, "type": "control", "ts": n, "by": rng.choice(["x", 5]),
                              "action": rng.choice(["STATE", "halt", "DESTROY", "", 1])})
    elif kind == 10 and n % 50 == 0:
        return b"\x81" + rng.randbytes(messages.MAX_FRAME)  # just over 1 MiB
    elif kind == 10:
        msg["extra"] = {"deep": [[[[1]]]] * 10}  # unknown keys pass; the order is judged
    return msgpack.packb(msg, use_bin_type=rng.random() < 0.5)


def check_reply(raw: bytes) -> str:
    """The typed answer's kind; fails the test for anything untyped."""
    try:
        reply = messages.decode(raw, messages.REQUESTS)
    except DecodeError as exc:
        pytest.fail(f"risk answered with an unreadable frame: {exc}")
    if isinstance(reply, Error):
        assert reply.code in DECODE_CODES | {"UNKNOWN_ORDER", Reason.BROKER_UNAVAILABLE, Reason.RATE_LIMIT}, reply
        return "error"
    if isinstance(reply, Decision):
        assert reply.verdict is not Verdict.REJECTED or reply.reason["code"] in DENIAL_CODES, reply
        return reply.verdict.value
    assert isinstance(reply, (Ack, ControlReply)), reply
    return reply.TYPE


@pytest.fixture
def tcp_cfg(env):
    settings = {**env, **{key: f"tcp://127.0.0.1:{free_port()}" for key in (
        "QF_MD_PUB", "QF_RISK_REP", "QF_BROKER_REP", "QF_BROKER_PUB", "QF_RISK_PUB")},
        "QF_RISK_MAX_POSITION": "0.01", "QF_RISK_STALE_BOOK_MS": "600000", "QF_HEARTBEAT_MS": "200"}
    return load(settings)


def test_ten_thousand_hostile_frames(tcp_cfg, runner, make_book, feed, wait_until):
    cfg = tcp_cfg
    md, events = Publisher(cfg.bus.md_pub, cfg.bus.hwm), None
    ctx = zmq.Context.instance()
    req = ctx.socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    req.connect(cfg.bus.risk_rep)
    try:
        broker = runner.start(BrokerService(cfg))
        risk = runner.start(RiskService(cfg))
        feed(md, make_book(asks=[[100.5, 1000.0]], bids=[[100.0, 1000.0]]),
             lambda: "BTCUSDT" in risk.engine.book_ns and "BTCUSDT" in broker.books)
        rng = random.Random(20240808)
        seen: dict[str, int] = {}
        for n in range(FRAMES):
            req.send(hostile_frame(rng, n))
            assert req.poll(5000), f"no answer to frame {n}"
            kind = check_reply(req.recv())
            seen[kind] = seen.get(kind, 0) + 1
        assert seen["error"] > FRAMES / 3 and seen.get("REJECTED", 0) > 100 and seen.get("APPROVED", 0) > 10, seen
        decode_errors = risk.stats["decode_errors"]

        # frames that are not a REQ envelope, or too big for the socket: dropped (counted, or cut by libzmq)
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(cfg.bus.risk_rep)
        for i in range(100):
            dealer.send_multipart([rng.randbytes(i % 7)] * (1 + i % 3))
        giant = ctx.socket(zmq.REQ)
        giant.setsockopt(zmq.LINGER, 0)
        giant.connect(cfg.bus.risk_rep)
        giant.send(b"\x00" * (3 << 20))  # over the ROUTER's MAXMSGSIZE: the connection is dropped
        wait_until(lambda: risk.stats["decode_errors"] >= decode_errors + 100 - 100 // 3, "envelopes counted")
        dealer.close()
        giant.close()

        # bad events on both subscriptions: counted, and nothing moves
        before = dict(risk.engine.ledger.positions)
        qty_before = {s: p.qty for s, p in before.items()}
        bad_events = [b"\xc1", msgpack.packb([1]), msgpack.packb({"v": 1, "type": "book", "ts": 1, "seq": 1}),
                      msgpack.packb({"v": 1, "type": "fill", "ts": 1, "fill_id": "z", "order_id": "o",
                                     "client_order_id": "c", "symbol": "BTCUSDT", "side": "BUY", "price": "1e999",
                                     "qty": "1", "fee": "0", "fee_asset": "USDT", "liquidity": "TAKER", "exch_ts": 1}),
                      msgpack.packb({"v": 1, "type": "fill", "ts": 1, "fill_id": "y", "order_id": "o",
                                     "client_order_id": "c", "symbol": "BTCUSDT", "side": "BUY", "price": "1",
                                     "qty": "-1", "fee": "0", "fee_asset": "USDT", "liquidity": "TAKER",
                                     "exch_ts": 1})]
        runner.stop(broker)  # its PUB endpoint now carries our bad fills
        events = wait_until(lambda: bind_publisher(cfg.bus.broker_pub, cfg.bus.hwm), "the broker's port to be free")
        counted, bad_fills = risk.stats["decode_errors"], risk_bad_fills()

        def storm() -> bool:
            for i in range(100):
                md.sock.send_multipart([b"book.BTCUSDT", bad_events[i % 3]])
                events.send_multipart([b"fill.BTCUSDT", bad_events[3 + i % 2]])
            return risk.stats["decode_errors"] > counted + 100 and risk_bad_fills() > bad_fills + 50
        wait_until(storm, "bad events counted")
        assert {s: p.qty for s, p in risk.engine.ledger.positions.items()} == qty_before

        # and risk still judges valid requests exactly
        good = OrderRequest(ts=1, client_order_id="after-the-storm", strategy="t", symbol="BTCUSDT", side=Side.BUY,
                            kind=OrderKind.MARKET, qty=D("0.001"))
        decision = messages.decode(_ask(req, messages.encode(good)), messages.REQUESTS)
        assert decision.verdict in (Verdict.APPROVED, Verdict.REJECTED), decision
        journal_stored(cfg.common.db)
        with sqlite3.connect(cfg.common.db) as con:
            stored = con.execute("SELECT side, qty FROM fills WHERE symbol = 'BTCUSDT'").fetchall()
        want = sum((D(q) * (1 if s == "BUY" else -1) for s, q in stored), D(0))
        assert risk.engine.ledger.qty("BTCUSDT") == want
        assert all(risk.engine.ledger.qty(s) == q or s == "BTCUSDT" for s, q in qty_before.items())
        assert abs(want) <= D("0.01") + D("0.005")  # limits held under fire (+ one order in flight at most)
    finally:
        req.close()
        md.close()
        if events is not None:
            events.close()


def bind_publisher(endpoint: str, hwm: int) -> zmq.Socket | None:
    """A PUB bound on `endpoint`, or None while the stopped broker's socket still holds the port."""
    sock = zmq.Context.instance().socket(zmq.PUB)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.bind(endpoint)
    except zmq.ZMQError:
        sock.close()
        return None
    return sock


def risk_bad_fills() -> float:
    return REGISTRY.get_sample_value("qf_risk_decode_errors_total", {"source": "fill"}) or 0.0


def _ask(sock: zmq.Socket, payload: bytes) -> bytes:
    sock.send(payload)
    assert sock.poll(5000), "no answer"
    return sock.recv()


def test_hostile_sequence_numbers_cannot_stop_risks_heartbeat(cfg, runner, md_pub, wait_until):
    """A `seq` is the publisher's word too: jumps of 2^64 once made the missed-message count too big
    to pack, and every heartbeat after it raised, out of risk's loop (found by tests/fuzz)."""
    risk = runner.start(RiskService(cfg))
    beats = Subscriber(cfg.bus.risk_pub, ["heartbeat.risk"], cfg.bus.hwm)
    try:
        wait_until(lambda: beats.sock.poll(0) and beats.recv(), "a first heartbeat")
        wire = messages.book_wire(1, "BTCUSDT", 1, 1, [[100.0, 1.0]], [[100.5, 1.0]], 100.25, 0.5, 50.0, 0.0, 100.25, 1)

        def hostile_then_beat():
            for seq in (2**64 - 1, 1, 2**64 - 1, 1, 2**64 - 1, 2**63, 1):
                md_pub.sock.send_multipart([b"book.BTCUSDT", msgpack.packb({**wire, "seq": seq})])
            return risk.stats["books"] >= 7
        wait_until(hostile_then_beat, "the books read")
        while beats.sock.poll(0):
            beats.recv()
        _, beat = wait_until(lambda: beats.sock.poll(0) and beats.recv(), "a heartbeat after them")
        assert beat.stats["md_missed"] < 2**64 and runner.running[0][1].is_alive()
    finally:
        beats.close()
