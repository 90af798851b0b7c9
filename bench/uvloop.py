"""uvloop or not: marketdata's WebSocket ingest on asyncio's loop, on uvloop's, and as it runs today."""
# Issue #16 asks for uvloop "where it measurably helps the asyncio ingest path of marketdata".
# That path has no event loop: LiveFeed (live.py) reads each connection with websockets' sync
# client on its own thread (binance.py Conn) and fetches snapshots with urllib on another
# (SnapshotFetcher), handing records to the service's loop through a queue. uvloop replaces an
# asyncio loop, so it cannot touch that path as it is. What can be measured is the ingest
# marketdata would need for uvloop to apply: websockets' asyncio client reading the same stream
# into the same BookRouter, on asyncio's default loop and on uvloop's, beside the real LiveFeed.
#
# The exchange is a fake Binance in another process (so it does not share this one's GIL) that
# sends the real spot BTCUSDT capture's depth and trade frames, pre-framed, with a plain socket:
# tests/fakes/binance.py's FakeBinance keeps the exchange's own book in Decimals for every event
# and would be slower than the client it feeds. Each run: sync on the first PREFIX frames and the
# capture's REST snapshot, then BLAST frames written at once (events/s: the client's pace), then
# PACED frames at PACE_PER_S (latency: the server's send to the end of BookRouter.dispatch, both
# on CLOCK_MONOTONIC). The three ingests take turns, ROUNDS times, in a rotating order.
#
# Measured 2026-12-07 on the 2-core VM, uvloop 0.23.0, 3 × 5 rounds: uvloop / asyncio events/s
# 0.98–1.03 (median of each invocation's rounds), p50 1–7 µs lower, p99 lower in two invocations
# and 2.3× higher in the third. Under the 5 % bar, on a path marketdata does not have: no uvloop
# (README). The asyncio reader itself beat LiveFeed's thread hand-off: p50 53–59 against 73–98 µs
# at 1000 frames/s, 81 against 206 µs at 100/s.
from __future__ import annotations

import asyncio
import base64
import gc
import hashlib
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

import orjson

from bench.common import free_port
from bench.stats import percentile
from services.marketdata.binance import SnapshotFetcher
from services.marketdata.records import RawFrame, RouteOpened, SnapshotRecord
from services.marketdata.symbols import Route, streams_for
from services.marketdata.sync import Market

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTURE = os.path.join(ROOT, "tests", "data", "binance-spot-btcusdt-20240808.jsonl.gz")
KEY = "BTCUSDT"
PREFIX, BLAST, PACED = 50, 20_000, 3_000  # frames per run (the capture has 26,399 depth + trade frames)
PACE_PER_S = 1_000  # one frame a millisecond: each one wakes the reader
ROUNDS = 5
RUN_TIMEOUT_S = 60.0
VARIANTS = ("threaded", "asyncio", "uvloop")
UVLOOP_PIN = "uvloop==0.23.0"
STREAM_PATH = "/stream?streams=" + "/".join(streams_for([KEY.lower()]))
_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def load(path: str = CAPTURE) -> tuple[list[bytes], dict]:
    """(every depth and trade message of the capture as Binance's combined-stream JSON, in
    order; the capture's first REST snapshot)."""
    from services.marketdata.capture import iter_capture

    frames, snap = [], None
    for rec in iter_capture(path):
        if rec["k"] == "snapshot" and snap is None:
            snap = rec["m"]
        elif rec["k"] == "ws" and "@bookTicker" not in rec["m"]["stream"]:
            frames.append(orjson.dumps(rec["m"]))
    if snap is None:
        raise ValueError(f"{path}: no snapshot")
    return frames, snap


# -- the fake exchange (its own process: `python -m bench.uvloop serve ...`) ------------------

def ws_frame(payload: bytes) -> bytes:
    """`payload` as one unmasked text frame, as a server sends it (RFC 6455 §5.2)."""
    n = len(payload)
    head = bytes((0x81, n)) if n < 126 else bytes((0x81, 126)) + n.to_bytes(2, "big") if n < 65536 \
        else bytes((0x81, 127)) + n.to_bytes(8, "big")
    return head + payload


