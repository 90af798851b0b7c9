"""Risk never passes on a broker answer it would not accept itself: each lie is REJECTED BROKER_ERROR, booked nowhere,
counted and alerted, the order's worst case stays counted, and the next honest order is judged and booked exactly."""
from __future__ import annotations

import copy
import itertools
from decimal import Decimal as D

import msgpack
import pytest
from prometheus_client import REGISTRY

from services.risk.service import RiskService
from shared import messages
from shared.bus import Subscriber
from shared.config import load
from shared.enums import ControlAction, OrderKind, OrderStatus, Side, Verdict
from shared.messages import Ack, Cancel, Control, Decision, Error, Fill, OrderEvent, OrderRequest
from tests.fakes.hostile_broker import (BENIGN, MUTATIONS, HostileBroker, Send, events_of, honest_ack, rejected_ack,
                                        reply)

BIDS, ASKS = [[100.0, 5.0], [99.5, 5.0]], [[100.5, 5.0], [101.0, 5.0]]
FEE = D("0.001")


def order(coid: str, qty: str = "0.005", side: Side = Side.BUY, **kw) -> OrderRequest:
    return OrderRequest(ts=1, client_order_id=coid, strategy="t", symbol=kw.pop("symbol", "BTCUSDT"), side=side,
                        kind=kw.pop("kind", OrderKind.MARKET), qty=D(qty), **kw)


class Script:
    """What the hostile broker says: an honest FILLED ack at the touch for every order, unless
    `lies[client_order_id]` names a mutation (or is a callable making the whole answer)."""

    def __init__(self) -> None:
        self.lies: dict = {}
        self.sent: dict[str, object] = {}  # client_order_id -> the answer sent
        self.ids = itertools.count(1)
        self.events = False  # publish the honest fill/order events after each answer
        self.broker: HostileBroker | None = None
        self.shapes: dict = {}  # client_order_id -> (frames, answer) -> the Sends instead of one reply

    def honest(self, req: dict) -> dict:
        price = D("100.5") if req["side"] == "BUY" else D("100")
        return honest_ack(req, price, f"o{next(self.ids)}")

    def __call__(self, frames: list, req: object) -> list:
        if not isinstance(req, dict):
            return []
        if req.get("type") == "cancel":
            lie = self.lies.get(("cancel", req["client_order_id"]))
            return [reply(frames, lie())] if lie else []
        if req["client_order_id"].startswith("warm-"):  # risk's link is up: refused, nothing filled
            return [reply(frames, msgpack.packb(rejected_ack(req, "o-warm")))]
        if req["client_order_id"].startswith("rest"):  # taken, resting at the exchange: PENDING
            return [reply(frames, msgpack.packb({**rejected_ack(req, "o-r"), "status": "PENDING", "reason": ""}))]
        ack = self.honest(req)
        lie = self.lies.get(req["client_order_id"])
        answer = msgpack.packb(ack)
        if lie is not None:
            told = lie(copy.deepcopy(ack), req)
            answer = told if isinstance(told, bytes) else msgpack.packb(told)
        self.sent[req["client_order_id"]] = answer
        if self.events:
            for topic, msg in events_of(ack, req["symbol"]):
                self.broker.publish(topic, msg)
        shape = self.shapes.get(req["client_order_id"])
        return shape(frames, answer) if shape else [reply(frames, answer)]


@pytest.fixture
def script():
    return Script()


@pytest.fixture
def hostile(script):
    """The hostile broker on loopback tcp, on ports the OS chose as it bound them."""
    broker = HostileBroker("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", script).start()
    script.broker = broker
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def lie_cfg(env, hostile):
    return load({**env, "QF_BROKER_REP": hostile.rep, "QF_BROKER_PUB": hostile.pub_endpoint,
                 "QF_RISK_MAX_POSITION": "0.01", "QF_RISK_STALE_BOOK_MS": "600000", "QF_RISK_ADJUST": "false",
                 "QF_RISK_BROKER_TIMEOUT_MS": "1000", "QF_START_BALANCES": "USDT=10000,BTC=1,ETH=1"})


