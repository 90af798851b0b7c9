"""Fuzz of the real risk process (issue #11, point 5): hostile broker acks, frames at its ROUTER, events on its SUBs.

Seeded random (tests/fuzz/seeded.py: a fixed seed by default, printed and shown on failure;
QF_FUZZ_SEED=<n> or =random runs another); QF_FUZZ_SCALE=<x> multiplies the inputs (1: about
20 s on a busy 2-core machine). Asserted:
risk never exits, every request gets a typed answer (a decision or an error) within
BOUND_S, a lie is never relayed as APPROVED nor booked, an honest order after the storms
is decided and booked, and risk's positions, fees and equity equal, to the last digit, what
the fills it was honestly told add up to. Counts per class go to build/fuzz/risk.json.
"""
from __future__ import annotations

import copy
import os
import random
import subprocess
import sys
import time
from collections import Counter
from decimal import Context, Decimal as D, localcontext

import msgpack
import pytest
import zmq

from shared import messages
from shared.bus import Publisher, Subscriber
from shared.config import load
from shared.enums import ControlAction, OrderKind, OrderStatus, Side, Verdict
from shared.messages import Book, Control, ControlReply, Decision, Error, Fill, OrderEvent, OrderRequest
from tests.conftest import ROOT, free_port, stop_process, wait_for
from tests.fuzz.seeded import seed_and_scale, write_report
from tests.fakes.hostile_broker import (BENIGN, MUTATIONS, HostileBroker, Send, events_of, honest_ack, rejected_ack,
                                        reply)

SEED, SCALE = seed_and_scale()
N_ACKS, N_FRAMES, N_EVENTS = int(3000 * SCALE), int(6000 * SCALE), int(5000 * SCALE)
WINDOW = 16  # orders in flight at once in the ack storm
BROKER_TIMEOUT_MS = 1000  # generous: an honest answer held up by a busy machine must not look like a silence
BOUND_S = 3.0  # every request is answered within this (a silent broker costs 1 s; a FLATTEN several hops)
WAIT_S = 20.0  # bound of waits on the process (start-up imports take ~1 s on a busy machine)
MIDS = {"BTCUSDT": D("100.25"), "ETHUSDT": D("200.25")}
START_CASH = D(10_000)
EXACT = Context(prec=80)
HOSTILE = [None, True, False, 1.5, float("nan"), float("inf"), -float("inf"), -1, 0, 2**63, -(2**63), 2**64 - 1,
           b"\x00bytes", [], {}, [1, [2]], {"a": {"b": {}}}, "", "NaN", "sNaN", "-Infinity", "1e400", "-0.001", "0",
           "0E-50", "1e-40", "9" * 41, " 1", "x" * 2000, "🚀", "BUY ", "buy"]


def book(symbol: str, mid: D | float, n: int, bids=None, asks=None) -> Book:
    m = float(mid)
    return Book(ts=time.time_ns(), symbol=symbol, exch_ts=n, update_id=n,
                bids=bids if bids is not None else [[m - 0.25, 50.0]],
                asks=asks if asks is not None else [[m + 0.25, 50.0]], mid=m, spread=0.5, spread_bps=1.0,
                imbalance=0.0, microprice=m, recv_ts=n)


class Expected:
    """The fills risk was honestly told of, by fill_id, and the figures they add up to (exact)."""

    def __init__(self) -> None:
        self.fills: dict[str, tuple[str, int, D, D, D]] = {}

    def add(self, f: dict) -> None:
        fee = D(f["fee"]) if f["fee_asset"] == "USDT" else D(0)  # a fee in the base asset is not a quote cost
        row = (f["symbol"], 1 if f["side"] == "BUY" else -1, D(f["qty"]), D(f["price"]), fee)
        assert self.fills.setdefault(f["fill_id"], row) == row, f"fill {f['fill_id']} told twice, differently"

    def figures(self) -> tuple[dict[str, D], D, D]:
        """(position per symbol, quote fees, equity at MIDS): equity is start cash plus every
        fill's cash flow, minus fees, plus positions at the marks, whatever the order of the fills."""
        with localcontext(EXACT):
            pos = {s: D(0) for s in MIDS}
            cash, fees = START_CASH, D(0)
            for symbol, sign, qty, price, fee in self.fills.values():
                pos[symbol] += sign * qty
                cash -= sign * qty * price
                fees += fee
            return pos, fees, cash - fees + sum(pos[s] * MIDS[s] for s in MIDS)


