"""Many symbols: one marketdata process keeping 20 books in sync at once, its events/s, latency and drops."""
# Issue #17 §3 ("many symbols"). The load is the real spot BTCUSDT capture replayed side by side
# as N symbols (BTCUSDT, S01USDT, ...: the same timeline, renamed in the stream name, the events'
# `s` and the snapshot's "s"): a load test, not N markets. bookTicker messages are dropped, as
# marketdata does not subscribe to them by default (QF_MD_BOOK_TICKER).
#
# Events/s is measured on the live path of the real `qf marketdata` process: Binance's
# combined stream over a real WebSocket read by binance.Conn's thread, the thread hand-off,
# the C frame scanner, the books, `book.*`/`trade.*` on the real PUB socket, and the sync
# procedure itself (one REST snapshot per symbol). Not against tests/fakes/binance.py's
# FakeBinance: it keeps the exchange's own book in Decimals and its top 10 for every event and
# would be slower than the client it feeds (bench/uvloop.py's note), so its pace, not
# marketdata's, would be measured. Not a replay at QF_REPLAY_SPEED=0 either: that feeds decoded
# capture lines (gzip + JSON per line in the service's own loop, no socket, no frame scanner),
# a front end live marketdata does not have. The exchange is bench/uvloop.py's pre-framed fake
# in its own process, writing the whole stream at once, so marketdata runs as fast as it can.
# The latency per depth event is bench/marketdata.py's in-process measure, the N books'
# events interleaved, so that the two sit side by side.
#
# Measured 2026-12-07 on the 2-core VM (two runs of `python -m bench.run md_many`): 20 symbols
# 30.6k / 31.7k events/s against one symbol's 30.9k / 27.9k (single runs spread ±15 %: equal
# within the noise); per depth event p50 16.2 / 17.1 µs, p99 108 / 121 µs against one symbol's
# 18.6 / 16.7 and 141 / 112 in the same runs; 0 sequence gaps; RSS 48.7 MB with 20 books synced
# against 47.8 with one. Real Binance sends these 20 streams at ~810 events/s: ~38x headroom.
# An event costs ~31 µs of the one GIL, ~12 of them in Conn's reader thread (an instrumented
# run: ~18k events/s done while it reads, ~52k/s once it has read everything): it reads ahead of
# the loop until LiveFeed's inbox holds 2,048 frames, then waits (binance.Inbox), and the rest of
# the burst waits on TCP (peak RSS 54-57 MB; 293-325 MB when the inbox was unbounded).
from __future__ import annotations

import gc
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from typing import Iterable, Iterator

import orjson
import zmq

from bench import marketdata as md_bench
from bench.common import clean_environ, free_port
from bench.md_rss import rss_mib
from bench.uvloop import FakeExchange
from bench.uvloop import load as load_frames

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTURE = md_bench.CAPTURE
N_SYMBOLS = 20
LATENCY_PASSES = {1: md_bench.PASSES, N_SYMBOLS: 1}  # measured passes (after a warm-up): ~20k, ~130k samples
SYNC_TIMEOUT_S = 60.0
BLAST_TIMEOUT_S = 300.0
RSS_EVERY_S = 0.05
ROUNDS = {1: 5, N_SYMBOLS: 3}  # live runs (one exchange process serves them in turn); 1 symbol: < 1 s each


# -- the load -------------------------------------------------------------------------------

def symbol_names(n: int) -> tuple[str, ...]:
    """`n` symbol names: BTCUSDT (the capture's own), then S01USDT, S02USDT, ..."""
    return ("BTCUSDT",) + tuple(f"S{i:02d}USDT" for i in range(1, n))


def renamed(rec: dict, symbol: str) -> dict:
    """A record of a one-symbol capture as the same record of `symbol`: its stream name
    (`btcusdt@depth@100ms` -> `s01usdt@depth@100ms`), its event's `s`, a snapshot's "s"."""
    if rec["k"] != "ws":
        return {**rec, "s": symbol} if "s" in rec else rec
    m = rec["m"]
    stream = symbol.lower() + "@" + m["stream"].partition("@")[2]
    return {**rec, "m": {**m, "stream": stream, "data": {**m["data"], "s": symbol}}}


def _source(src: str, seconds: float | None, book_ticker: bool) -> list[dict]:
    from services.marketdata.capture import iter_capture

    out, first = [], None
    for rec in iter_capture(src):
        first = rec["t"] if first is None else first
        if seconds is not None and rec["t"] - first > seconds * 1e9:
            break
        if book_ticker or rec["k"] != "ws" or "@bookTicker" not in rec["m"]["stream"]:
            out.append(rec)
    return out


