"""Binance I/O: a WebSocket read by its own thread, REST depth snapshots within the weight limit."""
from __future__ import annotations

import logging
import queue
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from typing import Callable, NamedTuple

import orjson

from services.marketdata.feeds import Backoff
from services.marketdata.metrics import MdMetrics
from services.marketdata.records import RawFrame, SnapshotRecord
from services.marketdata.symbols import Route
from services.marketdata.sync import Market
from shared.errors import TransientError

log = logging.getLogger("qf.marketdata.binance")

DEPTH_PATH = {Market.SPOT: "/api/v3/depth", Market.USDM: "/fapi/v1/depth"}
WEIGHT_LIMIT = {Market.SPOT: 6000, Market.USDM: 2400}  # REQUEST_WEIGHT per minute and IP
USDM_LIMITS = (5, 10, 20, 50, 100, 500, 1000)  # the only limits /fapi/v1/depth accepts
DEFAULT_RETRY_AFTER_S = 60.0  # a 429/418 without Retry-After: wait a full weight window
REST_TIMEOUT_S = 10.0


def snapshot_limit(market: Market, limit: int) -> int:
    """The snapshot limit to ask for: as configured on spot; on USD-M the largest valid one <= it."""
    if market is Market.USDM:
        return max([v for v in USDM_LIMITS if v <= limit] or [USDM_LIMITS[0]])
    return limit


def depth_weight(market: Market, limit: int) -> int:
    """Request weight of one depth snapshot (Binance's tables, spot and USD-M)."""
    if market is Market.USDM:
        return 2 if limit <= 50 else 5 if limit <= 100 else 10 if limit <= 500 else 20
    return 5 if limit <= 100 else 25 if limit <= 500 else 50 if limit <= 1000 else 250


class RateLimited(TransientError):
    """HTTP 429 (slow down) or 418 (IP banned). Handled by the fetcher: no request to that
    host until `retry_after_s` has passed."""

    def __init__(self, status: int, retry_after_s: float) -> None:
        self.status, self.retry_after_s = status, retry_after_s
        super().__init__(f"HTTP {status}, Retry-After {retry_after_s:g}s")