class _Snapshot(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        body = self.server.snapshot
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def _handshake(conn: socket.socket) -> None:
    raw = b""
    while b"\r\n\r\n" not in raw:
        chunk = conn.recv(4096)
        if not chunk:
            raise ConnectionError("closed during the handshake")
        raw += chunk
    key = next(line.split(b":", 1)[1].strip() for line in raw.split(b"\r\n")
               if line.lower().startswith(b"sec-websocket-key:"))
    accept = base64.b64encode(hashlib.sha1(key + _WS_GUID).digest())
    conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")


def serve(path: str, prefix: int, blast: int, paced: int, rate: float) -> None:
    """The fake exchange: prints `ports WS REST`, then for each connection sends the first
    `prefix` frames, on `blast` (a stdin line) the next `blast` at once, on `paced` the next
    `paced` at `rate` a second and prints `paced` + their send times (monotonic ns as each send
    began, JSON),
    answers the client's close and prints `closed`. Runs until killed."""
    frames, snap = load(path)
    if prefix + blast + paced > len(frames):
        raise SystemExit(f"the capture has {len(frames)} frames, not {prefix + blast + paced}")
    wire = [ws_frame(f) for f in frames]
    head, burst = b"".join(wire[:prefix]), b"".join(wire[prefix:prefix + blast])
    tail = wire[prefix + blast:prefix + blast + paced]
    rest = ThreadingHTTPServer(("127.0.0.1", 0), _Snapshot)
    rest.daemon_threads, rest.snapshot = True, orjson.dumps(snap)
    threading.Thread(target=rest.serve_forever, daemon=True).start()
    listener = socket.create_server(("127.0.0.1", 0))
    print(f"ports {listener.getsockname()[1]} {rest.server_address[1]}", flush=True)
    commands, interval, parent = sys.stdin, 1e9 / rate, os.getppid()
    listener.settimeout(1.0)
    while True:
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            if os.getppid() != parent:
                return  # the bench is gone without killing us
            continue
        with conn:
            conn.settimeout(None)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _handshake(conn)
            conn.sendall(head)
            if commands.readline().strip() != "blast":
                return
            conn.sendall(burst)
            if commands.readline().strip() != "paced":
                return
            sent, mono, start = [], time.monotonic_ns, time.monotonic_ns()
            for i, frame in enumerate(tail):
                wait = start + i * interval - mono()
                if wait > 0:
                    time.sleep(wait / 1e9)
                sent.append(mono())  # as the send begins: stamped after it, a descheduled exchange
                conn.sendall(frame)  # could stamp a frame the client had already handled (negative)
            print("paced " + orjson.dumps(sent).decode(), flush=True)
            conn.settimeout(5)
            try:
                if conn.recv(4096):  # the client's close frame (masked; its content does not matter)
                    conn.sendall(b"\x88\x02\x03\xe8")  # close, 1000
            except OSError:
                pass
        print("closed", flush=True)


class FakeExchange:
    """The `serve` process, started and stopped from here; `ws_url` and `rest_url` are its bases."""

    def __init__(self, path: str, prefix: int, blast: int, paced: int, rate: float) -> None:
        self.prefix, self.blast, self.paced = prefix, blast, paced
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.uvloop", "serve", path, str(prefix), str(blast), str(paced), str(rate)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT, text=True)
        self.lines: queue.SimpleQueue = queue.SimpleQueue()  # what it prints, read by a thread: no buffer to miss
        self.reader = threading.Thread(target=self._read, daemon=True, name="bench-exchange-out")
        self.reader.start()
        try:
            words = self.readline(30).split()
            if words[:1] != ["ports"]:
                raise RuntimeError(f"the fake exchange did not start: {words}")
        except BaseException:
            self.close()
            raise
        self.ws_url, self.rest_url = f"ws://127.0.0.1:{words[1]}", f"http://127.0.0.1:{words[2]}"

    def send(self, command: str) -> None:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put("")

    def readline(self, timeout_s: float) -> str:
        """The next line the server printed. Raises RuntimeError after `timeout_s` or at its exit."""
        try:
            line = self.lines.get(timeout=timeout_s)
        except queue.Empty:
            raise RuntimeError(f"the fake exchange said nothing for {timeout_s:g} s") from None
        if not line:
            self.lines.put("")
            raise RuntimeError(f"the fake exchange exited ({self.proc.wait()})")
        return line

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.reader.join(5)  # it reads to the end of the pipe
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


# -- the client side ------------------------------------------------------------------------

class Session:
    """One run around BookRouter.dispatch: counts the frames, tells the exchange to go on (the
    blast once the book is synced after the prefix, the paced frames once the blast is in) and
    notes when each paced frame was done. `finished` once the last one is."""

    def __init__(self, router, exchange: FakeExchange) -> None:
        self.router, self.exchange = router, exchange
        self.n, self.phase = 0, 0  # 0 syncing, 1 blast, 2 paced, 3 finished
        self.blast_end = exchange.prefix + exchange.blast
        self.end = self.blast_end + exchange.paced
        self.t_go = self.t_blast = 0
        self.done: list[int] = []

    @property
    def finished(self) -> bool:
        return self.phase == 3

    def dispatch(self, rec, now_ns: int, now: float) -> None:
        self.router.dispatch(rec, now_ns, now)
        if type(rec) is not RawFrame:
            if self.phase == 0:
                self._maybe_go()
            return
        self.n += 1
        phase = self.phase
        if phase == 2:
            self.done.append(time.monotonic_ns())
            if self.n == self.end:
                self.phase = 3
        elif phase == 1:
            if self.n == self.blast_end:
                self.t_blast = time.monotonic_ns()
                self.phase = 2
                self.exchange.send("paced")
        elif phase == 0:
            self._maybe_go()

    def _maybe_go(self) -> None:
        if self.n == self.exchange.prefix and self.router.state[KEY] == "SYNCED":
            self.phase = 1
            self.t_go = time.monotonic_ns()
            self.exchange.send("blast")


def ingest_threaded(ws_url: str, rest_url: str, sink, timeout_s: float = RUN_TIMEOUT_S) -> None:
    """The real LiveFeed (a Conn thread, a SnapshotFetcher thread) into `sink.dispatch`, as
    MarketDataService's loop hands records over, until `sink.finished`. Raises TimeoutError."""
    from services.marketdata.live import LiveFeed
    from shared import config as qfconfig

    md = qfconfig.load({"QF_SYMBOLS": KEY.lower(), "QF_BINANCE_WS": ws_url, "QF_BINANCE_REST": rest_url}).md
    router = sink.router
    feed = router.feed = LiveFeed(md, router.keys, router.m, lambda: sink.finished)
    deadline = time.monotonic() + timeout_s
    try:
        dispatch, wall, mono = sink.dispatch, time.time_ns, time.monotonic
        for rec in feed.records():
            now = mono()
            dispatch(rec, wall(), now)
            if sink.finished:
                break
            if now > deadline:
                raise TimeoutError(f"the threaded ingest did not finish in {timeout_s:g} s")
    finally:
        feed.close()


class AsyncSnapshots:
    """What BookRouter asks of a feed, for the asyncio ingest: snapshots by the real
    SnapshotFetcher.fetch (urllib) on a worker thread, dispatched on the loop."""

    def __init__(self, rest_url: str, sink, limit: int = 1000) -> None:
        self.sink = sink
        self.fetcher = SnapshotFetcher(Market.SPOT, rest_url, limit, queue.SimpleQueue(), sink.router.m)
        self.tasks: set[asyncio.Task] = set()

    def request_snapshot(self, route: Route, name: str) -> None:
        task = asyncio.get_running_loop().create_task(self._fetch(route, name))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _fetch(self, route: Route, name: str) -> None:
        snap = await asyncio.to_thread(self.fetcher.fetch, name)
        self.sink.dispatch(SnapshotRecord(time.time_ns(), name, snap, route), time.time_ns(), time.monotonic())

    def switched(self, route: Route) -> None:
        pass

    def reconnect(self, market: Market, why: str) -> None:
        pass

    def server_shutdown(self, route: Route) -> None:
        pass


async def _read(ws_url: str, rest_url: str, sink) -> None:
    from websockets.asyncio.client import connect

    router = sink.router
    snapshots = router.feed = AsyncSnapshots(rest_url, sink)
    route = Route(Market.SPOT, router.keys, gen=1)
    # the options binance.py's Conn gives the sync client
    async with connect(ws_url + STREAM_PATH, open_timeout=10, close_timeout=1, max_size=2 ** 22,
                       compression=None) as ws:
        recv, dispatch, wall, mono = ws.recv, sink.dispatch, time.time_ns, time.monotonic
        dispatch(RouteOpened(wall(), route), wall(), mono())
        while not sink.finished:
            frame = await recv(decode=False)
            dispatch(RawFrame(wall(), frame, route), wall(), mono())
    for task in list(snapshots.tasks):
        task.cancel()


def ingest_async(ws_url: str, rest_url: str, sink, loop_factory: Callable | None = None,
                 timeout_s: float = RUN_TIMEOUT_S) -> None:
    """websockets' asyncio client reading the stream into `sink.dispatch` on a loop from
    `loop_factory` (None: asyncio's default; uvloop.new_event_loop), until `sink.finished`.
    Raises TimeoutError."""
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(asyncio.wait_for(_read(ws_url, rest_url, sink), timeout_s))


# -- the benchmark --------------------------------------------------------------------------

def one_run(variant: str, exchange: FakeExchange, pub) -> dict:
    """One connection through `variant`'s ingest into a fresh BookRouter publishing on `pub`.
    Returns its events/s, latencies (µs) and the last update id published."""
    from services.marketdata.router import BookRouter
    from shared.runtime import quiet_gc

    router = BookRouter((KEY,), 10, None, now_ns=time.time_ns())
    router.pub, router.live_feed = pub, True
    sink = Session(router, exchange)
    quiet_gc()  # as MarketDataService.run does before its loop
    if variant == "threaded":
        ingest_threaded(exchange.ws_url, exchange.rest_url, sink)
    else:
        factory = _uvloop().new_event_loop if variant == "uvloop" else None
        ingest_async(exchange.ws_url, exchange.rest_url, sink, factory)
    words = exchange.readline(RUN_TIMEOUT_S).split(" ", 1)
    if words[0] != "paced":
        raise RuntimeError(f"unexpected line from the fake exchange: {words[0][:80]}")
    sent = orjson.loads(words[1])
    if exchange.readline(RUN_TIMEOUT_S).strip() != "closed":
        raise RuntimeError("the fake exchange did not see the connection close")
    stats = router.stats
    if stats["gaps"] or stats["bad_messages"] or len(sent) != len(sink.done):
        raise RuntimeError(f"{variant}: gaps {stats['gaps']}, bad {stats['bad_messages']}, "
                           f"{len(sink.done)} of {len(sent)} paced frames")
    return {"events_per_s": exchange.blast / ((sink.t_blast - sink.t_go) / 1e9),
            "lat_us": [(d - s) / 1000 for d, s in zip(sink.done, sent)],
            "last_uid": router.last_uid[KEY], "books": stats["book_events"]}


def _uvloop():
    import uvloop  # absolute: the package, not this module

    return uvloop


def run() -> dict[str, float]:
    """Measure and return (ROUNDS runs of each ingest, taking turns in a rotating order):

    - md_ingest_events_per_s_{threaded,asyncio,uvloop}: depth + trade frames of the real spot
      BTCUSDT capture a second, BLAST frames written at once by the fake exchange, from the
      command to the end of the last one's BookRouter.dispatch (parse, book, metrics, publish
      on a real PUB socket); the median of the runs. threaded: the real LiveFeed; asyncio /
      uvloop: websockets' asyncio client on that loop.
    - md_ingest_us_p50_* / _p99_*: PACED frames at PACE_PER_S, from the exchange's send to the
      end of dispatch, pooled over the runs.
    - md_ingest_uvloop_speedup: uvloop's events/s over asyncio's, the median of the rounds'
      ratios; md_ingest_uvloop_vs_threaded: the same against the real LiveFeed.
    Returns {} (and says why) when uvloop is not installed. Raises RuntimeError when a run
    loses frames, sees a gap or ends on another book than the others."""
    try:
        version = _uvloop().__version__
    except ImportError:
        print(f"bench.uvloop skipped: uvloop is not installed (a dev-only measurement: "
              f"{sys.executable} -m pip install {UVLOOP_PIN})", flush=True)
        return {}
    from shared.bus import Publisher

    print(f"uvloop {version}; {ROUNDS} rounds; {BLAST} frames at once, {PACED} at {PACE_PER_S}/s", flush=True)
    threshold = gc.get_threshold()
    exchange = FakeExchange(CAPTURE, PREFIX, BLAST, PACED, PACE_PER_S)
    pub = Publisher(f"tcp://127.0.0.1:{free_port()}", 1_000_000)
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    try:
        for r in range(ROUNDS):
            for variant in VARIANTS[r % 3:] + VARIANTS[:r % 3]:
                res = one_run(variant, exchange, pub)
                runs[variant].append(res)
                lat = res["lat_us"]
                print(f"  round {r + 1} {variant:<8} {res['events_per_s']:>8.0f} events/s  "
                      f"p50 {percentile(lat, 50):6.1f} µs  p99 {percentile(lat, 99):7.1f} µs", flush=True)
    finally:
        pub.close()
        exchange.close()
        gc.unfreeze()
        gc.set_threshold(*threshold)
    if len({res["last_uid"] for rs in runs.values() for res in rs}) != 1:
        raise RuntimeError("the runs did not end on the same book")
    out: dict[str, float] = {}
    for v, rs in runs.items():
        out[f"md_ingest_events_per_s_{v}"] = round(_median([res["events_per_s"] for res in rs]))
    for v, rs in runs.items():
        pooled = [x for res in rs for x in res["lat_us"]]
        out[f"md_ingest_us_p50_{v}"] = round(percentile(pooled, 50), 1)
        out[f"md_ingest_us_p99_{v}"] = round(percentile(pooled, 99), 1)
    eps = {v: [res["events_per_s"] for res in rs] for v, rs in runs.items()}
    out["md_ingest_uvloop_speedup"] = round(_median([u / a for u, a in zip(eps["uvloop"], eps["asyncio"])]), 3)
    out["md_ingest_uvloop_vs_threaded"] = round(_median([u / t for u, t in zip(eps["uvloop"], eps["threaded"])]), 3)
    return out


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2] if len(xs) % 2 else sum(sorted(xs)[len(xs) // 2 - 1:len(xs) // 2 + 1]) / 2


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        p, b, n, rate = sys.argv[3:7]
        serve(sys.argv[2], int(p), int(b), int(n), float(rate))
    else:
        for key, value in run().items():
            print(f"{key:<36} {value}")