def credible(ack: object, req: OrderRequest) -> bool:
    """The test's own, independent judgement of an ack relayed as APPROVED: the whole order
    FILLED by fills of it that are finite, positive, sum to it, near the book, fairly charged."""
    try:
        if type(ack) is not dict or ack["client_order_id"] != req.client_order_id or ack["status"] != "FILLED":
            return False
        total, ids = D(0), set()
        for f in ack["fills"]:
            qty, price, fee = (_decimal(f[k]) for k in ("qty", "price", "fee"))
            if not (qty > 0 and price > 0 and fee >= 0 and fee <= qty * price / 10):
                return False
            if abs(price - MIDS[req.symbol]) > MIDS[req.symbol] / 10 or f["fill_id"] in ids:
                return False
            if (f["symbol"], f["side"], f["client_order_id"], f["order_id"]) != (
                    req.symbol, req.side.value, req.client_order_id, ack["order_id"]):
                return False
            ids.add(f["fill_id"])
            total += qty
        return total == D(ack["filled_qty"]) == req.qty
    except Exception:
        return False


def ack_map(decision: Decision) -> dict | None:
    """The broker's ack a decision relays, as its map: the typed Ack encodes to the bytes risk spliced in."""
    return None if decision.order is None else decision.order.to_wire()


def _decimal(value: object) -> D:
    if type(value) not in (str, int):
        raise ValueError("not a decimal")
    d = D(value)
    if not d.is_finite():
        raise ValueError("not finite")
    return d


def generic_mutation(ack: dict, rng: random.Random) -> dict:
    """A random structural change of an honest ack: a key dropped, retyped, set hostile, or added."""
    target = ack
    if ack["fills"] and rng.random() < 0.6:
        target = rng.choice(ack["fills"])
    op = rng.randrange(5)
    key = rng.choice(list(target))
    if op == 0:
        del target[key]
    elif op == 1:
        target[key] = rng.choice(HOSTILE)
    elif op == 2:
        target[rng.choice(["extra", "fills", "qty", "price", "fee", "status"])] = rng.choice(HOSTILE)
    elif op == 3:
        ack["fills"] = ack["fills"] + [copy.deepcopy(rng.choice(ack["fills"] or [{}]))]
    else:
        target[key] = rng.choice([str, repr, lambda v: [v], lambda v: {"v": v}])(target[key])
    return ack


lies_told: Counter = Counter()  # which of MUTATIONS the ack storm told, for the report
ACK_CASES = ("honest", "benign", "lie", "generic", "garbage", "late", "silent", "duplicate", "junk_frames_first",
             "wrong_request_id")
ACK_WEIGHTS = (24, 8, 30, 20, 5, 2, 2, 3, 3, 3)