def ready(svc: RiskService, cfg, md_pub, make_book, feed, clients, wait_until) -> RiskService:
    """`svc` holding the book and connected to the broker (an order reaches it: refused there)."""
    feed(md_pub, make_book(bids=BIDS, asks=ASKS), lambda: "BTCUSDT" in svc.engine.book_ns)
    warm, n = clients(cfg.bus.risk_rep), itertools.count()
    wait_until(lambda: warm.request(order(f"warm-{next(n)}", "0.001")).verdict is Verdict.APPROVED,
               "risk to reach the broker")
    return svc


@pytest.fixture
def risk(lie_cfg, hostile, runner, md_pub, make_book, feed, clients, wait_until):
    return ready(runner.start(RiskService(lie_cfg)), lie_cfg, md_pub, make_book, feed, clients, wait_until)


@pytest.fixture
def client(lie_cfg, clients):
    return clients(lie_cfg.bus.risk_rep)


def settled(client) -> dict:
    """Risk answers first and books after; a control request behind the answer sees it booked."""
    raw = client.raw(messages.encode(Control(ts=1, action=ControlAction.STATE, by="test", reason="")))
    return msgpack.unpackb(raw)["detail"]


def bad_acks(source: str = "ack") -> float:
    total = 0.0
    for metric in REGISTRY.collect():
        if metric.name == "qf_risk_bad_acks":
            total += sum(s.value for s in metric.samples
                         if s.name == "qf_risk_bad_acks_total" and s.labels["source"] == source)
    return total


def alerts_raised() -> float:
    return REGISTRY.get_sample_value("qf_alerts_total", {"service": "risk", "code": "BROKER_ERROR"}) or 0.0


def exact_fill(qty: str, price: str = "100.5") -> tuple[D, D]:
    """(qty, fee) of an honest fill, as the ledger must hold it."""
    return D(qty), D(qty) * D(price) * FEE


@pytest.mark.parametrize("lie", sorted(MUTATIONS))
def test_a_lying_ack_is_refused_booked_nowhere_and_the_next_honest_order_is_exact(lie, risk, client, script):
    script.lies["lie"] = MUTATIONS[lie]
    counted, alerted = bad_acks(), alerts_raised()
    decision = client.request(order("lie"))
    assert isinstance(decision, Decision) and decision.verdict is Verdict.REJECTED, decision
    assert decision.reason["code"] == "BROKER_ERROR" and "refused" in decision.reason["text"], decision.reason
    assert decision.order is None and decision.qty == 0
    detail = settled(client)
    assert detail["positions"]["BTCUSDT"]["qty"] == "0" and detail["fees"] == "0" and detail["equity"] == "10000"
    assert risk.engine.ledger.positions["BTCUSDT"].fills == 0
    assert bad_acks() == counted + 1 and risk.stats["bad_acks"] == 1 and alerts_raised() == alerted + 1
    assert risk.alerts.is_active("BROKER_ERROR")
    # the broker may have done something: the order's whole quantity still counts (fail closed)
    work = risk.engine.working["lie"]
    assert (work.remaining, work.side, work.expires_ns > 0) == (D("0.005"), Side.BUY, True)

    honest = client.request(order("next", "0.003"))
    assert honest.verdict is Verdict.APPROVED and honest.order.status == "FILLED", honest
    detail = settled(client)
    qty, fee = exact_fill("0.003")
    assert risk.engine.ledger.qty("BTCUSDT") == qty and D(detail["fees"]) == fee
    assert risk.engine.ledger.cash() == D(10000) - qty * D("100.5") - fee
    # 0.005 in doubt + 0.003 held + 0.005 more > 0.01: the lie's worst case is still judged
    assert client.request(order("more", "0.005")).reason["code"] == "MAX_POSITION"


