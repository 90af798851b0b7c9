"""Fuzz a running strategy process: hostile events on the md PUB it reads and hostile answers from
its risk; it never exits, never stalls, and keeps deciding on honest books afterwards.

The strategy subscribes to `book.*` on marketdata only (no broker or risk PUB), so every kind of
event (book, trade, status, fill, order, risk state) is sent there, under book topics and others."""
from __future__ import annotations

import random
import subprocess
import sys
import threading
import time
from decimal import Decimal as D

import msgpack
import zmq

from shared import messages
from shared.bus import Publisher, Server
from shared.config import load
from shared.errors import DecodeError
from shared.enums import ControlAction, TradingState
from shared.messages import Ack, Book, Control, ControlReply, Decision, OrderRequest
from shared.runtime import liveness_path
from tests.conftest import ROOT, clean_environ, tcp_env, stop_process, wait_for
from tests.fuzz.seeded import (HOSTILE_DECIMALS, HOSTILE_FLOATS, HOSTILE_INTS, HOSTILE_STRINGS, FuzzRun,
                               hostile_value, mutate)

ROUNDS, EVENTS_PER_ROUND = 500, 50  # each round: a burst of hostile events, then one decision answered by risk
LIVENESS_S = 3.0  # the strategy touches its liveness file every heartbeat (100 ms here): older is a stall


def book_wire(rng: random.Random, n: int, symbol: str = "BTCUSDT", imbalance: float | None = None) -> dict:
    imbalance = rng.choice([0.9, -0.9, 0.0, 0.3]) if imbalance is None else imbalance
    return Book(ts=n, symbol=symbol, exch_ts=1_700_000_000_000 + n, update_id=n, bids=[[100.0, 1.0]],
                asks=[[100.1, 1.0]], mid=100.05, spread=0.1, spread_bps=9.995, imbalance=imbalance,
                microprice=100.05, recv_ts=time.time_ns()).to_wire()


def other_event(rng: random.Random, n: int) -> dict:
    """A well-formed event of another type (what else travels on the bus)."""
    return rng.choice([
        messages.Trade(ts=n, symbol="BTCUSDT", exch_ts=1, trade_id=n, price=D("100"), qty=D("1"), buyer_is_maker=True),
        messages.MdStatus(ts=n, symbol="BTCUSDT", state="SYNCING"),
        messages.Fill(ts=n, fill_id=f"f{n}", order_id="o", client_order_id=f"imbalance-{n}", symbol="BTCUSDT",
                      side="BUY", price=D("100"), qty=D("5"), fee=D("0"), fee_asset="USDT", liquidity="TAKER",
                      exch_ts=1),
        messages.OrderEvent(ts=n, order_id="o", client_order_id=f"c{n}", symbol="BTCUSDT", status="FILLED",
                            filled_qty=D("5")),
        messages.RiskState(ts=n, state="HALTED", reason="x", equity=D("1"), drawdown=D("1")),
    ]).to_wire(n)


def md_event(rng: random.Random, n: int) -> tuple[str, list[bytes]]:
    """One event for the md PUB: (class, frames)."""
    roll = rng.randrange(12)
    topic = b"book.BTCUSDT"
    if roll <= 2:
        return "md.book_honest", [topic, msgpack.packb(book_wire(rng, n))]
    if roll == 3:  # metrics no real book gives: the imbalance is a share in [-1, 1]
        wire = book_wire(rng, n, imbalance=rng.choice([1.5, -1.5, 1e300, -1e308, 2.0**63]))
        return "md.book_incredible_imbalance", [topic, msgpack.packb(wire)]
    if roll == 4:  # floats a decoder must refuse or survive: NaN, inf, ints, in any metric or level
        wire = book_wire(rng, n)
        key = rng.choice(["imbalance", "mid", "spread", "microprice", "bids", "asks", "recv_ts", "exch_ts"])
        wire[key] = ([[rng.choice(HOSTILE_FLOATS), 1.0]] if key in ("bids", "asks") else
                     rng.choice(HOSTILE_INTS) if key.endswith("_ts") else rng.choice(HOSTILE_FLOATS))
        return "md.book_hostile_numbers", [topic, msgpack.packb(wire)]
    if roll == 5:
        return "md.book_mutated", [topic, msgpack.packb(mutate(rng, book_wire(rng, n), rng.randrange(1, 4)))]
    if roll == 6:  # symbols it does not trade, under its topic or theirs
        symbol = rng.choice([f"X{n}USDT", "", "x" * 300, "btcusdt", "ÉTHUSDT"])
        return "md.book_other_symbol", [rng.choice([topic, f"book.{symbol}".encode()]),
                                        msgpack.packb(book_wire(rng, n, symbol=symbol, imbalance=0.9))]
    if roll == 7:  # trade, status, fill, order, risk state: under a book topic (type confusion) or their own
        wire = other_event(rng, n)
        own = {"trade": b"trade.BTCUSDT", "md_status": b"status.BTCUSDT", "fill": b"fill.BTCUSDT",
               "order": b"order.BTCUSDT", "risk_state": b"risk.state"}[wire["type"]]
        return "md.other_event_" + wire["type"], [rng.choice([topic, own]), msgpack.packb(wire)]
    if roll == 8:
        wire = other_event(rng, n)
        return "md.other_event_mutated", [topic, msgpack.packb(mutate(rng, wire, rng.randrange(1, 3)))]
    if roll == 9:
        return "md.random_bytes", [topic, rng.randbytes(rng.randrange(0, 200))]
    if roll == 10:
        return "md.wrong_frames", rng.choice([[topic], [topic, msgpack.packb(book_wire(rng, n)), b"x"],
                                              [topic, b"", b""], [b"book.", msgpack.packb(hostile_value(rng))]])
    return "md.wrong_shape", [topic, msgpack.packb(hostile_value(rng))]