class FuzzBroker:
    """The hostile broker's script. Orders of the ack storm get a case drawn from
    (SEED, client_order_id), so a replay does the same whatever order they arrive in; every
    other order (and all orders once `honest` is set) gets an honest ack."""

    def __init__(self) -> None:
        self.honest = False
        self.cases: dict[str, tuple[str, object, dict, bool]] = {}  # coid -> (case, sent, honest ack, events)
        self.answers: dict[str, Send] = {}  # coid -> the reply to its own request (when it went out: sent_at)
        self.other_acks: list[dict] = []  # honest acks of orders outside the storm (FLATTEN's closing orders)
        self.broker: HostileBroker | None = None
        self.n = 0

    def __call__(self, frames: list, req: object) -> list:
        if type(req) is not dict or req.get("type") not in ("order", "cancel"):
            return []
        if req["type"] == "cancel":
            return [reply(frames, messages.encode(Error(ts=1, code="UNKNOWN_ORDER", text=req["client_order_id"])))]
        self.n += 1
        coid = req["client_order_id"]
        if coid.startswith("warm-"):  # risk's link is up: refused, nothing filled
            return [reply(frames, msgpack.packb(rejected_ack(req, f"o{self.n}")))]
        rng = random.Random(f"{SEED}:{coid}")
        side, mid = req["side"], MIDS[req["symbol"]]
        touch = mid + D("0.25") if side == "BUY" else mid - D("0.25")
        parts = 1 if rng.random() < 0.6 else 2
        ack = honest_ack(req, touch, f"o{self.n}", parts=parts)
        if self.honest or not coid.startswith("a-"):
            self.other_acks.append(ack)
            return [reply(frames, msgpack.packb(ack))]
        case = rng.choices(ACK_CASES, ACK_WEIGHTS)[0]
        honest_raw = msgpack.packb(ack)
        events = False
        if case == "honest":
            out = [reply(frames, honest_raw)]
            sent = honest_raw
        elif case == "benign":
            sent = msgpack.packb(BENIGN[rng.choice(sorted(BENIGN))](copy.deepcopy(ack), req))
            out = [reply(frames, sent)]
        elif case in ("lie", "generic", "garbage"):
            if case == "lie":
                name = rng.choice(sorted(MUTATIONS))
                told = MUTATIONS[name](copy.deepcopy(ack), req)
                lies_told[name] += 1
            elif case == "generic":
                told = generic_mutation(copy.deepcopy(ack), rng)
            else:
                told = rng.choice([rng.randbytes(rng.randrange(1, 200)), honest_raw[:rng.randrange(len(honest_raw))],
                                   msgpack.packb(rng.choice(HOSTILE[:17]))])
            sent = told if isinstance(told, bytes) else msgpack.packb(told)
            out = [reply(frames, sent)]
            # the broker may well have filled it: half the time its honest events follow (risk books those)
            events = case != "generic" and rng.random() < 0.5
            if events:
                for topic, msg in events_of(ack, req["symbol"]):
                    self.broker.publish(topic, msg)
        elif case == "late":
            sent, out = honest_raw, [reply(frames, honest_raw, delay_s=BROKER_TIMEOUT_MS / 1000 + 0.2)]
        elif case == "silent":
            sent, out = None, []
        elif case == "duplicate":
            sent, out = honest_raw, [reply(frames, honest_raw), reply(frames, honest_raw, delay_s=rng.random() / 50)]
        elif case == "junk_frames_first":
            sent = honest_raw
            junk = [rng.randbytes(rng.randrange(0, 9)) for _ in range(rng.choice([0, 1, 3]))]
            out = [Send(frames=[frames[0], *junk]), reply(frames, honest_raw)]
        else:  # wrong_request_id: the answer goes to a request risk never sent
            sent, out = honest_raw, [Send(frames=[frames[0], rng.randbytes(8), b"", honest_raw])]
        self.cases[coid] = (case, sent, ack, events)
        answer = next((s for s in out if s.frames[:-1] == frames[:-1]), None)
        if answer is not None:
            self.answers[coid] = answer
        return out


class Risk:
    """The real risk process (`python -m services.cli risk`), its output in a file."""

    def __init__(self, env: dict[str, str], log_path) -> None:
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "services.cli", "risk"], env=env, cwd=ROOT,
                                     stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int:
        try:
            return stop_process(self.proc, WAIT_S)
        finally:
            self.log.close()


class Req:
    """A REQ client: one request, a typed answer within `BOUND_S`, or the test fails."""

    def __init__(self, endpoint: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.REQ)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def ask(self, payload: bytes, what: str, bound: float = BOUND_S) -> messages.Message:
        started = time.monotonic()
        self.sock.send(payload)
        assert self.sock.poll(int(bound * 1000)), f"seed {SEED}: no answer within {bound}s to {what}"
        raw = self.sock.recv()
        assert time.monotonic() - started <= bound, f"seed {SEED}: {what} answered after {bound}s"
        try:
            return messages.decode(raw, messages.REQUESTS)
        except Exception as exc:
            pytest.fail(f"seed {SEED}: untyped answer to {what}: {exc} {raw[:80]!r}")

    def state(self) -> dict:
        reply_ = self.ask(messages.encode(Control(ts=1, action=ControlAction.STATE, by="fuzz", reason="")), "STATE")
        assert isinstance(reply_, ControlReply), f"seed {SEED}: {reply_}"
        return reply_.detail

    def close(self) -> None:
        self.sock.close(linger=0)


def order_request(coid: str, rng: random.Random) -> OrderRequest:
    symbol, side = rng.choice(sorted(MIDS)), rng.choice([Side.BUY, Side.SELL])
    qty = D(rng.choice(["0.001", "0.002", "0.005", "0.01"]))
    if rng.random() < 0.2:  # a LIMIT IOC one tick beyond the touch: the broker walks two levels at most
        limit = MIDS[symbol] + D("0.75") if side is Side.BUY else MIDS[symbol] - D("0.75")
        return OrderRequest(ts=1, client_order_id=coid, strategy="fuzz", symbol=symbol, side=side,
                            kind=OrderKind.LIMIT, qty=qty, price=limit, tif="IOC")
    return OrderRequest(ts=1, client_order_id=coid, strategy="fuzz", symbol=symbol, side=side, kind=OrderKind.MARKET,
                        qty=qty)