@pytest.mark.parametrize("change", sorted(BENIGN))
def test_a_true_ack_with_harmless_differences_is_relayed_byte_for_byte(change, risk, client, script):
    script.lies["ok"] = BENIGN[change]
    raw = client.raw(messages.encode(order("ok", "0.004")))
    decision = messages.decode(raw, messages.REQUESTS)
    assert decision.verdict is Verdict.APPROVED and raw.endswith(script.sent["ok"])
    settled(client)
    assert risk.engine.ledger.qty("BTCUSDT") == D("0.004") and risk.stats["bad_acks"] == 0
    assert "ok" not in risk.engine.working


def test_an_ack_reusing_the_fill_id_of_another_order_is_refused(risk, client, script):
    """Booked once per fill id, an ack reusing another order's id would be relayed with a fill
    risk then skips as a repeat: told FILLED, booked nothing."""
    first = client.request(order("first", "0.002"))
    assert first.verdict is Verdict.APPROVED
    taken = first.order.fills[0].fill_id

    def reuse(ack: dict, req: dict) -> dict:
        ack["fills"][0]["fill_id"] = taken
        return ack
    script.lies["second"] = reuse
    second = client.request(order("second", "0.003"))
    assert second.reason["code"] == "BROKER_ERROR" and "duplicate_fill" in second.reason["text"], second
    settled(client)
    assert risk.engine.ledger.qty("BTCUSDT") == D("0.002")
    # a retry of the first order gets its answer again
    assert client.request(order("first", "0.002")) == first


def test_a_limit_order_filled_through_its_limit_is_refused(risk, client, script):
    decision = client.request(order("lim", "0.002", kind=OrderKind.LIMIT, price=D("100"), tif="IOC"))
    assert decision.reason["code"] == "BROKER_ERROR" and "limit_price" in decision.reason["text"]
    assert risk.engine.ledger.qty("BTCUSDT") == 0
    # at or better than its limit it is the broker's honest answer
    good = client.request(order("lim2", "0.002", kind=OrderKind.LIMIT, price=D("100.5"), tif="IOC"))
    assert good.verdict is Verdict.APPROVED
    settled(client)
    assert risk.engine.ledger.qty("BTCUSDT") == D("0.002")


def events_flow(risk: RiskService, hostile: HostileBroker, wait_until) -> None:
    """Until risk's SUB hears the broker's PUB: an unbookable fill, published until refused."""
    probe = Fill(ts=1, fill_id="probe", order_id="p", client_order_id="p", symbol="DOGEUSDT", side=Side.BUY,
                 price=D("1"), qty=D("1"), fee=D("0"), fee_asset="USDT", liquidity="TAKER", exch_ts=1)
    seen = risk.stats["bad_acks"]

    def refused() -> bool:
        hostile.publish("fill.DOGEUSDT", probe)
        return risk.stats["bad_acks"] > seen
    wait_until(refused, "risk to hear the broker's events")


def resting(client, coid: str, side: Side, price: str) -> None:
    """A GTC LIMIT order of 0.004 the broker takes and rests (PENDING): risk tracks it."""
    pending = client.request(order(coid, "0.004", side, kind=OrderKind.LIMIT, price=D(price)))
    assert pending.verdict is Verdict.APPROVED and pending.order.status == "PENDING", pending
    settled(client)


def test_the_brokers_honest_events_settle_an_order_whose_ack_lied(risk, client, script, hostile, wait_until):
    """Fail closed, then converge: nothing of the lying ack is booked, the order's worst case
    counts until the broker's committed fill/order events arrive, which are booked exactly."""
    events_flow(risk, hostile, wait_until)
    script.lies["lie"] = MUTATIONS["fills_10x_the_order"]
    script.events = True
    assert client.request(order("lie", "0.004")).reason["code"] == "BROKER_ERROR"
    wait_until(lambda: "lie" not in risk.engine.working, "the order event to end the order")
    settled(client)
    qty, fee = exact_fill("0.004")
    assert risk.engine.ledger.qty("BTCUSDT") == qty and risk.engine.ledger.fees() == fee
    assert risk.engine.exposure == {}


