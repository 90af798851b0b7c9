"""StrategyService over real ZeroMQ sockets: a fake marketdata PUB and a fake risk ROUTER."""
from __future__ import annotations

import logging
import queue
import re
import threading
import time
import uuid
from contextlib import contextmanager
from decimal import Decimal

import pytest
import zmq

from services.strategy.service import StrategyService
from shared import messages
from shared.bus import Publisher, Server
from shared.enums import Liquidity, OrderKind, OrderStatus, Side, TradingState, Verdict
from shared.log import KeyValueFormatter
from shared.messages import Ack, Decision, Fill, OrderRequest
from shared.runtime import liveness_path
from tests.conftest import wait_for

WAIT_S = 5.0  # upper bound of every wait in this file; the happy path takes milliseconds


def last_endpoint(sock: zmq.Socket) -> str:
    return sock.getsockopt(zmq.LAST_ENDPOINT).decode()


class FakeRisk(threading.Thread):
    """A ROUTER (shared.bus.Server) on a free loopback port that records every
    order request and answers with `answer(request, n)` (None: stay silent)."""

    def __init__(self, answer, endpoint: str = "tcp://127.0.0.1:*") -> None:
        super().__init__(daemon=True)
        self.server = Server(endpoint)
        self.endpoint = last_endpoint(self.server.sock) if endpoint.endswith("*") else endpoint
        self.answer = answer
        self.requests: queue.Queue[tuple[bytes, OrderRequest]] = queue.Queue()
        self.n = 0
        self.positions: dict[str, str] = {}  # what a STATE request is answered with
        self.states = 0  # STATE requests answered
        self._halt = threading.Event()

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.server.sock, zmq.POLLIN)
        while not self._halt.is_set():
            if not poller.poll(20):
                continue
            envelope, payload = self.server.recv()
            req = messages.decode(payload, messages.REQUESTS)
            if isinstance(req, messages.Control):  # the strategy's resync: risk's positions
                self.states += 1
                self.server.reply(envelope, messages.encode(messages.ControlReply(
                    ts=time.time_ns(), state=TradingState.ACTIVE, reason="", positions=dict(self.positions),
                    equity=Decimal(10000))))
                continue
            self.n += 1
            self.requests.put((payload, req))
            reply = self.answer(req, self.n)
            if reply is not None:
                self.server.reply(envelope, messages.encode(reply))

    def next_request(self, timeout: float = WAIT_S) -> tuple[bytes, OrderRequest]:
        return self.requests.get(timeout=timeout)

    def close(self) -> None:
        self._halt.set()
        self.join(WAIT_S)
        self.server.close()


def fill_all(req: OrderRequest, price: str = "100.5") -> Decision:
    """Risk approves and the broker fills the whole order at `price`."""
    oid = "o-" + req.client_order_id
    fill = Fill(ts=time.time_ns(), fill_id=f"{oid}-1", order_id=oid, client_order_id=req.client_order_id,
                symbol=req.symbol, side=req.side, price=Decimal(price), qty=req.qty, fee=Decimal(0), fee_asset="USDT",
                liquidity=Liquidity.TAKER, exch_ts=1)
    ack = Ack(ts=time.time_ns(), client_order_id=req.client_order_id, order_id=oid, status=OrderStatus.FILLED,
              filled_qty=req.qty, avg_price=Decimal(price), fills=[fill])
    return Decision(ts=time.time_ns(), client_order_id=req.client_order_id, verdict=Verdict.APPROVED,
                    qty=req.qty, order=ack)


