"""Market-data sources: live Binance (WebSocket + REST snapshots) and capture replay.

Both yield the same records the capture format stores, so the service treats
them alike: `("ws", recv_ns, {"stream": …, "data": …})` or
`("snapshot", recv_ns, SYMBOL, {"lastUpdateId": …, "bids": …, "asks": …})`.
"""
from __future__ import annotations

import json
import logging
import random
import time
import urllib.error
import urllib.request
from typing import Callable, Iterator

import orjson

from services.marketdata.capture import CaptureError, iter_capture
from shared.errors import TransientError

log = logging.getLogger("qf.marketdata.feed")


def streams_for(symbols: tuple[str, ...]) -> list[str]:
    """Combined-stream names per symbol: diff depth at 100 ms and aggregate trades."""
    out = []
    for s in symbols:
        low = s.lower()
        out += [f"{low}@depth@100ms", f"{low}@aggTrade"]
    return out


class Backoff:
    """Exponential backoff with full jitter, reset after a healthy period."""

    def __init__(self, base_s: float = 0.5, cap_s: float = 30.0, healthy_s: float = 60.0,
                 rng: random.Random | None = None) -> None:
        self.base, self.cap, self.healthy = base_s, cap_s, healthy_s
        self.attempt = 0
        self.rng = rng or random.Random()

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.base * (2 ** self.attempt))
        self.attempt += 1
        return self.rng.uniform(0, ceiling)

    def connected_for(self, seconds: float) -> None:
        if seconds >= self.healthy:
            self.attempt = 0


class ReplayFeed:
    """Replays a capture file; `speed` 1 = recorded pace, 0 = as fast as possible.

    Records are stamped with the local time at which they are handed out, as
    if they had just arrived."""

    def __init__(self, path: str, speed: float, loop: bool = False,
                 should_stop: Callable[[], bool] = lambda: False) -> None:
        self.path, self.speed, self.loop, self.should_stop = path, speed, loop, should_stop

    def records(self) -> Iterator[tuple]:
        while True:
            first_t = None
            start = time.monotonic()
            for rec in iter_capture(self.path):
                if self.should_stop():
                    return
                t = rec.get("t")
                if self.speed > 0 and type(t) is int:
                    first_t = t if first_t is None else first_t
                    wait = (t - first_t) / 1e9 / self.speed - (time.monotonic() - start)
                    while wait > 0 and not self.should_stop():  # pacing, in short steps to stay stoppable
                        time.sleep(min(wait, 0.1))
                        wait = (t - first_t) / 1e9 / self.speed - (time.monotonic() - start)
                kind = rec.get("k")
                if kind == "ws":
                    yield ("ws", time.time_ns(), rec.get("m"))
                elif kind == "snapshot":
                    yield ("snapshot", time.time_ns(), str(rec.get("s", "")).upper(), rec.get("m"))
                else:
                    raise CaptureError(f"{self.path}: unknown record kind {kind!r}")
            if not self.loop:
                return
            # the capture starts over: its update ids go back, so books must resync
            yield ("disconnected", time.time_ns(), "replay restarted")