def hostile_request(rng: random.Random, n: int) -> tuple[str, bytes]:
    """One frame for risk's ROUTER: (its class, the payload)."""
    kind = rng.randrange(10)
    if kind == 0:
        return "random_bytes", rng.randbytes(rng.randrange(0, 300))
    if kind == 1:
        return "wrong_shape", msgpack.packb(rng.choice(HOSTILE))
    if kind in (2, 3, 4):
        msg = order_request(f"b-{n}", rng).to_wire()
        what = "order"
    elif kind == 5:
        msg, what = {"v": 1, "type": "cancel", "ts": n, "client_order_id": rng.choice([f"b-{n - 1}", f"x{n}"])}, \
            "cancel"
    elif kind == 6:
        action = rng.choices(["STATE", "HALT", "RESUME", "FLATTEN", "DESTROY", "state"], [40, 5, 20, 2, 5, 5])[0]
        msg, what = {"v": 1, "type": "control", "ts": n, "action": action, "by": "fuzz", "reason": "fuzz"}, "control"
    else:
        msg = order_request(f"b-{n}", rng).to_wire()
        what = "order"
    if kind >= 3:  # mutated: a key dropped, retyped or set hostile, or an unknown one added
        op = rng.randrange(4)
        key = rng.choice(list(msg))
        if op == 0:
            del msg[key]
        elif op == 1:
            msg[key] = rng.choice(HOSTILE)
        elif op == 2:
            msg[rng.choice(["qty", "price", "side", "symbol", "kind", "tif", "extra"])] = rng.choice(HOSTILE)
        else:
            msg["extra"] = {"deep": [[[1]]] * 5}
        what = f"mutated_{what}"
    return what, msgpack.packb(msg)