def hostile_decision(rng: random.Random, req: OrderRequest) -> bytes | None:
    """Risk's answer while it is hostile: lies, junk, errors, silence (None)."""
    roll = rng.randrange(8)
    if roll == 0:
        return None  # silence: the strategy retries, then counts it rejected
    if roll == 1:
        return rng.randbytes(rng.randrange(0, 100))
    if roll == 2:
        return messages.encode(messages.Error(ts=1, code=rng.choice(HOSTILE_STRINGS[:4]), text="fuzz"))
    order = honest_ack(req).to_wire()  # a whole ack map: the lies below are in its values, not its shape
    fill = order["fills"][0]
    decision = {"v": 1, "type": "decision", "ts": 1, "client_order_id": req.client_order_id,
                "verdict": rng.choice(["APPROVED", "ADJUSTED", "REJECTED"]), "qty": str(req.qty), "order": order}
    if roll == 3:  # lying fills: the other side, ten times the qty, NaN, exponents, odd shapes
        fill[rng.choice(["qty", "price", "side"])] = rng.choice(HOSTILE_DECIMALS + ["SELL", "BUY", 5, None])
        if rng.random() < 0.3:
            order["fills"] = rng.choice([[fill] * 10, "abc", [1, 2], {}, [fill, None]])
    elif roll == 4:
        decision = mutate(rng, decision, rng.randrange(1, 3))
    elif roll == 5:
        decision["client_order_id"] = rng.choice(["other", "", req.client_order_id + "x"])
    elif roll == 6:
        decision = {**decision, "type": rng.choice(["ack", "error", "control_reply", "order"])}
    return msgpack.packb(decision)


def honest_ack(req: OrderRequest) -> Ack:
    """What the broker answers for `req` filled at once at 100.05 (risk relays it in the decision)."""
    oid = "o-" + req.client_order_id
    fill = messages.Fill(ts=1, fill_id=f"{oid}-1", order_id=oid, client_order_id=req.client_order_id, symbol=req.symbol,
                         side=req.side, price=D("100.05"), qty=req.qty, fee=D(0), fee_asset="USDT",
                         liquidity="TAKER", exch_ts=1)
    return Ack(ts=1, client_order_id=req.client_order_id, order_id=oid, status="FILLED", filled_qty=req.qty,
               avg_price=D("100.05"), fills=[fill])


def honest_decision(req: OrderRequest) -> bytes:
    return messages.encode(Decision(ts=1, client_order_id=req.client_order_id, verdict="APPROVED", qty=req.qty,
                                    order=honest_ack(req)))


class FakeRisk(threading.Thread):
    """The strategy's risk: a ROUTER that records every order (each must decode) and answers it,
    hostile until `honest` is set."""

    def __init__(self, endpoint: str, run: FuzzRun) -> None:
        super().__init__(daemon=True, name="fake-risk")
        self.server = Server(endpoint)
        self.run_, self.rng = run, random.Random(run.seed + 1)
        self.orders: list[OrderRequest] = []
        self.errors: list[str] = []
        self.honest = threading.Event()
        self._halt = threading.Event()

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.server.sock, zmq.POLLIN)
        while not self._halt.is_set():
            if not poller.poll(20):
                continue
            envelope, payload = self.server.recv()
            try:
                req = messages.decode(payload, messages.REQUESTS)
                if isinstance(req, Control):  # the strategy asks risk's positions after a doubtful answer
                    assert req.action is ControlAction.STATE, req
                    self.state_request(envelope)
                    continue
                assert isinstance(req, OrderRequest) and req.qty > 0 and req.symbol in ("BTCUSDT", "ETHUSDT"), req
            except (DecodeError, AssertionError) as exc:  # the strategy's own requests must be sane
                self.errors.append(repr(exc)[:200])
                continue
            self.orders.append(req)
            if self.honest.is_set():
                self.run_.count("answer.honest")
                self.server.reply(envelope, honest_decision(req))
                continue
            answer = hostile_decision(self.rng, req)
            self.run_.count("risk.hostile_answer" if answer is not None else "risk.silence")
            if answer is not None:
                self.server.reply(envelope, answer)

    def state_request(self, envelope: list) -> None:
        """A STATE request: hostile, a lie (a position nobody holds, a garbage map) or silence;
        honest, flat (what an honest risk, whose fills never reached, would hold)."""
        self.run_.count("risk.state_request")
        if self.honest.is_set():
            positions = {}
        else:
            pick = self.rng.random()
            if pick < 0.3:
                return  # silence
            positions = ({"BTCUSDT": "-5"} if pick < 0.5 else {"BTCUSDT": "1e40"} if pick < 0.7
                         else {"ETHUSDT": 1.5} if pick < 0.85 else {"BTCUSDT": "0.002"})
        self.server.reply(envelope, messages.encode(ControlReply(ts=1, state=TradingState.ACTIVE, reason="",
                                                                 positions=positions, equity=D(10000))))

    def close(self) -> None:
        self._halt.set()
        self.join(5)
        self.server.close()