def _write(path: str, records: Iterable[dict]) -> None:
    with open(path, "wb") as fh:
        fh.writelines(orjson.dumps(r) + b"\n" for r in records)


def write_captures(out_dir: str, symbols: Iterable[str], src: str = CAPTURE, seconds: float | None = None,
                   book_ticker: bool = False, one_file: bool = False) -> dict[str, str]:
    """Write the one-symbol capture `src` replayed side by side as each of `symbols` (see
    `renamed`) into `out_dir`, as uncompressed `.jsonl`. `seconds`: only the records of its
    first `seconds` (recorded time); `book_ticker` False drops its bookTicker messages.
    `one_file`: every symbol's records in one file, merged in time (the timelines are the
    same: record by record, each symbol in turn), else one file per symbol.

    Returns {symbol: its capture's path}. Raises CaptureError / OSError as iter_capture does."""
    symbols = tuple(symbols)
    recs = _source(src, seconds, book_ticker)
    if one_file:
        path = os.path.join(out_dir, f"side-by-side-{len(symbols)}.jsonl")
        _write(path, (renamed(r, s) for r in recs for s in symbols))
        return dict.fromkeys(symbols, path)
    paths = {s: os.path.join(out_dir, f"{s.lower()}.jsonl") for s in symbols}
    for s, path in paths.items():
        _write(path, (renamed(r, s) for r in recs))
    return paths


# -- latency per depth event: bench/marketdata.py's measure, N books -------------------------

@contextmanager
def _published_to_drain(svc) -> Iterator[None]:
    """`svc`'s router publishing on a real PUB socket (the configured HWM) to a SUB draining
    it in another process, as bench/marketdata.py runs it. Raises RuntimeError if the
    subscriber did not receive every message published."""
    from shared.bus import Publisher

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    pub = svc.router.pub = Publisher(endpoint, svc.cfg.bus.hwm)
    try:
        drain = md_bench.Drain(endpoint, pub.sock)
        received = -1
        try:
            yield
        finally:
            received = drain.stop()
    finally:
        pub.close()
    if received != sum(pub.seqs.values()):
        raise RuntimeError(f"the subscriber received {received} of {sum(pub.seqs.values())} messages")


def dispatch_latencies(path: str, symbols: tuple[str, ...], passes: int) -> list[int]:
    """ns per depth event of the capture at `path` (all of `symbols` interleaved) through
    MarketDataService's router: md_bench.service_latencies, every event's book published.
    Raises RuntimeError if a timed event published no book."""
    from services.marketdata.service import MarketDataService
    from shared import config as qfconfig

    items = md_bench.load(path)
    gc.collect()
    gc.freeze()  # the capture held in memory is the benchmark's, as in bench/marketdata.py
    try:
        svc = MarketDataService(qfconfig.load({"QF_SYMBOLS": ",".join(symbols)}))
        with _published_to_drain(svc):
            ns, _, published = md_bench.service_latencies(items, svc, False, passes)
    finally:
        del items
        gc.unfreeze()
    if published != len(ns):
        raise RuntimeError(f"timed {len(ns)} depth events but published {published} books")
    return ns


# -- events/s of the real process on the live path -------------------------------------------

def blast_plan(frames: list[bytes], snap: dict) -> tuple[int, int, int]:
    """(prefix, u0, t0) for a stream of `frames` and its REST snapshot: the first `prefix`
    frames take every symbol to its depth event past the snapshot (so every book can sync
    before the rest); u0 / t0 are the highest depth update id / trade id among them. Each later
    frame makes exactly one message: a book with update_id > u0 or a trade with trade_id > t0.
    Raises ValueError if some symbol never gets past the snapshot."""
    msgs = [orjson.loads(f) for f in frames]
    waiting = {m["data"]["s"] for m in msgs}
    u0 = t0 = -1
    for i, m in enumerate(msgs):
        data = m["data"]
        if "@depth" in m["stream"]:
            u0 = max(u0, data["u"])
            if data["u"] > snap["lastUpdateId"]:
                waiting.discard(data["s"])
        else:
            t0 = max(t0, data["a"] if "@aggTrade" in m["stream"] else data["t"])
        if not waiting:
            return i + 1, u0, t0
    raise ValueError(f"no depth event past the snapshot for {sorted(waiting)[:3]}")


