"""kill -9 of the real risk process mid-stream: the restarted one rebuilds the same state from the database."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from decimal import Decimal as D
from fractions import Fraction

import msgpack
import pytest
import zmq

from shared import messages
from shared.bus import Publisher
from shared.config import load
from shared.enums import ControlAction, OrderKind, Side
from shared.messages import Book, Control, OrderRequest
from tests.conftest import free_port, journal_stored, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
WAIT_S = 20.0  # bound of every wait on a process (start-up imports take ~1 s on a busy machine)


class Service:
    """One `python -m services.cli NAME` process with its output in a file."""

    def __init__(self, name: str, env: dict[str, str], log_dir) -> None:
        self.log = open(log_dir / f"{name}-{time.monotonic_ns()}.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "services.cli", name], env=env, cwd=ROOT,
                                     stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def kill(self, sig: int = signal.SIGKILL) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(WAIT_S)
        self.log.close()
        return code


class Client:
    """REQ with Lazy Pirate: a fresh socket after each silence."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint, self.sock = endpoint, None

    def send(self, payload: bytes) -> None:
        if self.sock is None:
            self.sock = zmq.Context.instance().socket(zmq.REQ)
            self.sock.setsockopt(zmq.LINGER, 0)
            self.sock.connect(self.endpoint)
        self.sock.send(payload)

    def recv(self, timeout_s: float) -> bytes | None:
        if self.sock.poll(int(timeout_s * 1000)):
            return self.sock.recv()
        self.close()
        return None

    def ask(self, payload: bytes, timeout_s: float = 2.0) -> bytes | None:
        self.send(payload)
        return self.recv(timeout_s)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None


def until(what: str, fn, timeout: float = WAIT_S):
    return wait_for(fn, timeout, what)


def state_of(client: Client) -> dict | None:
    raw = client.ask(messages.encode(Control(ts=1, action=ControlAction.STATE, by="test", reason="")))
    return None if raw is None else msgpack.unpackb(raw)["detail"]


def book(mid: D, n: int) -> Book:
    m = float(mid)
    return Book(ts=time.time_ns(), symbol="BTCUSDT", exch_ts=n, update_id=n, bids=[[m - 0.25, 50.0]],
                asks=[[m + 0.25, 50.0]], mid=m, spread=0.5, spread_bps=1.0, imbalance=0.0, microprice=m, recv_ts=n)


def order(coid: str, side: Side, qty: str) -> bytes:
    return messages.encode(OrderRequest(ts=time.time_ns(), client_order_id=coid, strategy="crash", symbol="BTCUSDT",
                                        side=side, kind=OrderKind.MARKET, qty=D(qty)))


def brute_force(db: str) -> tuple[Fraction, Fraction, Fraction]:
    """Position, average-cost realized P&L and fees from every stored fill, in exact fractions."""
    journal_stored(db)
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT side, qty, price, fee FROM fills ORDER BY ts, fill_id").fetchall()
    qty = cost = realized = fees = Fraction(0)
    for side, q, p, fee in rows:
        q, p, sign = Fraction(q), Fraction(p), 1 if side == "BUY" else -1
        if qty and (qty > 0) != (sign > 0):
            closing = min(q, abs(qty))
            avg = cost / qty
            realized += closing * (p - avg) * (1 if qty > 0 else -1)
            cost -= avg * closing * (1 if qty > 0 else -1)
            qty, q = qty + sign * closing, q - closing
        qty, cost, fees = qty + sign * q, cost + sign * q * p, fees + Fraction(fee)
    return qty, realized, fees