@pytest.mark.timeout(240)
def test_fuzz_risk(tmp_path):
    print(f"QF_FUZZ_SEED={SEED} QF_FUZZ_SCALE={SCALE}")
    started = time.monotonic()
    script = FuzzBroker()
    broker = HostileBroker("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", script).start()  # ports chosen as bound
    script.broker = broker
    md = Publisher("tcp://127.0.0.1:*", 100_000)
    settings = {"QF_MD_PUB": md.sock.getsockopt_string(zmq.LAST_ENDPOINT), "QF_BROKER_REP": broker.rep,
                "QF_BROKER_PUB": broker.pub_endpoint, "QF_RISK_REP": f"tcp://127.0.0.1:{free_port()}",
                "QF_RISK_PUB": f"tcp://127.0.0.1:{free_port()}"}
    settings.update({"QF_DB": str(tmp_path / "qf.db"), "QF_RUN_DIR": str(tmp_path / "run"),
                     "QF_SHABBAT_PAUSE": "false",  # risk on the wall clock: no weekday may change an answer
                     "QF_SYMBOLS": "btcusdt,ethusdt", "QF_HEARTBEAT_MS": "200", "QF_LOG_LEVEL": "WARNING",
                     "QF_START_CASH": str(START_CASH), "QF_RISK_LOT_SIZE": "0.001", "QF_RISK_TICK_SIZE": "0.25",
                     "QF_RISK_MIN_NOTIONAL": "0", "QF_RISK_MAX_POSITION": "100", "QF_RISK_MAX_NOTIONAL": "1000000000",
                     "QF_RISK_MAX_ORDER_NOTIONAL": "1000000000", "QF_RISK_ORDERS_PER_S": "1000000",
                     "QF_RISK_ORDERS_PER_MIN": "60000000", "QF_RISK_DAILY_LOSS": "0", "QF_RISK_DAILY_LOSS_SOFT": "0",
                     "QF_RISK_MAX_DRAWDOWN": "0", "QF_RISK_DRAWDOWN_SOFT": "0", "QF_RISK_STALE_BOOK_MS": "600000",
                     "QF_RISK_PRICE_BAND_BPS": "500", "QF_RISK_ADJUST": "false", "QF_RISK_SPIN_US": "0",
                     "QF_RISK_BROKER_TIMEOUT_MS": str(BROKER_TIMEOUT_MS),
                     # base to sell: random SELLs must reach the broker, not stop at the spot account
                     "QF_START_BALANCES": f"USDT={START_CASH},BTC=100,ETH=100"})
    cfg = load(settings)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("QF_")}, **settings, "PYTHONUNBUFFERED": "1"}
    risk = Risk(env, tmp_path / "risk.log")
    req = Req(cfg.bus.risk_rep)
    expected = Expected()
    counts: dict[str, Counter] = {"acks": Counter(), "frames": Counter(), "events": Counter(), "verdicts": Counter()}
    rng = random.Random(SEED)
    seq = iter(range(1, 10**9))
    code, alerts = None, None
    try:
        state = wait_for(lambda: risk.alive() and _try_state(cfg.bus.risk_rep), WAIT_S, "risk to answer")
        assert state["state"] == "ACTIVE"
        alerts = Subscriber(cfg.bus.risk_pub, ["alert.risk", "heartbeat.risk"], 100_000)
        wait_for(lambda: alerts.sock.poll(0) and alerts.recv(), WAIT_S, "risk's PUB to reach the test")

        def books_known() -> bool:
            for symbol, mid in MIDS.items():
                md.publish(f"book.{symbol}", book(symbol, mid, next(seq)))
            far = [OrderRequest(ts=1, client_order_id=f"probe-{next(seq)}", strategy="fuzz", symbol=s, side=Side.BUY,
                                kind=OrderKind.LIMIT, qty=D("0.001"), price=D(int(MIDS[s] / 2))) for s in MIDS]
            return all(req.ask(messages.encode(o), "probe").reason["code"] == "PRICE_BAND" for o in far)
        wait_for(books_known, WAIT_S, "risk to hold both books")
        warm = iter(range(10**6))
        wait_for(lambda: req.ask(messages.encode(OrderRequest(
            ts=1, client_order_id=f"warm-{next(warm)}", strategy="fuzz", symbol="BTCUSDT", side=Side.BUY,
            kind=OrderKind.MARKET, qty=D("0.001")), ), "warm-up").verdict is Verdict.APPROVED, WAIT_S,
                 "risk to reach the broker")

        def events_flow() -> bool:  # a probe fill, republished until booked: the broker PUB reaches risk
            probe = Fill(ts=1, fill_id="probe-fill", order_id="p", client_order_id="p", symbol="BTCUSDT",
                         side=Side.BUY, price=D("100.5"), qty=D("0.001"), fee=D("0.0001005"), fee_asset="USDT",
                         liquidity="TAKER", exch_ts=1)
            broker.publish("fill.BTCUSDT", probe)
            return req.state()["positions"].get("BTCUSDT", {}).get("qty") == "0.001"
        wait_for(events_flow, WAIT_S, "risk to book from the broker's PUB")
        expected.add({"fill_id": "probe-fill", "symbol": "BTCUSDT", "side": "BUY", "qty": "0.001", "price": "100.5",
                      "fee": "0.0001005", "fee_asset": "USDT"})

        ack_storm(cfg, rng, script, expected, counts)
        assert risk.alive(), f"seed {SEED}: risk exited during the ack storm"
        script.honest = True
        frame_storm(cfg, req, rng, expected, counts)
        assert risk.alive(), f"seed {SEED}: risk exited during the frame storm"
        event_storm(md, broker, req, rng, expected, counts, seq)
        assert risk.alive(), f"seed {SEED}: risk exited during the event storm"

        # no stall: an honest order after the storms is decided and booked at once
        req.ask(messages.encode(Control(ts=1, action=ControlAction.RESUME, by="fuzz", reason="after")), "RESUME")
        last = OrderRequest(ts=1, client_order_id="after-the-storms", strategy="fuzz", symbol="ETHUSDT",
                            side=Side.BUY, kind=OrderKind.MARKET, qty=D("0.003"))
        decision = req.ask(messages.encode(last), "the honest order after the storms", bound=1.0)
        assert decision.verdict is Verdict.APPROVED and credible(ack_map(decision), last), f"seed {SEED}: {decision}"
        for f in ack_map(decision)["fills"]:
            expected.add(f)
        for ack in script.other_acks:  # orders the test did not send itself (FLATTEN's) were told honestly
            if not ack["client_order_id"].startswith(("b-", "after-")):
                for f in ack["fills"]:
                    expected.add(f)

        positions, fees, equity = expected.figures()

        def exact() -> tuple | None:
            s = req.state()
            got = ({sym: D(s["positions"].get(sym, {}).get("qty", "0")) for sym in MIDS}, D(s["fees"]), D(s["equity"]))
            return got if got == (positions, fees, equity) else None
        if not _eventually(exact, 10.0):
            s = req.state()
            pytest.fail(f"seed {SEED}: risk's ledger is not the honest fills': positions "
                        f"{ {k: v['qty'] for k, v in s['positions'].items()} } fees {s['fees']} equity {s['equity']}, "
                        f"expected {positions} fees {fees} equity {equity}")
        assert risk.alive()
        # the operator heard of the lying broker once (and a reminder at most), not once per lie
        told = []
        while alerts.sock.poll(0):
            topic, msg = alerts.recv()
            if topic == "alert.risk":
                told.append((msg.code, msg.severity))
        counts["alerts"] = Counter(f"{c} {s}" for c, s in told)
        assert ("BROKER_ERROR", "error") in told and len(told) <= 3, f"seed {SEED}: alerts {told}"
    finally:
        req.close()
        md.close()
        if alerts is not None:
            alerts.close()
        code = risk.stop()
        broker.stop()
        elapsed = time.monotonic() - started
        report = {"seed": SEED, "scale": SCALE, "seconds": round(elapsed, 1),
                  **{k: dict(sorted(v.items())) for k, v in counts.items()}, "lies_told": dict(sorted(lies_told.items())),
                  "totals": {k: sum(v.values()) for k, v in counts.items()}}
        write_report("risk", report)
    assert code == 0, f"seed {SEED}: risk exited with {code} on SIGTERM (see {tmp_path / 'risk.log'})"