class Listener:
    """A real SUB subscriber (shared.bus.Subscriber, every topic, RCVHWM at the configured
    HWM) on a thread: the service's last heartbeat, the sequence gaps
    (`sub.missed`), and when the `expect`-th message past (u0, t0) arrived (`done`, `t_done`
    monotonic ns; see blast_plan)."""

    def __init__(self, endpoint: str, hwm: int) -> None:
        from shared.bus import Subscriber

        self.sub = Subscriber(endpoint, [""], hwm)
        self.heartbeat = None
        self.u0 = self.t0 = 1 << 62  # nothing counts before arm()
        self.expect, self.count, self.t_done = 0, 0, 0
        self.done = threading.Event()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="md-many-listener")
        self.thread.start()

    def arm(self, u0: int, t0: int, expect: int) -> None:
        """Count from now the books past u0 and trades past t0, done at `expect`."""
        self.expect, self.u0, self.t0 = expect, u0, t0

    def _run(self) -> None:
        from shared.errors import DecodeError

        sock, recv = self.sub.sock, self.sub.recv
        while not self._stop.is_set():
            if not sock.poll(100):
                continue
            while True:
                try:
                    _, msg = recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                except DecodeError:
                    continue
                kind = msg.TYPE
                if kind == "book":
                    self._tally(msg.update_id > self.u0)
                elif kind == "trade":
                    self._tally(msg.trade_id > self.t0)
                elif kind == "heartbeat":
                    self.heartbeat = msg

    def _tally(self, counts: bool) -> None:
        if counts:
            self.count += 1
            if self.count == self.expect:
                self.t_done = time.monotonic_ns()
                self.done.set()

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)
        self.sub.close()


class _Service:
    """The real `qf marketdata` process (QF_FEED=live against `exchange`, QF_SYMBOLS=`symbols`,
    QF_ZMQ_HWM as configured) with a Listener on its PUB socket; its output goes to a log file
    in `run_dir`. Use as a context manager: stopped (SIGTERM) on exit."""

    def __init__(self, exchange: FakeExchange, symbols: tuple[str, ...], run_dir: str) -> None:
        from shared import config as qfconfig

        os.makedirs(run_dir, exist_ok=True)
        self.log = os.path.join(run_dir, "marketdata.log")
        settings = {"QF_FEED": "live", "QF_SYMBOLS": ",".join(symbols), "QF_BINANCE_WS": exchange.ws_url,
                    "QF_BINANCE_REST": exchange.rest_url, "QF_MD_PUB": f"tcp://127.0.0.1:{free_port()}",
                    "QF_RUN_DIR": run_dir, "QF_HEARTBEAT_MS": "200", "QF_LOG_LEVEL": "WARNING"}
        self.listener = Listener(settings["QF_MD_PUB"], qfconfig.load(settings).bus.hwm)
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "services.cli", "marketdata"], cwd=ROOT,
                                         env={**clean_environ(), **settings, "PYTHONPATH": ROOT},
                                         stdout=out, stderr=subprocess.STDOUT)

    def __enter__(self) -> "_Service":
        return self

    def __exit__(self, *exc) -> None:
        proc = self.proc
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        self.listener.close()

    def exited(self) -> str:
        """'' while the process runs, else its exit status and the tail of its output."""
        if self.proc.poll() is None:
            return ""
        with open(self.log, "rb") as f:
            return f"marketdata exited ({self.proc.returncode}): {f.read()[-1500:].decode(errors='replace')}"

    def wait(self, predicate, timeout_s: float, what: str):
        """The first truthy value of `predicate()`, polled. Raises RuntimeError after `timeout_s`
        or when the process exits."""
        deadline = time.monotonic() + timeout_s
        while not (value := predicate()):
            if self.exited():
                raise RuntimeError(f"waiting for {what}: {self.exited()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no {what} after {timeout_s:g} s")
            time.sleep(0.02)  # polling a bounded wait
        return value

    def heartbeat(self, after_ns: int = 0, status: str | None = None):
        """Its last heartbeat if stamped after `after_ns` (and with `status`, if given), else None."""
        beat = self.listener.heartbeat
        if beat is None or beat.ts <= after_ns or (status is not None and beat.status != status):
            return None
        return beat


def _blast(svc: _Service, exchange: FakeExchange, u0: int, t0: int, events: int) -> dict:
    """One run: wait until every book is synced, then have `exchange` send the rest of its
    stream at once and time it to the last message. See live_runs for what it returns."""
    listener, pid = svc.listener, svc.proc.pid
    # heartbeats repeat (a book published before the SUB's connection was through would not)
    svc.wait(lambda: svc.heartbeat(status="ok"), SYNC_TIMEOUT_S, "a heartbeat with every book synced")
    synced_rss = peak = rss_mib(pid)
    listener.arm(u0, t0, events)
    t_go = time.monotonic_ns()
    exchange.send("blast")
    deadline = time.monotonic() + BLAST_TIMEOUT_S
    while not listener.done.wait(RSS_EVERY_S):
        peak = max(peak, rss_mib(pid))
        if time.monotonic() > deadline or svc.exited():
            raise RuntimeError(f"{listener.count} of {events} messages arrived. {svc.exited()}")
    peak = max(peak, rss_mib(pid))
    after = time.time_ns()
    beat = svc.wait(lambda: svc.heartbeat(after), 5, "a heartbeat after the load")
    exchange.send("paced")  # none: the exchange closes its side once the service has gone
    stats = beat.stats
    if stats["gaps"] or stats["resyncs"] or stats["bad_messages"] or beat.status != "ok":
        raise RuntimeError(f"marketdata did not keep every book in sync: {beat.status} {stats}")
    return {"events_per_s": events / ((listener.t_done - t_go) / 1e9), "missed": listener.sub.missed,
            "rss_mb": synced_rss, "rss_peak_mb": peak, "stats": stats}