class ResultLog(logging.Handler):
    """Collects the strategy's `order_result` records in a queue."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.results: queue.Queue[logging.LogRecord] = queue.Queue()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "order_result":
            self.results.put(record)

    def next(self) -> logging.LogRecord:
        return self.results.get(timeout=WAIT_S)


@pytest.fixture
def results():
    handler = ResultLog()
    logger = logging.getLogger("qf.strategy")
    old_level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old_level)


@pytest.fixture
def publisher():
    pub = Publisher("tcp://127.0.0.1:*", hwm=100_000)
    yield pub
    pub.close()


@contextmanager
def running(service: StrategyService):
    thread = threading.Thread(target=service.run, name="strategy", daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        service.stop()
        thread.join(WAIT_S)
        assert not thread.is_alive(), "strategy did not stop within the bound"


def pump(pub: Publisher, risk: FakeRisk, book, sent: dict | None = None, **fields):
    """Publish books until risk sees a request (a SUB misses what is sent before
    it has joined, so the first books may be lost); returns the request."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        recv_ts = time.time_ns()
        msg = book(recv_ts=recv_ts, **fields)
        if sent is not None:
            sent[recv_ts] = msg
        pub.publish(f"book.{msg.symbol}", msg)
        try:
            return risk.next_request(timeout=0.02)
        except queue.Empty:
            continue
    pytest.fail("no order request reached risk")


def service_config(config, tmp_path, md_pub: str, risk_rep: str, **env):
    return config(QF_MD_PUB=md_pub, QF_RISK_REP=risk_rep, QF_RUN_DIR=str(tmp_path / "run"),
                  QF_STRATEGY_IMBALANCE="0.6", QF_STRATEGY_COOLDOWN_MS="0", QF_HEARTBEAT_MS="50", **env)


def test_buy_then_sell_round_trip_over_real_sockets(config, book, tmp_path, publisher, results):
    risk = FakeRisk(lambda req, n: fill_all(req))
    risk.start()
    cfg = service_config(config, tmp_path, last_endpoint(publisher.sock), risk.endpoint, QF_STRATEGY_QTY="0.002")
    svc = StrategyService(cfg)
    sent: dict[int, object] = {}
    try:
        with running(svc):
            _, buy = pump(publisher, risk, book, sent, imbalance=0.9)
            assert (buy.side, buy.kind, buy.qty, buy.symbol) == (Side.BUY, OrderKind.MARKET, Decimal("0.002"),
                                                                 "BTCUSDT")
            assert buy.strategy == "imbalance"
            assert buy.client_order_id == f"imbalance-{svc.start_ns:x}-1"
            assert buy.signal_ts in sent and buy.ts >= buy.signal_ts
            first = results.next()
            assert (first.cid, first.verdict, first.filled_qty, first.avg_price) == (
                buy.client_order_id, "APPROVED", Decimal("0.002"), Decimal("100.5"))
            assert liveness_path(cfg.common.run_dir, "strategy").exists()

            # a malformed frame is counted and dropped (sent now that the SUB has joined,
            # so it arrives before the books below: one connection keeps its order)
            publisher.sock.send_multipart([b"book.BTCUSDT", b"\xc1 not msgpack"])
            _, sell = pump(publisher, risk, book, sent, imbalance=-0.9)
            assert (sell.side, sell.qty, sell.client_order_id) == (Side.SELL, Decimal("0.002"),
                                                                   f"imbalance-{svc.start_ns:x}-2")
            second = results.next()
            assert second.verdict == "APPROVED" and second.position == 0
            assert svc.stats["decode_errors"] == 1
            line = KeyValueFormatter("strategy").format(second)
            micros = int(re.search(r"\btick_to_trade_us=(\d+)\b", line).group(1))
            assert 0 <= micros < WAIT_S * 1e6
        assert not liveness_path(cfg.common.run_dir, "strategy").exists()
    finally:
        risk.close()