def publish_honest(md: Publisher, rng: random.Random, imbalance: float, symbols=("BTCUSDT", "ETHUSDT")) -> None:
    for symbol in symbols:
        wire = book_wire(rng, 0, symbol, imbalance)
        md.publish(f"book.{symbol}", Book(**{k: v for k, v in wire.items() if k not in ("v", "type")}))


def test_fuzz_strategy(tmp_path):
    run = FuzzRun("strategy")
    rng = run.rng
    settings = tcp_env(tmp_path, QF_SYMBOLS="btcusdt,ethusdt", QF_STRATEGY_KIND="imbalance",
                       QF_STRATEGY_IMBALANCE="0.6",
                       QF_STRATEGY_COOLDOWN_MS="0", QF_STRATEGY_TIMEOUT_MS="50", QF_STRATEGY_RETRIES="2",
                       QF_HEARTBEAT_MS="100", QF_LOG_LEVEL="ERROR")
    cfg = load(settings)
    md = Publisher(cfg.bus.md_pub, 1_000_000)
    risk = FakeRisk(cfg.bus.risk_rep, run)
    risk.start()
    stderr = tmp_path / "strategy.stderr"
    with open(stderr, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "services.cli", "strategy"],
                                env={**clean_environ(), **settings, "PYTHONPATH": ROOT}, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL)
    alive = liveness_path(cfg.common.run_dir, "strategy")
    try:
        # joined: an honest book reaches it and it decides (an order comes to risk)
        wait_for(lambda: (publish_honest(md, rng, 0.9, ("BTCUSDT",)), risk.orders or proc.poll() is not None)[1],
                 30, "the strategy's first order")
        assert proc.poll() is None, run.why(f"the strategy exited with {proc.returncode}")
        flip = [0.9]

        def ordered_again(before: int) -> bool:
            # an honest book one way or the other (newest per symbol wins: one direction at a time)
            flip[0] = -flip[0]
            publish_honest(md, rng, flip[0])
            return len(risk.orders) > before or proc.poll() is not None
        for r in range(run.n(ROUNDS)):
            for n in range(EVENTS_PER_ROUND):
                cls, frames = md_event(rng, r * EVENTS_PER_ROUND + n)
                run.count(cls)
                md.sock.send_multipart(frames)
            before = len(risk.orders)
            wait_for(lambda: ordered_again(before), 10, run.why(f"a decision in round {r}"))
            assert proc.poll() is None, run.why(f"the strategy exited with {proc.returncode}")
        # honest from here: it must keep deciding (whatever position the lies left it with)
        risk.honest.set()
        hostile_orders = len(risk.orders)

        def decided() -> bool:
            ordered_again(0)
            done = {o.symbol for o in risk.orders[hostile_orders:]}
            return run.counts["answer.honest"] >= 4 and done == {"BTCUSDT", "ETHUSDT"}
        wait_for(decided, 20, run.why("the strategy to order on honest books after the storm"))
        assert not risk.errors, run.why(f"the strategy sent requests risk could not read: {risk.errors[:3]}")
        assert time.time() - alive.stat().st_mtime < LIVENESS_S, run.why("the strategy's liveness went stale")
        assert proc.poll() is None, run.why(f"the strategy exited with {proc.returncode}")
    finally:
        stop_process(proc)
        risk.close()
        md.close()
    assert proc.returncode == 0, run.why(f"exit status on SIGTERM {proc.returncode}: "
                                         f"{stderr.read_text(errors='replace')[-2000:]}")
    run.report(orders_during_storm=hostile_orders, orders_after=len(risk.orders) - hostile_orders)
