"""Tick-to-trade's floor on this machine: the pipeline's shape with no work in it.

Four processes with the real services' sockets and subscriptions (bench/tick_to_trade.py runs
the real ones): marketdata's PUB sends a ~300-byte msgpack map stamped with its send time at the
replay's book rate; the strategy SUBs books, trades, fills, orders and risk.state, and every
FIFTH book sends an order (a ~300-byte map) to risk's ROUTER through a REQ, as the imbalance
strategy does, and waits for the answer; risk SUBs books and forwards the order to the broker's
ROUTER through a REQ; the broker SUBs books, answers with a ~300-byte ack and publishes a fill on
its PUB. Every process decodes what it receives and encodes what it sends; nothing else. The
strategy's tick-to-trade is the answer's arrival minus the book's stamp, as the real one logs it
(`tick_to_trade_us`: book received by marketdata → fill acknowledged to the strategy).

`python -m bench.tick_to_trade_floor` prints the figures; `run()` returns them."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

import msgpack
import zmq

from bench.common import clean_environ, free_port
from bench.stats import percentile

BOOKS_PER_S = 100  # the real bench's rate: the capture's books at QF_REPLAY_SPEED=10
ORDER_EVERY = 5
SAMPLES, WARMUP = 400, 5
PAD = "x" * 200  # brings each map to ~300 bytes


def _map(kind: str, n: int, ts: int) -> dict:
    return {"kind": kind, "n": n, "ts": ts, "symbol": "BTCUSDT", "pad": PAD,
            "bids": [[61000.5, 0.25], [61000.4, 1.5]], "asks": [[61000.6, 0.75], [61000.7, 2.0]]}


def _pack(obj: dict) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _unpack(data: bytes) -> dict:
    return msgpack.unpackb(data, raw=False)


def marketdata(md_pub: str, seconds: float) -> None:
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    pub.bind(md_pub)
    period = 1e9 / BOOKS_PER_S
    start = time.monotonic_ns() + 500_000_000  # subscribers join meanwhile
    n = 0
    while True:
        due = start + n * period
        now = time.monotonic_ns()
        if now < due:
            time.sleep((due - now) / 1e9)  # the replay's pace, as the real replay sleeps
        if now - start > seconds * 1e9:
            break
        pub.send_multipart([b"book.BTCUSDT", _pack(_map("book", n, time.time_ns()))])
        n += 1
    pub.close(linger=0)


def strategy(md_pub: str, risk_rep: str, broker_pub: str, risk_pub: str, out: str) -> None:
    ctx = zmq.Context.instance()
    md = ctx.socket(zmq.SUB)
    for t in (b"book.", b"trade."):
        md.setsockopt(zmq.SUBSCRIBE, t)
    md.connect(md_pub)
    events = ctx.socket(zmq.SUB)
    for t in (b"fill.", b"order."):
        events.setsockopt(zmq.SUBSCRIBE, t)
    events.connect(broker_pub)
    state = ctx.socket(zmq.SUB)
    state.setsockopt(zmq.SUBSCRIBE, b"risk.state")
    state.connect(risk_pub)
    req = ctx.socket(zmq.REQ)
    req.connect(risk_rep)
    poller = zmq.Poller()
    for s in (md, events, state):
        poller.register(s, zmq.POLLIN)
    samples: list[int] = []
    books = 0
    while len(samples) < SAMPLES + WARMUP:
        ready = poller.poll(10_000)
        if not ready:
            break  # marketdata has stopped: what was measured is written
        for sock, _ in ready:
            _, data = sock.recv_multipart()
            msg = _unpack(data)
            if sock is not md:
                continue
            books += 1
            if books % ORDER_EVERY:
                continue
            sent = time.time_ns()
            req.send(_pack(_map("order", books, msg["ts"])))
            _unpack(req.recv())
            done = time.time_ns()
            samples.append((done - msg["ts"], done - sent))
    with open(out, "w") as f:
        f.write("\n".join(f"{total} {rtt}" for total, rtt in samples[WARMUP:]))


def _serve(md_pub: str, rep: str, pub_at: str, answer, then=None) -> None:
    """A ROUTER at `rep` answering each request with `answer(request map)`, then calling
    `then(request, pub)`; a SUB of books (each decoded, nothing more) and a PUB at `pub_at`:
    risk's and the broker's shape."""
    ctx = zmq.Context.instance()
    server = ctx.socket(zmq.ROUTER)
    server.bind(rep)
    md = ctx.socket(zmq.SUB)
    md.setsockopt(zmq.SUBSCRIBE, b"book.")
    md.connect(md_pub)
    pub = ctx.socket(zmq.PUB)
    pub.bind(pub_at)
    poller = zmq.Poller()
    for s in (server, md):
        poller.register(s, zmq.POLLIN)
    while True:
        for sock, _ in poller.poll():
            if sock is md:
                _unpack(md.recv_multipart()[1])
                continue
            ident, empty, data = server.recv_multipart()
            request = _unpack(data)
            server.send_multipart([ident, empty, _pack(answer(request))])
            if then is not None:
                then(request, pub)


def risk(md_pub: str, risk_rep: str, broker_rep: str, risk_pub: str) -> None:
    """Forwards each order to the broker through a REQ and passes its answer back."""
    broker = zmq.Context.instance().socket(zmq.REQ)
    broker.connect(broker_rep)

    def forward(order: dict) -> dict:
        broker.send(_pack(order))
        return _unpack(broker.recv())
    _serve(md_pub, risk_rep, risk_pub, forward)


def broker(md_pub: str, broker_rep: str, broker_pub: str) -> None:
    """Answers each order with an ack, then publishes its fill."""
    _serve(md_pub, broker_rep, broker_pub, lambda order: _map("ack", order["n"], order["ts"]),
           lambda order, pub: pub.send_multipart([b"fill.BTCUSDT", _pack(_map("fill", order["n"], order["ts"]))]))


def run() -> dict[str, float]:
    """The four processes on free loopback tcp ports (as the real bench); the figures."""
    ep = {k: f"tcp://127.0.0.1:{free_port()}" for k in ("md_pub", "risk_rep", "broker_rep", "broker_pub", "risk_pub")}
    tmp = tempfile.mkdtemp(prefix="qf-bench-floor-")
    out = os.path.join(tmp, "samples.txt")
    seconds = (SAMPLES + WARMUP) * ORDER_EVERY / BOOKS_PER_S + 30  # books enough, then some
    roles = {"broker": [ep["md_pub"], ep["broker_rep"], ep["broker_pub"]],
             "risk": [ep["md_pub"], ep["risk_rep"], ep["broker_rep"], ep["risk_pub"]],
             "strategy": [ep["md_pub"], ep["risk_rep"], ep["broker_pub"], ep["risk_pub"], out],
             "marketdata": [ep["md_pub"], str(seconds)]}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    procs = {name: subprocess.Popen([sys.executable, "-m", "bench.tick_to_trade_floor", name, *args], cwd=root,
                                    env=clean_environ(), stdin=subprocess.DEVNULL)
             for name, args in roles.items()}
    try:
        procs["strategy"].wait(timeout=seconds + 60)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
            p.wait(10)
    try:
        with open(out) as f:
            pairs = [tuple(int(x) / 1000 for x in line.split()) for line in f.read().splitlines() if line]
            samples, rtts = [total for total, _ in pairs], [rtt for _, rtt in pairs]
    except FileNotFoundError:
        raise RuntimeError("the floor's strategy wrote no samples") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if len(samples) < 20:
        raise RuntimeError(f"the floor measured only {len(samples)} orders")
    return {"tick_to_trade_floor_us_p50": round(percentile(samples, 50), 1),
            "tick_to_trade_floor_us_p99": round(percentile(samples, 99), 1),
            "tick_to_trade_floor_samples": len(samples),
            # the order's round trip alone (strategy → risk → broker → risk → strategy), and the rest
            "tick_to_trade_floor_rtt_us_p50": round(percentile(rtts, 50), 1),
            "tick_to_trade_floor_book_to_order_us_p50": round(percentile(
                [t - r for t, r in zip(samples, rtts)], 50), 1)}


def main(argv: list[str]) -> None:
    if not argv:
        print(run())
        return
    role, args = argv[0], argv[1:]
    if role == "marketdata":
        marketdata(args[0], float(args[1]))
    else:
        {"strategy": strategy, "risk": risk, "broker": broker}[role](*args)


if __name__ == "__main__":
    main(sys.argv[1:])