@pytest.mark.timeout(180)
def test_kill_9_in_the_middle_of_an_order_stream_and_rebuild(tmp_path):
    settings = {key: f"tcp://127.0.0.1:{free_port()}" for key in (
        "QF_MD_PUB", "QF_RISK_REP", "QF_BROKER_REP", "QF_BROKER_PUB", "QF_RISK_PUB")}
    settings.update({"QF_DB": str(tmp_path / "qf.db"), "QF_RUN_DIR": str(tmp_path / "run"), "QF_SYMBOLS": "btcusdt",
                     "QF_SHABBAT_PAUSE": "false",  # the wall clock: no weekday may change an answer
                     "QF_HEARTBEAT_MS": "100", "QF_START_CASH": "10", "QF_RISK_LOT_SIZE": "0.001",
                     "QF_RISK_TICK_SIZE": "0.25", "QF_RISK_MIN_NOTIONAL": "0", "QF_RISK_MAX_POSITION": "0.05",
                     "QF_RISK_MAX_NOTIONAL": "100", "QF_RISK_ORDERS_PER_S": "1000", "QF_RISK_ORDERS_PER_MIN": "60000",
                     "QF_RISK_DAILY_LOSS": "0", "QF_RISK_DAILY_LOSS_SOFT": "0", "QF_RISK_MAX_DRAWDOWN": "0.2",
                     "QF_RISK_DRAWDOWN_SOFT": "0.03", "QF_RISK_STALE_BOOK_MS": "60000",
                     "QF_BROKER_LATENCY_MODE": "constant", "QF_BROKER_LATENCY_MS": "0"})
    cfg = load(settings)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("QF_")}, **settings, "PYTHONUNBUFFERED": "1"}
    md = Publisher(cfg.bus.md_pub, cfg.bus.hwm)
    client = Client(cfg.bus.risk_rep)
    broker = Service("broker", env, tmp_path)
    risk = Service("risk", env, tmp_path)
    n = iter(range(1, 1_000_000))
    try:
        def filled(coid: str, side: Side, qty: str, mid: D) -> dict | None:
            md.publish("book.BTCUSDT", book(mid, next(n)))
            raw = client.ask(order(f"{coid}-{next(n)}", side, qty))
            decision = raw and messages.decode(raw, messages.REQUESTS)
            return decision if decision and decision.order and decision.order.status == "FILLED" else None

        until("risk and broker to trade", lambda: filled("warm", Side.BUY, "0.001", D(100)))
        for i in range(19):  # a long position built at 100 with partial exits: realized P&L both ways
            side, mid = (Side.SELL, D(100) + i % 3) if i % 4 == 3 else (Side.BUY, D(100) - i % 2)
            assert until(f"order {i}", lambda: filled(f"o{i}", side, "0.003", mid), 5)
        def marked(mid: D) -> dict | None:
            md.publish("book.BTCUSDT", book(mid, next(n)))  # again and again: a fresh SUB may miss the first
            s = state_of(client)
            return s if s and s["positions"]["BTCUSDT"]["mark"] == f"{mid}" else None

        for mid in (D(104), D(112), D(110)):  # the peak is set up here, then equity falls 3 % off it
            until(f"mark {mid}", lambda: marked(mid))
        before = until("the drawdown breaker", lambda: (s := marked(D(100))) and s["state"] == "REDUCING" and s)
        assert (before["code"], before["by"]) == ("DRAWDOWN_SOFT", "risk")
        qty_before = D(before["positions"]["BTCUSDT"]["qty"])
        assert qty_before > D("0.02")

        # the stream: reducing sells, one after the other; kill -9 while the 8th is in flight
        for i in range(8):
            client.send(order(f"s{i}", Side.SELL, "0.001"))
            if i == 7:
                break
            assert client.recv(5) is not None
        risk.kill()
        client.close()
        risk = Service("risk", env, tmp_path)
        after = until("the restarted risk to answer", lambda: state_of(client))

        qty, realized, fees = brute_force(cfg.common.db)
        assert D(after["positions"]["BTCUSDT"]["qty"]) == qty and qty in (qty_before - D("0.007"),
                                                                            qty_before - D("0.008"))
        assert Fraction(after["fees"]) == fees
        assert abs(Fraction(after["realized"]) - realized) <= Fraction(1, 10**10)
        for key in ("state", "code", "reason", "by", "since_ts", "peak_equity", "day_start_equity", "day", "tripped"):
            assert after[key] == before[key], key
        # marks come back with the books: the same state, no new breaker, no second change
        again = until("a mark", lambda: marked(D(100)))
        assert (again["state"], again["code"], again["peak_equity"]) == ("REDUCING", "DRAWDOWN_SOFT",
                                                                       before["peak_equity"])
        # the order in flight at the kill, retried with its id: answered once, never filled twice
        retry = until("the retry", lambda: client.ask(order("s7", Side.SELL, "0.001")))
        assert messages.decode(retry, messages.REQUESTS).verdict.value == "APPROVED"
        assert brute_force(cfg.common.db)[0] == qty_before - D("0.008")
    finally:
        client.close()
        md.close()
        codes = {"risk": risk.kill(signal.SIGTERM), "broker": broker.kill(signal.SIGTERM)}
    assert codes == {"risk": 0, "broker": 0}, codes