class WeightGate:
    """The per-minute request weight as seen from here: Binance's X-MBX-USED-WEIGHT-1m plus what
    was sent since, so a snapshot waits for the next minute rather than earn a 429. Pure: the
    wall-clock time is an argument."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.minute = -1
        self.used = 0

    def delay(self, weight: int, now_s: float) -> float:
        """Seconds to wait before spending `weight` (0 if it fits in this minute)."""
        if int(now_s // 60) != self.minute or self.used + weight <= self.limit:
            return 0.0
        return (self.minute + 1) * 60 - now_s

    def spent(self, weight: int, now_s: float, server_used: int | None = None) -> None:
        """Record a request: Binance's figure when the response carried one, else our sum."""
        minute = int(now_s // 60)
        if minute != self.minute:
            self.minute, self.used = minute, 0
        self.used = server_used if server_used is not None else self.used + weight


class SnapshotFetcher:
    """Fetches depth snapshots for one market, one at a time, on its own thread; each result
    goes to `inbox` as a SnapshotRecord(recv_ns, SYMBOL, snapshot, route)."""

    def __init__(self, market: Market, rest_base: str, limit: int, inbox: queue.SimpleQueue,
                 metrics: MdMetrics, backoff_max_s: float = 30.0) -> None:
        self.market = market
        self.limit = snapshot_limit(market, limit)
        self.weight = depth_weight(market, self.limit)
        self.url = rest_base.rstrip("/") + DEPTH_PATH[market]
        self.inbox, self.m = inbox, metrics
        self.gate = WeightGate(WEIGHT_LIMIT[market])
        self.backoff = Backoff(base_s=0.2, cap_s=backoff_max_s)
        self.banned_until = 0.0  # monotonic
        self.pending: deque[tuple[Route, str]] = deque()
        self.cond = threading.Condition()
        self._stop = False
        self.thread = threading.Thread(target=self._run, name=f"md-rest-{market.value}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.cond:
            self._stop = True
            self.cond.notify_all()
        self.thread.join(REST_TIMEOUT_S + 1)

    def request(self, route: Route, name: str) -> None:
        """Queue a snapshot of `name` for `route` (once: a pending request is not repeated)."""
        with self.cond:
            if (route, name) not in self.pending:
                self.pending.append((route, name))
                self.cond.notify()

    def _sleep(self, seconds: float) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self._stop, timeout=max(0.0, seconds))

    def _run(self) -> None:
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self._stop or self.pending)
                if self._stop:
                    return
                route, name = self.pending[0]
            if route.retired:
                self._pop(route, name)
                continue
            wait = max(self.banned_until - time.monotonic(), self.gate.delay(self.weight, time.time()))
            if wait > 0:
                log.info("snapshot delayed", extra={"market": self.market.value, "wait_s": round(wait, 2),
                                                    "reason": "ban" if self.banned_until > time.monotonic()
                                                    else "weight"})
                self._sleep(wait)
                continue
            try:
                snap = self.fetch(name)
            except RateLimited as exc:
                self.banned_until = time.monotonic() + exc.retry_after_s
                self.m.bump(self.m.snapshots, (self.market.value, f"http_{exc.status}"))
                log.warning("snapshot rate limited", extra={"market": self.market.value, "symbol": name,
                                                            "status": exc.status, "retry_after_s": exc.retry_after_s})
                continue
            except TransientError as exc:
                delay = self.backoff.next_delay()
                self.m.bump(self.m.snapshots, (self.market.value, "error"))
                log.warning("snapshot failed", extra={"market": self.market.value, "symbol": name,
                                                      "error": str(exc)[:160], "retry_in_s": round(delay, 2)})
                self._sleep(delay)
                continue
            self.backoff.attempt = 0
            self._pop(route, name)
            self.m.bump(self.m.snapshots, (self.market.value, "ok"))
            self.inbox.put(SnapshotRecord(time.time_ns(), name, snap, route))

    def _pop(self, route: Route, name: str) -> None:
        with self.cond:
            try:
                self.pending.remove((route, name))
            except ValueError:
                pass

    def fetch(self, name: str) -> dict:
        """GET one snapshot and account its weight. Returns the decoded body. Raises RateLimited
        on 429/418 and TransientError on other HTTP errors, network errors and bad bodies."""
        url = f"{self.url}?symbol={name.upper()}&limit={self.limit}"
        headers = None
        try:
            with urllib.request.urlopen(url, timeout=REST_TIMEOUT_S) as resp:
                headers, body = resp.headers, resp.read()
        except urllib.error.HTTPError as exc:
            headers = exc.headers
            if exc.code in (429, 418):
                raise RateLimited(exc.code, _retry_after(exc.headers)) from None
            raise TransientError(f"snapshot {name}: HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise TransientError(f"snapshot {name}: {exc}") from None
        finally:
            self._account(headers)
        try:
            snap = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise TransientError(f"snapshot {name}: body is not JSON") from None
        if type(snap) is not dict or "lastUpdateId" not in snap:
            raise TransientError(f"snapshot {name}: unexpected body {body[:80]!r}")
        return snap

    def _account(self, headers) -> None:
        used = headers.get("X-MBX-USED-WEIGHT-1m") if headers is not None else None
        server_used = int(used) if used is not None and used.strip().isdigit() else None
        self.gate.spent(self.weight, time.time(), server_used)
        self.m.bump(self.m.snapshot_weight, self.market.value, self.weight)
        if server_used is not None:
            self.m.used_weight[self.market.value] = server_used


def _retry_after(headers) -> float:
    raw = headers.get("Retry-After") if headers is not None else None
    try:
        return max(0.0, float(raw))
    except (TypeError, ValueError):
        return DEFAULT_RETRY_AFTER_S


# The inbox's bound, in frames. Conn's reader costs ~12 µs of the one GIL a frame and the loop
# ~19 more, so under a burst the reader runs ahead: unbounded, a 528k-event burst (bench
# md_many) was held in memory, 316 MB RSS. Past INBOX_FRAMES the reader stops reading; so does
# websockets' own thread past its 16 frames (its max_queue), and the kernel's TCP window
# throttles the exchange: the backlog waits on the wire, nothing is dropped. In frames rather
# than bytes: the loop's cost, hence the staleness of the last frame queued, goes by frames
# (2,048 × ~30 µs ≈ 60 ms of work), and qsize() is free where a byte count would cost both
# threads on every frame. Memory: ~1 MB at the capture's mean frame (520 B), ~70 MB at most
# were every frame the largest depth diff seen (35 KB). The reader resumes once the loop has
# taken it down to INBOX_ROOM_FRAMES: one wake-up per ~1,000 frames, and still a deep queue
# for the loop while the reader refills it.
INBOX_FRAMES = 2048
INBOX_ROOM_FRAMES = INBOX_FRAMES // 2
INBOX_WAIT_SLICE_S = 0.1  # a waiting reader looks at its connection's close flag this often


class Inbox(queue.SimpleQueue):
    """The queue from the connection and REST threads to LiveFeed's loop: a SimpleQueue (its C
    put/get/qsize, nothing added to the per-frame cost but a size check) bounded for frames.

    `put` never blocks: connection events and snapshots, a few per connection. A connection's
    reader calls `wait_for_room` before putting a frame once `qsize() >= high`; the loop calls
    `made_room()` after each get while `waiting` is set. `waits` / `waited_s` count the readers'
    waits (written under the inbox's lock; read by the metrics)."""

    def __init__(self, high: int = INBOX_FRAMES, low: int = INBOX_ROOM_FRAMES) -> None:
        super().__init__()
        self.high, self.low = high, low
        self.waiting = False  # a reader waits for room: read by the loop on every get
        self.waits = 0
        self.waited_s = 0.0
        self._cond = threading.Condition(threading.Lock())

    def wait_for_room(self, closing: threading.Event) -> None:
        """Block the calling reader until the loop has taken the inbox down to `low` items, or
        `closing` is set (`wake()` makes that prompt; the waits are bounded besides)."""
        t0 = time.monotonic()
        with self._cond:
            while self.qsize() > self.low and not closing.is_set():
                # set under the lock the loop takes to notify: it cannot notify between this
                # thread's size check and its wait, and miss it
                self.waiting = True
                self._cond.wait(INBOX_WAIT_SLICE_S)
            self.waits += 1
            self.waited_s += time.monotonic() - t0

    def made_room(self) -> None:
        """Wake the waiting readers if the inbox is down to `low`: the loop, after a get."""
        if self.qsize() <= self.low:
            self.wake()

    def wake(self) -> None:
        """Wake the waiting readers to look again (room, or their connection closing)."""
        with self._cond:
            self.waiting = False
            self._cond.notify_all()


class ConnEvent(NamedTuple):
    """A connection opened (`opened`), or closed or failed to open (`why`): posted by Conn to
    the inbox for LiveFeed, never handed to the router."""

    conn: Conn
    opened: bool
    why: str = ""


class Conn:
    """One combined-stream WebSocket, opened and read by its own thread. It posts
    ConnEvent(conn, opened=True), a RawFrame(recv_ns, frame, route) per message, then
    ConnEvent(conn, False, why) (closed, or never opened) to `inbox`. Pings are answered by
    the websockets library's own reader while this thread keeps draining frames. While the
    inbox is full (Inbox) it reads nothing: every frame received is posted, in order."""

    def __init__(self, url: str, route: Route, inbox: Inbox,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.url, self.route, self.inbox, self.clock = url, route, inbox, clock
        self.started = clock()
        self.opened_at: float | None = None
        self.last_rx = self.started
        self.close_reason = ""
        self._closing = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"md-ws-{route.label}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    @property
    def closing(self) -> bool:
        return self._closing.is_set()

    def close(self, reason: str) -> None:
        """Ask the reader to close (it does so on its own thread, within ~0.2 s)."""
        if not self._closing.is_set():
            self.close_reason = reason
            self._closing.set()
            self.inbox.wake()  # the reader may be waiting for room

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)

    def _run(self) -> None:
        from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
        from websockets.sync.client import connect

        try:
            ws = connect(self.url, open_timeout=10, close_timeout=1, max_size=2 ** 22, compression=None)
        except (OSError, InvalidHandshake, InvalidURI, TimeoutError) as exc:
            self.inbox.put(ConnEvent(self, False, f"{type(exc).__name__}: {exc}"[:200]))
            return
        why = "closed"
        with ws:  # closes the connection however the loop ends
            self.opened_at = self.last_rx = self.clock()
            self.inbox.put(ConnEvent(self, True))
            inbox, clock, route, closing = self.inbox, self.clock, self.route, self._closing
            put, qsize, full = inbox.put, inbox.qsize, inbox.high
            try:
                while not closing.is_set():
                    try:
                        frame = ws.recv(timeout=0.2, decode=False)
                    except TimeoutError:
                        continue
                    self.last_rx = clock()
                    rec = RawFrame(time.time_ns(), frame, route)
                    if qsize() >= full:
                        inbox.wait_for_room(closing)
                        self.last_rx = clock()  # the exchange was not silent: we were not reading
                    put(rec)  # closing or not: a frame received is never dropped here
                why = self.close_reason
            except ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd is not None else None
                why = f"closed by server (code {code})" if code is not None else "connection lost"
            except OSError as exc:
                why = f"connection error: {exc}"[:200]
        self.inbox.put(ConnEvent(self, False, why))