class LiveFeed:
    """Binance combined streams over one WebSocket, snapshots over REST.

    Never substitutes other data: when Binance cannot be reached it says so
    and retries with backoff until stopped."""

    def __init__(self, ws_base: str, rest_base: str, symbols: tuple[str, ...], snapshot_limit: int,
                 watchdog_s: float, backoff: Backoff, should_stop: Callable[[], bool]) -> None:
        self.url = f"{ws_base}/stream?streams=" + "/".join(streams_for(symbols))
        self.rest_base = rest_base
        self.snapshot_limit = snapshot_limit
        self.watchdog_s = watchdog_s
        self.backoff = backoff
        self.should_stop = should_stop
        self.reconnects = 0
        self.pending_snapshots: list[str] = []

    def request_snapshot(self, symbol: str) -> None:
        if symbol not in self.pending_snapshots:
            self.pending_snapshots.append(symbol)

    def fetch_snapshot(self, symbol: str) -> dict:
        """GET /api/v3/depth. Raises TransientError on network errors, 429/418 (after
        honouring nothing here: the caller backs off) and bad bodies."""
        url = f"{self.rest_base}/api/v3/depth?symbol={symbol.upper()}&limit={self.snapshot_limit}"
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                body = resp.read()
        except urllib.error.HTTPError as exc:
            retry = exc.headers.get("Retry-After") if exc.headers else None
            raise TransientError(f"snapshot {symbol}: HTTP {exc.code}" + (f", Retry-After {retry}s" if retry else "")) from None
        except (urllib.error.URLError, OSError) as exc:
            raise TransientError(f"snapshot {symbol}: {exc}") from None
        try:
            snap = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise TransientError(f"snapshot {symbol}: body is not JSON") from None
        if not isinstance(snap, dict) or "lastUpdateId" not in snap:
            raise TransientError(f"snapshot {symbol}: unexpected body {body[:80]!r}")
        return snap

    def records(self) -> Iterator[tuple]:
        from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
        from websockets.sync.client import connect

        while not self.should_stop():
            try:
                ws = connect(self.url, open_timeout=10, close_timeout=2, max_size=2 ** 22)
            except (OSError, InvalidHandshake, InvalidURI, TimeoutError) as exc:
                delay = self.backoff.next_delay()
                log.warning("binance unreachable", extra={"url": self.url, "error": str(exc)[:120],
                                                          "retry_in_s": round(delay, 2)})
                yield ("disconnected", time.time_ns(), str(exc)[:200])
                yield from self._sleep(delay)
                continue
            connected_at = time.monotonic()
            log.info("binance connected", extra={"url": self.url})
            try:
                with ws:
                    last_msg = time.monotonic()
                    while not self.should_stop():
                        while self.pending_snapshots:
                            symbol = self.pending_snapshots[0]
                            try:
                                snap = self.fetch_snapshot(symbol)
                            except TransientError as exc:
                                delay = self.backoff.next_delay()
                                log.warning("snapshot failed", extra={"error": str(exc), "retry_in_s": round(delay, 2)})
                                yield from self._sleep(delay)
                                break
                            self.pending_snapshots.pop(0)
                            yield ("snapshot", time.time_ns(), symbol.upper(), snap)
                        try:
                            raw = ws.recv(timeout=0.1)
                        except TimeoutError:
                            if time.monotonic() - last_msg > self.watchdog_s:
                                log.warning("binance silent, reconnecting", extra={"silent_s": self.watchdog_s})
                                break
                            yield ("idle", time.time_ns())
                            continue
                        last_msg = time.monotonic()
                        yield ("raw", time.time_ns(), raw)
            except ConnectionClosed as exc:
                log.warning("binance connection closed", extra={"code": getattr(exc.rcvd, "code", None)})
            except OSError as exc:
                log.warning("binance connection error", extra={"error": str(exc)[:120]})
            self.backoff.connected_for(time.monotonic() - connected_at)
            if self.should_stop():
                return
            self.reconnects += 1
            yield ("disconnected", time.time_ns(), "connection lost")
            yield from self._sleep(self.backoff.next_delay())

    def _sleep(self, seconds: float) -> Iterator[tuple]:
        """Wait without going silent: yields `("idle", ns)` so the service keeps beating."""
        deadline = time.monotonic() + seconds
        while not self.should_stop() and time.monotonic() < deadline:
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
            yield ("idle", time.time_ns())


def parse_raw(raw: str | bytes) -> dict:
    """A combined-stream frame → `{"stream", "data"}`; raises ValueError if it is not one."""
    try:
        msg = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"malformed JSON: {exc}") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("stream"), str) or not isinstance(msg.get("data"), dict):
        raise ValueError(f"not a combined-stream message: {json.dumps(msg)[:80] if not isinstance(msg, bytes) else ''}")
    return msg