def _try_state(endpoint: str) -> dict | None:
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send(messages.encode(Control(ts=1, action=ControlAction.STATE, by="fuzz", reason="")))
        return msgpack.unpackb(sock.recv())["detail"] if sock.poll(500) else None
    finally:
        sock.close(linger=0)


def _eventually(fn, timeout: float):
    try:
        return wait_for(fn, timeout, "")
    except AssertionError:
        return None


def ack_storm(cfg, rng: random.Random, script: FuzzBroker, expected: Expected, counts: dict) -> None:
    """(a) N_ACKS orders, WINDOW in flight, each answered by the hostile broker per its case."""
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(cfg.bus.risk_rep)
    pending: dict[str, tuple[float, OrderRequest]] = {}
    sent = 0
    deadline = time.monotonic() + 60 * max(SCALE, 1)
    try:
        while sent < N_ACKS or pending:
            while sent < N_ACKS and len(pending) < WINDOW:
                o = order_request(f"a-{sent}", rng)
                dealer.send_multipart([b"", messages.encode(o)])
                pending[o.client_order_id] = (time.monotonic(), o)
                sent += 1
            assert time.monotonic() < deadline, f"seed {SEED}: the ack storm did not finish"
            if not dealer.poll(int(BOUND_S * 1000)):
                oldest = min(t for t, _ in pending.values())
                pytest.fail(f"seed {SEED}: no answer for {time.monotonic() - oldest:.1f}s, {len(pending)} waiting")
            frames = dealer.recv_multipart()
            assert len(frames) == 2 and frames[0] == b"", f"seed {SEED}: bad reply frames {frames!r}"
            decision = messages.decode(frames[1], messages.REQUESTS)
            assert isinstance(decision, Decision), f"seed {SEED}: {decision}"
            t0, o = pending.pop(decision.client_order_id)
            assert time.monotonic() - t0 <= BOUND_S, f"seed {SEED}: {o.client_order_id} answered late"
            judge_ack(o, decision, frames[1], script, expected, counts, t0)
    finally:
        dealer.close(linger=0)


def late_by_load(script: FuzzBroker, coid: str, t0: float) -> bool:
    """Whether the broker's answer to `coid` left it too late for risk to have it in time: not
    yet sent, or sent more than 90% of risk's timeout after the test sent the order (risk's
    deadline runs from its own forward, later still). On a busy machine the test's broker thread
    can be held up that long; an answer sent in time and still called a silence is risk's fault."""
    answer = script.answers.get(coid)
    sent_at = None if answer is None else answer.sent_at
    return sent_at is None or sent_at - t0 >= 0.9 * BROKER_TIMEOUT_MS / 1000