def test_lying_fill_and_order_events_are_refused_and_do_not_burn_the_fill_id(risk, client, script, hostile,
                                                                            wait_until):
    # an order risk tracks (resting at the broker): its events are held to it
    resting(client, "rest", Side.SELL, "100")
    good = Fill(ts=1, fill_id="f-1", order_id="o-r", client_order_id="rest", symbol="BTCUSDT", side=Side.SELL,
                price=D("100"), qty=D("0.001"), fee=D("0.0001"), fee_asset="USDT", liquidity="MAKER", exch_ts=1)
    wire = messages.encode(good, seq=1)
    lies = [{"qty": "0.04"}, {"side": "BUY"}, {"price": "10000"}, {"price": "0.5"}, {"fee": "1"}, {"qty": "-0.001"},
            {"symbol": "ETHUSDT"}, {"symbol": "DOGEUSDT"}, {"price": "1e400"}]
    before_fill, before_order = bad_acks("fill"), bad_acks("order")
    for i, change in enumerate(lies):
        hostile.publish("fill.BTCUSDT", msgpack.packb({**msgpack.unpackb(wire), **change, "seq": i + 1}))
    lying_orders = [OrderEvent(ts=1, order_id="o-r", client_order_id="rest", symbol="BTCUSDT",
                               status=OrderStatus.FILLED, filled_qty=D("0.04")),
                    OrderEvent(ts=1, order_id="o-r", client_order_id="rest", symbol="ETHUSDT",
                               status=OrderStatus.CANCELLED, filled_qty=D("0")),
                    OrderEvent(ts=1, order_id="o-r", client_order_id="rest", symbol="BTCUSDT",
                               status=OrderStatus.FILLED, filled_qty=D("0"))]
    for msg in lying_orders:
        hostile.publish("order.BTCUSDT", msg)

    def all_refused():
        if bad_acks("fill") < before_fill + len(lies) or bad_acks("order") < before_order + len(lying_orders):
            hostile.publish("order.BTCUSDT", lying_orders[0])  # a fresh SUB may miss the first ones
            for change in lies:
                hostile.publish("fill.BTCUSDT", msgpack.packb({**msgpack.unpackb(wire), **change}))
            return False
        return True
    wait_until(all_refused, "the lies refused")
    assert risk.engine.ledger.qty("BTCUSDT") == 0 and risk.engine.working["rest"].remaining == D("0.004")
    assert risk.alerts.is_active("BROKER_ERROR")
    hostile.publish("fill.BTCUSDT", good)  # the true fill under the id a lie used first
    wait_until(lambda: risk.engine.ledger.qty("BTCUSDT") == D("-0.001"), "the true fill booked")
    assert risk.engine.working["rest"].remaining == D("0.003")
    hostile.publish("order.BTCUSDT", OrderEvent(ts=1, order_id="o-r", client_order_id="rest", symbol="BTCUSDT",
                                                status=OrderStatus.CANCELLED, filled_qty=D("0.001")))
    wait_until(lambda: "rest" not in risk.engine.working, "the true order event applied")
    assert risk.engine.ledger.fees() == D("0.0001")