def test_silent_risk_gets_the_same_order_then_is_treated_as_rejected(config, book, tmp_path, publisher,
                                                                    results):
    # the first three requests (one order: first try + two retries) go unanswered
    risk = FakeRisk(lambda req, n: None if n <= 3 else fill_all(req))
    risk.start()
    cfg = service_config(config, tmp_path, last_endpoint(publisher.sock), risk.endpoint,
                         QF_STRATEGY_TIMEOUT_MS="50", QF_STRATEGY_RETRIES="3")
    svc = StrategyService(cfg)
    try:
        with running(svc) as thread:
            payload, first = pump(publisher, risk, book, imbalance=0.9)
            retries = [risk.next_request() for _ in range(2)]
            assert [p for p, _ in retries] == [payload, payload], "a retry must resend the same bytes"
            rejected = results.next()
            assert (rejected.cid, rejected.verdict, rejected.reason, rejected.filled_qty) == (
                first.client_order_id, "REJECTED", "NO_REPLY", 0)
            assert svc.core.position("BTCUSDT") == 0 and svc.stats["no_reply"] == 1

            # still running: the next signal is a new order, and it goes through
            _, again = pump(publisher, risk, book, imbalance=0.9)
            assert again.client_order_id != first.client_order_id and again.side is Side.BUY
            assert results.next().verdict == "APPROVED"
            assert thread.is_alive()
            assert svc.core.position("BTCUSDT") == Decimal("0.001")
    finally:
        risk.close()


def test_an_error_reply_is_a_rejection_with_its_code(config, book, tmp_path, publisher, results):
    def answer(req, n):
        if n == 1:
            return messages.Error(ts=time.time_ns(), code="bad_field", text="qty: expected decimal")
        return fill_all(req)

    risk = FakeRisk(answer)
    risk.start()
    cfg = service_config(config, tmp_path, last_endpoint(publisher.sock), risk.endpoint)
    svc = StrategyService(cfg)
    try:
        with running(svc):
            pump(publisher, risk, book, imbalance=0.9)
            refused = results.next()
            assert (refused.verdict, refused.reason, refused.position) == ("REJECTED", "bad_field", 0)
            _, retry = pump(publisher, risk, book, imbalance=0.9)
            assert retry.side is Side.BUY and results.next().verdict == "APPROVED"
    finally:
        risk.close()


def test_books_queued_while_waiting_for_risk_collapse_to_the_newest(config, book, tmp_path, results):
    # inproc delivery is immediate, so every book below is queued before risk answers
    pub = Publisher(f"inproc://md-{uuid.uuid4().hex}", hwm=100_000)
    release = threading.Event()

    def answer(req, n):
        if n == 1:
            release.wait(WAIT_S)  # hold the first order until the stale books are queued
        return fill_all(req)

    risk = FakeRisk(answer)
    risk.start()
    cfg = service_config(config, tmp_path, pub.endpoint, risk.endpoint, QF_SYMBOLS="btcusdt,ethusdt")
    svc = StrategyService(cfg)
    try:
        with running(svc):
            _, buy = pump(pub, risk, book, imbalance=0.9)
            assert buy.symbol == "BTCUSDT"
            stale_before = svc.stats["stale_books"]
            for i in range(1, 6):  # BTC turns ask-heavy (exit signal), ETH bid-heavy (entry signal)
                pub.publish("book.BTCUSDT", book(symbol="BTCUSDT", imbalance=-0.9, recv_ts=1_000 + i, update_id=i))
            for i in range(1, 4):
                pub.publish("book.ETHUSDT", book(symbol="ETHUSDT", imbalance=0.9, recv_ts=2_000 + i, update_id=i))
            release.set()
            orders = {req.symbol: req for _, req in (risk.next_request(), risk.next_request())}
            assert (orders["BTCUSDT"].side, orders["BTCUSDT"].signal_ts) == (Side.SELL, 1_005)
            assert (orders["ETHUSDT"].side, orders["ETHUSDT"].signal_ts) == (Side.BUY, 2_003)
            assert [results.next().verdict for _ in range(3)] == ["APPROVED"] * 3
            assert svc.stats["stale_books"] - stale_before >= 4 + 2
            with pytest.raises(queue.Empty):  # nothing acted on the older books
                risk.next_request(timeout=0.1)
    finally:
        risk.close()
        pub.close()