def judge_ack(o: OrderRequest, decision: Decision, raw: bytes, script: FuzzBroker, expected: Expected,
              counts: dict, t0: float) -> None:
    case, sent, honest, events = script.cases[o.client_order_id]
    code = decision.reason["code"] if decision.reason else ""
    counts["acks"][case] += 1
    counts["verdicts"][f"{decision.verdict.value} {code}".strip()] += 1
    where = (f"seed {SEED}: {o.client_order_id} ({case}) got {decision.verdict.value} {decision.reason} "
             f"for {(sent or b'')[:300]!r}")
    if decision.verdict is Verdict.APPROVED:
        assert case in ("honest", "benign", "generic", "duplicate", "junk_frames_first"), where
        assert raw.endswith(sent), f"{where}: relayed something else than was sent"  # the ack, byte for byte
        relayed = msgpack.unpackb(raw)["order"]  # the ack as relayed (its keys no Ack has included), not as decoded
        assert credible(relayed, o), f"{where}: relayed an ack that is not credible: {relayed}"
        for f in relayed["fills"]:
            expected.add(f)
        return
    assert decision.verdict is Verdict.REJECTED and decision.order is None, where
    if code == "BROKER_UNAVAILABLE" and case not in ("late", "silent", "wrong_request_id"):
        assert late_by_load(script, o.client_order_id, t0), f"{where}: the broker answered in time"
        counts["acks"]["answered_too_late_by_a_busy_machine"] += 1
    elif case in ("lie", "garbage", "generic"):
        assert code == "BROKER_ERROR", where
    else:
        assert case in ("late", "silent", "wrong_request_id") and code == "BROKER_UNAVAILABLE", where
    if events:  # the lie was refused; the broker's honest events that followed are booked
        for f in honest["fills"]:
            expected.add(f)


def frame_storm(cfg, req: Req, rng: random.Random, expected: Expected, counts: dict) -> None:
    """(b) N_FRAMES requests at risk's ROUTER, and frames that are no request at all."""
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(cfg.bus.risk_rep)
    try:
        for n in range(N_FRAMES):
            what, payload = hostile_request(rng, n)
            counts["frames"][what] += 1
            answer = req.ask(payload, f"frame {n} ({what})")
            if isinstance(answer, Decision):
                counts["verdicts"][f"frames {answer.verdict.value}"] += 1
                if answer.verdict is Verdict.APPROVED:
                    for f in ack_map(answer)["fills"]:
                        expected.add(f)
            else:
                assert isinstance(answer, (Error, ControlReply, messages.Ack)), f"seed {SEED}: {answer}"
            if n % 10 == 0:  # not a REQ envelope: counted by risk, never answered
                counts["frames"]["wrong_frame_count"] += 1
                dealer.send_multipart([rng.randbytes(rng.randrange(0, 5)) for _ in range(rng.choice([1, 3, 4]))])
        counts["frames"]["oversized"] += 1
        giant = zmq.Context.instance().socket(zmq.REQ)
        giant.setsockopt(zmq.LINGER, 0)
        giant.connect(cfg.bus.risk_rep)
        giant.send(b"\x81" + b"\x00" * (3 << 20))  # over the ROUTER's MAXMSGSIZE: the connection is dropped
        giant.close(linger=0)
        while dealer.poll(0):  # a random frame may have looked like an envelope: its answer is dropped here
            dealer.recv_multipart()
    finally:
        dealer.close(linger=0)


def event_storm(md: Publisher, broker: HostileBroker, req: Req, rng: random.Random, expected: Expected,
                counts: dict, seq) -> None:
    """(c) N_EVENTS events on each PUB risk subscribes to: marketdata's, then the broker's."""
    for i in range(N_EVENTS):
        what, topic, payload = md_event(rng, next(seq))
        counts["events"][f"md_{what}"] += 1
        if isinstance(payload, list):
            md.sock.send_multipart(payload)
        else:
            md.sock.send_multipart([topic.encode(), payload])
    # the true books again: marks and the fills' price band rest on them
    def marked() -> bool:
        for symbol, mid in MIDS.items():
            md.publish(f"book.{symbol}", book(symbol, mid, next(seq)))
        s = req.state()["positions"]
        return all(s.get(sym, {}).get("mark") == str(mid) for sym, mid in MIDS.items())
    wait_for(marked, WAIT_S, "the true books to be marked again")

    for i in range(N_EVENTS):
        for what, topic, payload in broker_events(rng, i, expected):
            counts["events"][f"broker_{what}"] += 1
            broker.publish(topic, payload)
    # the last one, honest: once it is booked, every event before it was handled
    last = honest_fill(rng, "last-event")
    expected.add(fill_map(last))
    broker.publish("fill.BTCUSDT", last)
    counts["events"]["broker_honest_fill"] += 1