def live_runs(path: str, symbols: tuple[str, ...], run_dir: str, rounds: int) -> list[dict]:
    """`rounds` runs of the real `qf marketdata` process against the fake exchange serving the
    capture at `path`: the prefix (blast_plan) until every book is synced, then the rest at
    once. Each returns events_per_s (frames of the rest over the time from the exchange's go to
    the last one's message at the subscriber), missed (sequence gaps the subscriber saw),
    rss_mb (VmRSS with every book synced, before the load), rss_peak_mb (the peak during it,
    sampled every RSS_EVERY_S) and the service's heartbeat stats after it. Raises RuntimeError
    if a book did not sync, a message did not arrive, or the service counted a gap, a resync
    or a bad message."""
    frames, snap = load_frames(path)
    prefix, u0, t0 = blast_plan(frames, snap)
    events = len(frames) - prefix
    del frames
    exchange = FakeExchange(path, prefix, events, 0, 1.0)
    out = []
    try:
        for r in range(rounds):
            with _Service(exchange, symbols, os.path.join(run_dir, f"round{r}")) as svc:
                out.append(_blast(svc, exchange, u0, t0, events))
            for line in ("paced", "closed"):  # the exchange is ready for the next connection
                if not exchange.readline(30).startswith(line):
                    raise RuntimeError(f"the fake exchange did not say {line!r}")
    finally:
        exchange.close()
    return out


# -- the benchmark --------------------------------------------------------------------------

def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def run() -> dict[str, float]:
    """Measure and return, for 1 symbol (the baseline: the same method in the same run) and
    for N_SYMBOLS of them side by side (n below):

    - md_{n}sym_events_per_s: depth + trade events a second one real `qf marketdata` process
      takes through the live path (see the module's header): its stream after sync (20
      symbols: 527,900 events) written at once by the fake exchange, from the go to the last
      event's message at a subscriber; the median of ROUNDS[n] runs.
    - md_{n}sym_event_us_p50 / _p99: µs per depth event through MarketDataService's router with
      every symbol's events interleaved, as bench/marketdata.py measures md_event_us_*
      (RawFrame in, book published on a real PUB socket to a subscriber process).
    - md_{n}sym_missed: sequence gaps seen by the real subscriber (shared.bus.Subscriber, RCVHWM
      at the configured QF_ZMQ_HWM, every topic) over the live runs; must be 0.
    - md_{n}sym_rss_mb: the process's resident memory with every book synced (median of the
      runs); md_{n}sym_rss_peak_mb: its peak while taking the stream at once (the largest of
      the runs): LiveFeed's reader thread queues frames faster than the loop handles them, up
      to its inbox's bound.
    Raises RuntimeError if a book did not sync, a message was lost or marketdata counted a gap."""
    tmp = tempfile.mkdtemp(prefix="qf-md-many-")
    out: dict[str, float] = {}
    try:
        for n in (1, N_SYMBOLS):
            names = symbol_names(n)
            path = write_captures(tmp, names, one_file=True)[names[0]]
            us = md_bench._figures(f"md_{n}sym_event", dispatch_latencies(path, names, LATENCY_PASSES[n]))
            runs = live_runs(path, names, os.path.join(tmp, f"{n}sym"), ROUNDS[n])
            os.remove(path)
            rates = [round(r["events_per_s"]) for r in runs]
            print(f"  {n} symbol(s): events/s {rates}, marketdata's stats {runs[-1]['stats']}", flush=True)
            out[f"md_{n}sym_events_per_s"] = _median(rates)
            out.update(us)
            out[f"md_{n}sym_missed"] = sum(r["missed"] for r in runs)
            out[f"md_{n}sym_rss_mb"] = round(_median([r["rss_mb"] for r in runs]), 1)
            out[f"md_{n}sym_rss_peak_mb"] = round(max(r["rss_peak_mb"] for r in runs), 1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


if __name__ == "__main__":
    for key, value in run().items():
        print(f"{key:<36} {value}")
