"""Paper broker: order ack latency and durable fills/s over a real broker process; FillModel cost per book event."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from decimal import Decimal

import zmq

from bench.stats import percentile
from services.broker.core import Order
from services.broker.fill_model import FillModel
from services.broker.latency import LatencyModel
from services.broker.queue import make_queue_model
from services.broker.replay import market_events
from shared import messages
from shared.bus import Publisher, Subscriber
from shared.enums import OrderKind, Side, TimeInForce
from shared.messages import Ack, Book, Heartbeat, OrderRequest
from shared.money import from_book_float
from bench.common import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTURE = os.path.join(ROOT, "tests", "data", "binance-spot-btcusdt-20240808.jsonl.gz")
ACK_SAMPLES, WARMUP = 3000, 200
THROUGHPUT_ORDERS, IN_FLIGHT = 6000, 64
RESTING = 100
TICK = Decimal("0.01")


def _order(coid: str, side: Side) -> OrderRequest:
    return OrderRequest(ts=time.time_ns(), client_order_id=coid, strategy="bench", symbol="BTCUSDT", side=side,
                        kind=OrderKind.MARKET, qty=Decimal("0.001"))


def _broker_figures(db: str | None = None, suffix: str = "") -> dict[str, float]:
    """A broker process (zero simulated latency: its own cost) on loopback TCP with a WAL database
    (or QF_DB `db`, e.g. a PostgreSQL URL; each key then ends in `suffix`)."""
    tmp = tempfile.mkdtemp(prefix="qf-bench-broker-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("QF_")}
    md, rep, pub = (f"tcp://127.0.0.1:{free_port()}" for _ in range(3))
    env.update({"QF_MD_PUB": md, "QF_BROKER_REP": rep, "QF_BROKER_PUB": pub, "QF_DB": db or f"{tmp}/bench.db",
                "QF_RUN_DIR": f"{tmp}/run", "QF_BROKER_LATENCY_MODE": "constant", "QF_BROKER_LATENCY_MS": "0",
                "QF_LOG_LEVEL": "WARNING", "QF_START_CASH": "1000000000", "PYTHONPATH": ROOT})
    ctx = zmq.Context.instance()
    book_pub = Publisher(md, 100_000)
    hb = Subscriber(pub, ["heartbeat."], 100_000)
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "broker"], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    req = ctx.socket(zmq.REQ)
    dealer = ctx.socket(zmq.DEALER)
    try:
        deadline = time.monotonic() + 30
        while not (hb.sock.poll(100) and isinstance(hb.recv()[1], Heartbeat)):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("the broker did not start")
        # one deep level a side: every market order is one fill, one transaction (the worst case per fill)
        book = Book(ts=1, symbol="BTCUSDT", exch_ts=0, update_id=1, bids=[[99.0, 1e6]], asks=[[101.0, 1e6]],
                    mid=100.0, spread=2.0, spread_bps=200.0, imbalance=0.0, microprice=100.0)
        req.setsockopt(zmq.LINGER, 0)
        req.connect(rep)
        while True:  # until the broker has the book (a SUB joins asynchronously)
            book_pub.publish("book.BTCUSDT", book)
            req.send(messages.encode(_order(uuid.uuid4().hex, Side.BUY)))
            if not req.poll(5000):
                raise RuntimeError("no reply from the broker")
            if messages.decode(req.recv(), messages.REQUESTS).fills:
                break
        samples = []
        for i in range(ACK_SAMPLES + WARMUP):
            payload = messages.encode(_order(f"a{i}", Side.BUY if i % 2 else Side.SELL))
            start = time.perf_counter()
            req.send(payload)
            reply = req.recv()
            if i >= WARMUP:
                samples.append((time.perf_counter() - start) * 1e6)
            ack = messages.decode(reply, messages.REQUESTS)
            assert isinstance(ack, Ack) and len(ack.fills) == 1, ack
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(rep)
        sent = fills = 0
        start = time.perf_counter()
        while fills < THROUGHPUT_ORDERS:
            while sent < THROUGHPUT_ORDERS and sent - fills < IN_FLIGHT:
                dealer.send_multipart([b"", messages.encode(_order(f"t{sent}", Side.BUY if sent % 2 else Side.SELL))])
                sent += 1
            if not dealer.poll(5000):
                raise RuntimeError("the broker stopped answering")
            ack = messages.decode(dealer.recv_multipart()[-1], messages.REQUESTS)
            fills += len(ack.fills)
        elapsed = time.perf_counter() - start
    finally:
        for s in (req, dealer):
            s.close(linger=0)
        book_pub.close()
        hb.close()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    return {f"broker_ack_us_p50{suffix}": round(percentile(samples, 50), 1),
            f"broker_ack_us_p99{suffix}": round(percentile(samples, 99), 1),
            f"broker_durable_fills_per_s{suffix}": round(fills / elapsed)}


def _pg_figures() -> dict[str, float]:
    """The same broker with QF_DB on a real PostgreSQL server (tests/pg.py: Debian's, a temporary
    cluster, fsync on, synchronous_commit on): acks are durable in the broker's journal as with
    SQLite; its records are stored into the server off the answers' path. Checked after the stop:
    every fill answered is in the server's `fills` table. {} without PostgreSQL's binaries."""
    from tests import pg
    if pg.bin_dir() is None:
        return {}
    server = pg.start()
    try:
        url = server.create_database()
        figures = _broker_figures(url, "_pg")
        stored = pg.rows(url, 'SELECT COUNT(*) FROM "fills"')[0][0]
        expected = ACK_SAMPLES + WARMUP + THROUGHPUT_ORDERS  # one fill each (the first probes add a few)
        if stored < expected:
            raise RuntimeError(f"the broker stored {stored} fills into PostgreSQL, fewer than the {expected} answered")
        return figures
    finally:
        server.stop()


def _ladder_order(n: int, side: Side, price: Decimal, ts: int) -> Order:
    req = OrderRequest(ts=ts, client_order_id=f"r{n}", strategy="bench", symbol="BTCUSDT", side=side,
                       kind=OrderKind.LIMIT, qty=Decimal("0.01"), price=price, tif=TimeInForce.GTC)
    return Order.from_request(req, f"o{n}", ts)


def _match_figures() -> dict[str, float]:
    """FillModel over the real capture with 100 resting orders (refilled as they fill), timing each event."""
    events = list(market_events(CAPTURE, "BTCUSDT"))
    model = FillModel(Decimal("0.001"), Decimal("0.001"), make_queue_model("power", 2), LatencyModel("constant", 0))
    book_ns, books, trade_ns, trades, n = 0, 0, 0, 0, 0
    for ev in events:
        if isinstance(ev, Book):
            held = sum(len(r) for r in model.resting.values())
            if held < RESTING and ev.bids and ev.asks:
                bid, ask = from_book_float(ev.bids[0][0]), from_book_float(ev.asks[0][0])
                while held < RESTING:  # spread over the visible depth and beyond, both sides
                    n += 1
                    depth = n % 60
                    side = Side.BUY if n % 2 else Side.SELL
                    price = bid - TICK * depth if side is Side.BUY else ask + TICK * depth
                    model.submit(_ladder_order(n, side, price, ev.ts), ev.ts)
                    held += 1
                model.advance(ev.ts)
            start = time.perf_counter_ns()
            model.on_book(ev, ev.ts)
            book_ns += time.perf_counter_ns() - start
            books += 1
        else:
            start = time.perf_counter_ns()
            model.on_trade(ev, ev.ts)
            trade_ns += time.perf_counter_ns() - start
            trades += 1
    return {"broker_match_us_per_event": round(book_ns / books / 1000, 2),
            "broker_match_us_per_trade": round(trade_ns / trades / 1000, 2),
            "broker_match_orders_placed": n}


def run() -> dict[str, float]:
    return {**_broker_figures(), **_pg_figures(), **_match_figures()}