def honest_fill(rng: random.Random, fill_id: str) -> Fill:
    symbol, side = rng.choice(sorted(MIDS)), rng.choice([Side.BUY, Side.SELL])
    price = MIDS[symbol] + D(rng.choice(["-0.5", "-0.25", "0.25", "0.5"]))
    qty = D(rng.choice(["0.001", "0.002", "0.0005"]))
    return Fill(ts=1, fill_id=fill_id, order_id=f"o-{fill_id}", client_order_id=f"c-{fill_id}", symbol=symbol,
                side=side, price=price, qty=qty, fee=(price * qty / 1000).normalize(), fee_asset="USDT",
                liquidity="TAKER", exch_ts=1)


def fill_map(fill: Fill) -> dict:
    wire = fill.to_wire()
    del wire["v"], wire["type"]
    return wire


FILL_LIES = [{"qty": "-0.001"}, {"qty": "0"}, {"qty": "1e400"}, {"price": "0"}, {"price": "-100"}, {"price": "1e400"},
             {"price": "10025"}, {"price": "1.0025"}, {"fee": "-1"}, {"fee": "50"}, {"symbol": "DOGEUSDT"},
             {"side": "HOLD"}, {"qty": "NaN"}, {"price": "Infinity"}, {"qty": 0.001}, {"fill_id": 5},
             {"qty": "0.0000000000001"}, {"fee": "0E-50"}]


def broker_events(rng: random.Random, i: int, expected: Expected) -> list[tuple[str, str, object]]:
    """Events for the broker's PUB: an honest fill (booked), a lying one (refused: under a fresh
    id, or under the id of the honest fill that follows it, which it must not burn), garbage."""
    kind = rng.randrange(8)
    fill = honest_fill(rng, f"ev-{i}")
    topic = f"fill.{fill.symbol}"
    if kind <= 1:
        expected.add(fill_map(fill))
        return [("honest_fill", topic, fill)]
    if kind <= 4:
        lie = ("lying_fill", topic, msgpack.packb({**fill.to_wire(seq=i), **rng.choice(FILL_LIES)}))
        if kind < 4:
            return [lie]
        expected.add(fill_map(fill))
        return [lie, ("honest_fill_after_a_lie_under_its_id", topic, fill)]
    if kind == 5:
        status = rng.choice(list(OrderStatus))
        event = OrderEvent(ts=1, order_id="o", client_order_id=rng.choice([f"a-{rng.randrange(N_ACKS)}", "zz"]),
                           symbol=fill.symbol, status=status, filled_qty=D(rng.choice(["0", "0.001", "-1", "1e30"])))
        return [("order_event", f"order.{fill.symbol}", event)]
    if kind == 6:
        return [("garbage", topic, rng.choice([rng.randbytes(rng.randrange(0, 100)),
                                               msgpack.packb(rng.choice(HOSTILE)),
                                               msgpack.packb({**fill.to_wire(), "v": 2})]))]
    wire = fill.to_wire()
    del wire[rng.choice(list(wire))]
    return [("missing_field", topic, msgpack.packb(wire))]


def md_event(rng: random.Random, n: int) -> tuple[str, str, object]:
    """One event for marketdata's PUB: books odd but well-formed, malformed, other topics, wrong frame counts."""
    symbol = rng.choice(sorted(MIDS))
    kind = rng.randrange(7)
    if kind == 0:
        mid = rng.choice([0.0, -1.0, 1e-300, 1e300, 5e-9, 1.0, 1e9, 100.2500000001])
        return "odd_book", f"book.{symbol}", messages.encode(book(symbol, mid, n), n)
    if kind == 1:
        return "crossed_or_empty_book", f"book.{symbol}", messages.encode(
            book(symbol, MIDS[symbol], n, bids=rng.choice([[], [[300.0, 1.0]]]), asks=rng.choice([[], [[1.0, 1.0]]])),
            n)
    if kind == 2:
        wire = book(symbol, MIDS[symbol], n).to_wire(n)
        wire[rng.choice(list(wire))] = rng.choice(HOSTILE)
        return "mutated_book", f"book.{symbol}", msgpack.packb(wire)
    if kind == 3:
        return "garbage", f"book.{symbol}", rng.randbytes(rng.randrange(0, 200))
    if kind == 4:
        return "wrong_frame_count", "", [b"book." + symbol.encode()] * rng.choice([1, 3])
    if kind == 5:
        return "other_topic", rng.choice([f"trade.{symbol}", f"status.{symbol}"]), msgpack.packb(
            {"v": 1, "type": rng.choice(["trade", "md_status"]), "ts": n, "symbol": symbol,
             "price": rng.choice(HOSTILE), "state": "SYNCING"})
    return "unknown_symbol_book", "book.DOGEUSDT", messages.encode(book("DOGEUSDT", 0.1, n), n)