def test_a_lying_or_unreadable_cancel_reply_is_an_error_and_books_nothing(risk, client, script):
    resting(client, "rest", Side.BUY, "100.5")
    honest = honest_ack({"client_order_id": "rest", "symbol": "BTCUSDT", "side": "BUY", "qty": "0.004"}, D("100.5"),
                        "o-r")
    tenfold = MUTATIONS["fills_10x_the_order"](copy.deepcopy(honest), {"side": "BUY"})
    replies = {"10x": msgpack.packb({**tenfold, "status": "FILLED"}), "garbage": b"\x93\xc1garbage",
               "decision": messages.encode(Decision(ts=1, client_order_id="rest", verdict=Verdict.APPROVED)),
               "nan": msgpack.packb({**honest, "filled_qty": "NaN"})}
    counted = bad_acks("cancel")
    for name, raw in replies.items():
        script.lies[("cancel", "rest")] = (lambda raw=raw: raw)
        answer = client.request(Cancel(ts=1, client_order_id="rest"))
        assert isinstance(answer, Error) and answer.code == "BROKER_ERROR", (name, answer)
        assert risk.engine.ledger.qty("BTCUSDT") == 0 and risk.engine.working["rest"].remaining == D("0.004"), name
    assert bad_acks("cancel") == counted + len(replies)
    # the broker's own typed refusal passes as it is; an honest reply is booked
    script.lies[("cancel", "rest")] = lambda: messages.encode(Error(ts=1, code="UNKNOWN_ORDER", text="rest"))
    assert client.request(Cancel(ts=1, client_order_id="rest")).code == "UNKNOWN_ORDER"
    script.lies[("cancel", "rest")] = lambda: msgpack.packb({**honest, "reason": "not open"})
    assert isinstance(client.request(Cancel(ts=1, client_order_id="rest")), Ack)
    settled(client)
    assert risk.engine.ledger.qty("BTCUSDT") == D("0.004") and "rest" not in risk.engine.working


class Clock:
    """A settable clock shared with the service thread (reads of an int are atomic)."""

    def __init__(self) -> None:
        self.now = 1_700_000_000_000_000_000

    def __call__(self) -> int:
        return self.now


def test_the_alert_goes_out_on_the_bus_once_and_resolves_after_a_quiet_minute(lie_cfg, hostile, runner, md_pub,
                                                                             make_book, feed, client, clients,
                                                                             script, wait_until):
    clock = Clock()
    risk = ready(runner.start(RiskService(lie_cfg, clock=clock)), lie_cfg, md_pub, make_book, feed, clients,
                 wait_until)
    sub = Subscriber(lie_cfg.bus.risk_pub, ["alert.risk", "heartbeat.risk"], lie_cfg.bus.hwm)
    try:
        wait_until(lambda: sub.sock.poll(0) and sub.recv()[0] == "heartbeat.risk", "the subscription to be live")
        for i in range(3):
            script.lies[f"lie{i}"] = MUTATIONS["price_100x_the_book"]
            assert client.request(order(f"lie{i}", "0.001")).reason["code"] == "BROKER_ERROR"
        settled(client)  # counted and alerted after the answer
        assert risk.stats["bad_acks"] == 3

        def next_alert():
            while sub.sock.poll(0):
                topic, msg = sub.recv()
                if topic == "alert.risk":
                    return msg
        alert = wait_until(next_alert, "the alert")
        assert (alert.service, alert.code, alert.severity, alert.count) == ("risk", "BROKER_ERROR", "error", 1)
        assert "price_band" in alert.text and "lie0" in alert.text
        clock.now += 59 * 10**9
        assert client.request(order("calm", "0.001")).verdict is Verdict.APPROVED  # books are fresh for 600 s
        clock.now += 2 * 10**9  # a minute without another lie: the next heartbeat resolves it
        resolved = wait_until(next_alert, "the resolution")
        assert (resolved.code, resolved.severity) == ("BROKER_ERROR", "resolved")
        assert not risk.alerts.is_active("BROKER_ERROR")
    finally:
        sub.close()


def test_late_duplicate_and_misframed_replies_change_nothing(risk, client, script):
    """The first reply to a request answers it; copies, late ones and frames of the wrong shape are dropped."""
    script.shapes["dup"] = lambda frames, raw: [
        reply(frames, raw), reply(frames, raw), reply(frames, raw, delay_s=0.05),
        Send(frames=[frames[0], b"junk"]), Send(frames=frames[:1]), Send(frames=[*frames, b"extra"])]
    assert client.request(order("dup", "0.002")).verdict is Verdict.APPROVED
    assert client.request(order("after", "0.001")).verdict is Verdict.APPROVED
    settled(client)
    assert risk.engine.ledger.qty("BTCUSDT") == D("0.003") and risk.stats["bad_acks"] == 0
    assert risk.broker.stats["late"] >= 1 and risk.broker.stats["bad_replies"] >= 2
