"""Market data: latency per depth event through the service's publish path, and `qf book` throughput."""
from __future__ import annotations

import gc
import gzip
import os
import select
import subprocess
import sys
import time

import orjson

from bench.common import free_port
from bench.naive_book import NaiveBook
from services.marketdata import book, router
from services.marketdata.records import Disconnected, RawFrame, SnapshotRecord
from bench.stats import percentile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTURE = os.path.join(ROOT, "tests", "data", "binance-spot-btcusdt-20240808.jsonl.gz")
SYMBOL = "BTCUSDT"
WARMUP, PASSES, NAIVE_PASSES = 1, 3, 2  # passes over the whole capture
BOOK_RUNS = 3

# The subscriber: counts what it receives, says "ready" once subscribed (probes get through).
_DRAIN = r"""
import sys, zmq
s = zmq.Context().socket(zmq.SUB)
s.setsockopt(zmq.RCVHWM, 0)
s.setsockopt(zmq.SUBSCRIBE, b"")
s.connect(sys.argv[1])
n, ready = 0, False
while True:
    topic = s.recv_multipart()[0]
    if topic == b"bench.probe":
        if not ready:
            print("ready", flush=True)
            ready = True
    elif topic == b"bench.quit":
        break
    else:
        n += 1
print(n, flush=True)
"""


def load(path: str = CAPTURE) -> list[tuple]:
    """The capture as the benchmark's items: ("raw", frame bytes, level changes if a depth event else 0)
    or ("snapshot", SYMBOL, snap). A frame is the combined-stream message re-serialised by
    orjson, as Binance sends it."""
    from services.marketdata.capture import iter_capture

    items = []
    for rec in iter_capture(path):
        if rec["k"] == "ws":
            data = rec["m"]["data"]
            n = len(data["b"]) + len(data["a"]) if "@depth" in rec["m"]["stream"] else 0
            items.append(("raw", orjson.dumps(rec["m"]), n))
        elif rec["k"] == "snapshot":
            items.append(("snapshot", str(rec["s"]).upper(), rec["m"]))
    return items


class Drain:
    """A SUB socket in its own process that receives everything published; stop() returns the count."""

    def __init__(self, endpoint: str, pub_sock) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _DRAIN, endpoint], stdout=subprocess.PIPE,
                                     text=True)
        self.pub_sock = pub_sock
        deadline = time.monotonic() + 20
        try:
            # PUB drops what is sent before the subscription arrives: probe until it is through.
            while not select.select([self.proc.stdout], [], [], 0.01)[0]:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("the subscriber process did not connect")
                pub_sock.send_multipart([b"bench.probe", b""])
            if self.proc.stdout.readline().strip() != "ready":
                raise RuntimeError("the subscriber process did not start")
        except BaseException:
            self.proc.kill()
            self.proc.wait()
            raise

    def stop(self) -> int:
        """Tell the subscriber to finish; return how many messages it received (-1 if unknown)."""
        try:
            self.pub_sock.send_multipart([b"bench.quit", b""])
            out, _ = self.proc.communicate(timeout=60)
            return int(out.split()[-1])
        except (subprocess.TimeoutExpired, ValueError, IndexError):
            return -1
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


def _no_fast_parse(frame) -> None:
    return None


def _new_pass(svc, naive: bool) -> None:
    """Start the capture again as a fresh connection would (the router's own reset), books swapped
    for NaiveBook when asked."""
    svc.router.dispatch(Disconnected(time.time_ns(), "bench: next pass"), time.time_ns(), time.monotonic())
    # The naive pipeline parses every frame with orjson, as the C scanner's fallback does.
    router.parse_depth_frame = _no_fast_parse if naive else book.parse_depth_frame
    if naive:
        for route in svc.router.live_route.values():
            for sync in route.syncs.values():
                sync.book = NaiveBook(sync.book.symbol)