def test_client_order_ids_differ_across_restarts(config, tmp_path):
    cfg = service_config(config, tmp_path, "tcp://127.0.0.1:1", "tcp://127.0.0.1:2")
    first, second = StrategyService(cfg), StrategyService(cfg)
    assert first.core.id_prefix != second.core.id_prefix
    assert first.core.id_prefix.startswith("imbalance-")


class HighWater(dict):
    """A dict that remembers the most entries it ever held."""

    def __init__(self) -> None:
        super().__init__()
        self.most = 0

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        self.most = max(self.most, len(self))


def test_books_of_made_up_symbols_never_queue_up(config, book, tmp_path, results):
    # A flood of books with symbols the strategy does not trade used to be queued, one entry per
    # symbol, and handled one per loop turn: memory without bound, and the real books waited behind.
    pub = Publisher(f"inproc://md-{uuid.uuid4().hex}", hwm=100_000)
    release = threading.Event()

    def answer(req, n):
        if n == 1:
            release.wait(WAIT_S)  # the flood queues up while the first order waits for risk
        return fill_all(req)

    risk = FakeRisk(answer)
    risk.start()
    cfg = service_config(config, tmp_path, pub.endpoint, risk.endpoint)
    svc = StrategyService(cfg)
    svc.pending = HighWater()
    try:
        with running(svc):
            pump(pub, risk, book, imbalance=0.9)
            for i in range(5_000):
                pub.publish(f"book.X{i}USDT", book(symbol=f"X{i}USDT", imbalance=0.9, recv_ts=10_000 + i))
            pub.publish("book.BTCUSDT", book(imbalance=-0.9, recv_ts=99_999))
            release.set()
            assert results.next().verdict == "APPROVED"
            _, sell = risk.next_request()
            assert (sell.side, sell.signal_ts) == (Side.SELL, 99_999)
            assert results.next().verdict == "APPROVED"
            assert svc.pending.most <= 1 and svc.stats["other_symbols"] == 5_000
    finally:
        risk.close()
        pub.close()


def test_a_sell_of_what_the_account_does_not_hold_makes_the_strategy_take_risks_positions(
        config, book, tmp_path, publisher, results):
    """The imbalance strategy does not follow the broker's fills: after an order whose fate it
    never heard, it may think it holds what it does not. Risk refuses the SELL
    (INSUFFICIENT_BALANCE); the strategy asks risk's positions (STATE) and is flat again, so its
    next signal is a BUY, not the same refused SELL for ever."""
    def answer(req, n):
        if req.side is Side.SELL:
            return Decision(ts=time.time_ns(), client_order_id=req.client_order_id, verdict=Verdict.REJECTED,
                            reason={"code": "INSUFFICIENT_BALANCE", "text": "needs 0.001 BTC, 0 BTC free"})
        return fill_all(req)
    risk = FakeRisk(answer)
    risk.start()
    cfg = service_config(config, tmp_path, last_endpoint(publisher.sock), risk.endpoint)
    svc = StrategyService(cfg)
    try:
        with running(svc):
            _, buy = pump(publisher, risk, book, imbalance=0.9)
            assert buy.side is Side.BUY and results.next().verdict == "APPROVED"
            risk.positions = {}  # the BUY's fill never reached risk's account (say, a broker crash)
            _, sell = pump(publisher, risk, book, imbalance=-0.9)
            assert sell.side is Side.SELL and results.next().reason == "INSUFFICIENT_BALANCE"
            wait_for(lambda: svc.stats["resyncs"] == 1, WAIT_S, "the resync")
            assert svc.core.position("BTCUSDT") == 0 and risk.states == 1
            _, again = pump(publisher, risk, book, imbalance=0.9)
            assert again.side is Side.BUY
    finally:
        risk.close()