def service_latencies(items: list[tuple], svc, naive: bool, passes: int) -> tuple[list[int], list[int], int]:
    """Time what the service's loop does with every depth frame after the snapshot, the
    record as the feed hands it over: `router.dispatch(RawFrame(recv_ns, frame), time.time_ns(),
    time.monotonic())`, the two clock reads included. When it returns, every change of the
    event is in the book and the book is published.

    Returns (ns samples, the level changes of each sample's event, books published)."""
    pc, now, mono = time.perf_counter_ns, time.time_ns, time.monotonic
    dispatch, stats = svc.router.dispatch, svc.router.stats
    samples: list[int] = []
    sizes: list[int] = []
    published = 0
    for n in range(WARMUP + passes):
        _new_pass(svc, naive)
        lat, size, synced, before = [], [], False, 0
        for kind, a, b in items:
            if kind == "raw":
                rec = RawFrame(now(), a)  # made by the connection's thread, live
                if b and synced:
                    t0 = pc()
                    dispatch(rec, now(), mono())
                    lat.append(pc() - t0)
                    size.append(b)
                else:
                    dispatch(rec, now(), mono())
            else:
                dispatch(SnapshotRecord(now(), a, b), now(), mono())
                synced, before = True, stats["book_events"]  # that book is not a timed event's
        if n >= WARMUP:
            samples += lat
            sizes += size
            published += stats["book_events"] - before
    return samples, sizes, published


def core_latencies(items: list[tuple], naive: bool, passes: int) -> list[int]:
    """Parse (as the router does: the C scanner, else orjson; naive: orjson) + BookSync apply +
    metrics + encode of each depth frame, no shell and no socket."""
    from services.marketdata.sync import BookSync, Market, SyncResult
    from shared.messages import Book, encode

    pc, applied, loads, fast = time.perf_counter_ns, SyncResult.APPLIED, orjson.loads, book.parse_depth_frame
    samples: list[int] = []
    for n in range(WARMUP + passes):
        sync = BookSync(SYMBOL, Market.SPOT)
        if naive:
            sync.book = NaiveBook(SYMBOL)
        lat, seq = [], 0
        for kind, a, b in items:
            if kind == "snapshot":
                sync.on_snapshot(b)
            elif b:
                t0 = pc()
                data = (loads(a) if naive else fast(a) or loads(a))["data"]
                if sync.on_depth(data) is applied:
                    m, seq = sync.book.metrics(10), seq + 1
                    encode(Book(ts=time.time_ns(), symbol=SYMBOL, exch_ts=data["E"], update_id=data["u"],
                                bids=m.bids, asks=m.asks, mid=m.mid, spread=m.spread, spread_bps=m.spread_bps,
                                imbalance=m.imbalance, microprice=m.microprice, recv_ts=t0), seq)
                    lat.append(pc() - t0)
        if n >= WARMUP:
            samples += lat
    return samples


# `qf book` with bench/naive_book.py's dict book swapped in, for the comparison.
_NAIVE_QF = ("import sys; import services.marketdata.sync as s; from bench.naive_book import NaiveBook; "
             "s.OrderBook = NaiveBook; from services.cli import main; sys.exit(main(sys.argv[1:]))")


def qf_book_rates(path: str = CAPTURE, naive: bool = False) -> tuple[float, float]:
    """(capture lines/s of the `qf book` subprocess, of build_book in this process), medians of
    runs; with `naive`, both with NaiveBook in place of OrderBook."""
    from services.marketdata import sync
    from services.marketdata.capture import build_book

    with gzip.open(path, "rb") as fh:
        lines = sum(1 for _ in fh)
    script = os.path.join(os.path.dirname(sys.executable), "qf")
    cmd = [script] if os.path.exists(script) else [sys.executable, "-m", "services.cli"]
    if naive:
        cmd = [sys.executable, "-c", _NAIVE_QF]
    env = {k: v for k, v in os.environ.items() if not k.startswith("QF_")}
    walls, inproc = [], []
    for _ in range(BOOK_RUNS):
        t0 = time.perf_counter()
        out = subprocess.run([*cmd, "book", "--capture", path, "--symbol", SYMBOL.lower()],
                             capture_output=True, timeout=300, cwd=ROOT, env=env)
        walls.append(time.perf_counter() - t0)
        if out.returncode != 0 or orjson.loads(out.stdout)["symbol"] != SYMBOL:
            raise RuntimeError(f"qf book failed: {out.stderr.decode()[-300:]}")
        kept, sync.OrderBook = sync.OrderBook, NaiveBook if naive else sync.OrderBook
        try:
            t0 = time.perf_counter()
            build_book(path, SYMBOL)
            inproc.append(time.perf_counter() - t0)
        finally:
            sync.OrderBook = kept
    return lines / sorted(walls)[len(walls) // 2], lines / sorted(inproc)[len(inproc) // 2]


def _figures(prefix: str, ns: list[int], full: bool = False) -> dict[str, float]:
    us = [x / 1000 for x in ns]
    pcts = (50, 90, 99, 99.9) if full else (50, 99)
    out = {f"{prefix}_us_p{str(p).replace('.', '')}": round(percentile(us, p), 1) for p in pcts}
    if full:
        out[f"{prefix}_us_max"] = round(max(us), 1)
        out[f"{prefix}_samples"] = len(us)
    return out


def run() -> dict[str, float]:
    """Measure and return the figures (µs per depth event of the real spot BTCUSDT capture,
    pooled over the measured passes, after a warm-up pass):

    - md_event_*: one frame as the feed hands it over, what MarketDataService's loop does with
      it: `router.dispatch(RawFrame(recv_ns, frame), time.time_ns(), time.monotonic())`: the
      clock reads, parse, BookSync/OrderBook apply, top-10 metrics, `book.*` encode and
      publish on a real ZeroMQ PUB socket over tcp://127.0.0.1 to a SUB draining it in
      another process. Every message of the capture goes through (trades and
      bookTickers too, as live); only depth events are timed, from the first one after the
      snapshot, and every change of the event is applied inside the timed call.
      md_event_us_p99_lt100_levels and md_event_ns_per_level_ge100 show where the tail
      comes from.
    - md_core_event_*: the same work without the shell or socket: parse + apply + metrics +
      encode, depth events only.
    - md_naive_*: both again with bench.naive_book.NaiveBook in place of OrderBook.
    - book_replay_msgs_per_s: capture lines / wall seconds of the real `qf book --capture ...
      --symbol btcusdt` subprocess (interpreter start and gzip included);
      book_replay_inproc_msgs_per_s: the same build_book() call in this process;
      book_replay_naive_*: both with NaiveBook.
    Raises RuntimeError if the pipeline did not publish a book for every timed event.
    """
    from services.marketdata.service import MarketDataService
    from shared import config as qfconfig
    from shared.bus import Publisher

    items = load()
    # The capture held in memory is the benchmark's, not the service's: frozen, so the
    # collector does not walk 100k records on every full collection.
    gc.collect()
    gc.freeze()
    cfg = qfconfig.load({"QF_SYMBOLS": SYMBOL.lower()})
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    figures: dict[str, float] = {}
    try:
        svc = MarketDataService(cfg)
        svc.router.pub = pub = Publisher(endpoint, cfg.bus.hwm)
        try:
            drain = Drain(endpoint, pub.sock)
            try:
                ours, sizes, published = service_latencies(items, svc, False, PASSES)
                naive, _, naive_published = service_latencies(items, svc, True, NAIVE_PASSES)
            finally:
                received = drain.stop()
        finally:
            pub.close()
        if published != len(ours) or naive_published != len(naive):
            raise RuntimeError(f"timed {len(ours)}+{len(naive)} depth events but published "
                               f"{published}+{naive_published} books")
        sent = sum(pub.seqs.values())
        if received != sent:
            print(f"warning: the subscriber received {received} of {sent} messages", flush=True)
        figures.update(_figures("md_event", ours, full=True))
        # Where the tail comes from: events of < 100 level changes, and the cost per change of
        # the bigger ones (their latency over their size).
        small = [t for t, n in zip(ours, sizes) if n < 100]
        figures["md_event_us_p99_lt100_levels"] = round(percentile(small, 99) / 1000, 1)
        figures["md_event_ns_per_level_ge100"] = round(percentile(
            [t / n for t, n in zip(ours, sizes) if n >= 100], 50))
        figures.update(_figures("md_naive_event", naive))
        figures.update(_figures("md_core_event", core_latencies(items, False, PASSES)))
        figures.update(_figures("md_naive_core_event", core_latencies(items, True, NAIVE_PASSES)))
    finally:
        gc.unfreeze()
    figures["book_replay_msgs_per_s"], figures["book_replay_inproc_msgs_per_s"] = (
        round(r) for r in qf_book_rates())
    figures["book_replay_naive_msgs_per_s"], figures["book_replay_naive_inproc_msgs_per_s"] = (
        round(r) for r in qf_book_rates(naive=True))
    return figures


if __name__ == "__main__":
    for key, value in run().items():
        print(f"{key:<36} {value}")
