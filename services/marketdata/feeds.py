"""Replay of capture files as if live, reconnect backoff, and frame decoding helpers."""
# Feeds yield the records of records.py for BookRouter.dispatch; ReplayFeed yields WsMessage,
# SnapshotRecord, RouteOpened and Disconnected. The live feed is in live.py.
from __future__ import annotations

import heapq
import logging
import random
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import orjson

from services.marketdata.capture import CaptureError, iter_capture, iter_capture_lines
from services.marketdata.records import Disconnected, Record, RouteOpened, SnapshotRecord, WsMessage
from services.marketdata.symbols import Route
from services.marketdata.sync import Market

log = logging.getLogger("qf.marketdata.feed")

_DETECT_RECORDS = 20_000  # records read to tell a spot capture from a USD-M one
BACKWARDS_LOGGED = 3  # steps back in receive time logged per capture (all are counted)
# Builds a record from (recv_ns, *fields) as its NamedTuple constructor does, minus a Python
# call with unpacked arguments (~600 ns against ~250 ns a record).
_new_record = tuple.__new__


class Backoff:
    """Exponential backoff with full jitter: attempt n waits uniform(0, min(cap, base·2ⁿ)),
    reset once a connection has stayed up for `healthy_s`."""

    def __init__(self, base_s: float = 0.5, cap_s: float = 30.0, healthy_s: float = 60.0,
                 rng: random.Random | None = None) -> None:
        self.base, self.cap, self.healthy = base_s, cap_s, healthy_s
        self.attempt = 0
        self.rng = rng or random.Random()

    def next_delay(self) -> float:
        """Seconds to wait before the next attempt (never more than the cap)."""
        ceiling = min(self.cap, self.base * (2 ** min(self.attempt, 62)))
        self.attempt += 1
        return self.rng.uniform(0, ceiling)

    def connected_for(self, seconds: float) -> None:
        """Report how long the last connection lasted; a healthy one resets the backoff."""
        if seconds >= self.healthy:
            self.attempt = 0


def decode_frame(raw: str | bytes) -> object:
    """Parse one WebSocket frame's JSON. Raises ValueError("malformed JSON: …")."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"malformed JSON: {exc}") from None


def parse_raw(raw: str | bytes) -> dict:
    """A combined-stream frame → `{"stream", "data"}`; raises ValueError if it is not one."""
    msg = decode_frame(raw)
    if type(msg) is not dict or type(msg.get("stream")) is not str or type(msg.get("data")) is not dict:
        raise ValueError(f"not a combined-stream message: {str(msg)[:80]}")
    return msg


def is_server_shutdown(msg: object) -> bool:
    """True for Binance's `serverShutdown` event, bare or wrapped (`data` or `event`)."""
    if type(msg) is not dict:
        return False
    for m in (msg, msg.get("data"), msg.get("event")):
        if type(m) is dict and m.get("e") == "serverShutdown":
            return True
    return False


@dataclass(frozen=True, slots=True)
class CaptureSpec:
    """One replayed capture: its files, played one after another, and its market
    (None: read from the records' "x" key, else detected from the depth events)."""

    paths: tuple[str, ...]
    market: Market | None = None


def parse_replay(spec: str) -> list[CaptureSpec]:
    """`a.gz,usdm:b1.gz+b2.gz` (QF_FEED after `replay:`) → one CaptureSpec per `,` item.

    Raises ValueError on an empty item."""
    out = []
    for item in spec.split(","):
        market = None
        head, sep, rest = item.partition(":")
        if sep and head in ("spot", "usdm"):
            market, item = Market(head), rest
        paths = tuple(p for p in item.split("+") if p)
        if not paths:
            raise ValueError(f"empty capture in {spec!r}")
        out.append(CaptureSpec(paths, market))
    return out


def detect_market(path: str) -> Market:
    """USD-M if the first untagged depth event of the capture carries `pu`, else spot."""
    try:
        for i, rec in enumerate(iter_capture(path)):
            m = rec.get("m")
            if rec.get("k") == "ws" and "x" not in rec and type(m) is dict and type(m.get("data")) is dict:
                if m["data"].get("e") == "depthUpdate":
                    return Market.USDM if "pu" in m["data"] else Market.SPOT
            if i >= _DETECT_RECORDS:
                break
    except (CaptureError, OSError):
        pass  # the replay itself reports the error
    return Market.SPOT


class _Capture:
    """One capture being replayed: yields (relative ns, recorded ns, record type, its fields after
    recv_ns, file, line), looping if asked. Relative ns count from the capture's first record;
    recorded ns are the records' own "t" (the passes of a loop shifted to follow one another), and
    a record without an integer "t" takes the time of the one before it.

    A receive time below the one before it (the capture's records are written in the order they
    were received: a step back is damage, or a clock stepped back) is counted (`backwards`), the
    first one kept (`first_backwards`, "FILE:LINE: …") and the first few logged; the record is
    replayed as recorded."""

    def __init__(self, spec: CaptureSpec, keys: tuple[str, ...], index: int, loop: bool) -> None:
        self.spec, self.keys, self.index, self.loop = spec, keys, index, loop
        self.default = spec.market or detect_market(spec.paths[0])
        self.routes: dict[Market, Route] = {}
        self.failed = False
        self.error = ""  # why it failed: the CaptureError / OSError, naming the file
        self.backwards = 0  # records whose "t" is below the one before them
        self.first_backwards = ""  # "FILE:LINE: …" of the first

    def _route(self, market: Market) -> tuple[Route, bool]:
        route = self.routes.get(market)
        if route is None:
            route = self.routes[market] = Route(market, self.keys, gen=self.index,
                                                label=f"replay#{self.index}:{market.value}")
            return route, True
        return route, False

    def play(self) -> Iterator[tuple[int, int, type, tuple]]:
        offset, last, origin = 0, 0, None  # origin: the first "t" of the first pass
        while True:
            first = prev = None
            try:
                for path in self.spec.paths:
                    for line, rec in iter_capture_lines(path):
                        t = rec["t"]
                        if type(t) is int:
                            if first is None:
                                first = t
                                origin = t if origin is None else origin
                            elif t < prev:
                                self._backwards(path, line, prev - t)
                            prev = t
                            last = offset + t - first
                        at = last if origin is None else origin + last
                        kind = rec["k"]
                        x = rec.get("x")
                        market = self.default if x is None else Market.USDM if x == "usdm" else Market.SPOT
                        route, new = self._route(market)
                        if new:
                            yield last, at, RouteOpened, (route,), path, line
                        if kind == "ws":
                            yield last, at, WsMessage, (rec["m"], route), path, line
                        elif kind == "snapshot":
                            yield last, at, SnapshotRecord, (str(rec.get("s", "")).upper(), rec["m"], route), \
                                path, line
            except (CaptureError, OSError) as exc:
                # A damaged file (e.g. a recorder killed mid-write) ends this capture, not the service.
                log.error("capture unreadable, its replay ends here", extra={"error": str(exc)[:300]})
                self.failed, self.error = True, str(exc)
                return
            if not self.loop or first is None:
                return
            offset = last + 1_000_000
            for route in self.routes.values():
                # the capture starts over: its update ids go back, so its books must resync
                yield offset, origin + offset, Disconnected, ("replay restarted", route), "", 0

    def _backwards(self, path: str, line: int, by_ns: int) -> None:
        self.backwards += 1
        text = f"{path}:{line}: receive time \"t\" {by_ns / 1e6:,.3f} ms before the previous record's"
        if self.backwards == 1:
            self.first_backwards = text
        if self.backwards <= BACKWARDS_LOGGED:
            log.warning("capture receive time goes backwards", extra={
                "at": f"{path}:{line}", "by_ms": round(by_ns / 1e6, 3), "count": self.backwards,
                **({"more": "further ones are counted, not logged"} if self.backwards == BACKWARDS_LOGGED else {})})


STAMPS = ("wall", "recorded")


class ReplayFeed:
    """Replays captures as if live: `speed` 1 = recorded pace, 0 = as fast as possible.

    `stamp` says what each record's recv_ns is and how captures are merged:

    - "wall" (the default, the service's replay): several captures play side by side, each
      from its own first record (so a spot and a USD-M capture of different days run
      together), merged by time relative to it; records are stamped with the local time at
      which they are handed out, as if they had just arrived.
    - "recorded" (a backtest, a lock-step replay): records are stamped with the time the
      capture recorded ("t", ns since the epoch; a loop's later passes shifted to follow the
      first) and captures are merged by that time, so the same captures give the same records
      every time. At speed > 0, captures of different days wait out the time between them.

    Each capture's records arrive on its own routes. Raises ValueError for another stamp."""

    def __init__(self, spec: str | list[CaptureSpec], keys: tuple[str, ...], speed: float, loop: bool = False,
                 should_stop: Callable[[], bool] = lambda: False, stamp: str = "wall") -> None:
        if stamp not in STAMPS:
            raise ValueError(f"stamp must be one of {STAMPS}, got {stamp!r}")
        self.specs = parse_replay(spec) if isinstance(spec, str) else list(spec)
        self.keys, self.speed, self.loop, self.should_stop = tuple(keys), speed, loop, should_stop
        self.recorded = stamp == "recorded"
        self.captures: list[_Capture] = []
        self.path, self.line = "", 0  # where the record last handed out was read

    def where(self) -> str:
        """"FILE:LINE" of the record last handed out ("" before the first): what a reader of
        the records names when one of them is bad."""
        return f"{self.path}:{self.line}" if self.path else ""

    @property
    def backwards(self) -> int:
        """Records whose receive time is below the one before them, over every capture."""
        return sum(c.backwards for c in self.captures)

    @property
    def first_backwards(self) -> str:
        """"FILE:LINE: …" of the first step back in receive time ("" when none)."""
        return next((c.first_backwards for c in self.captures if c.backwards), "")

    def request_snapshot(self, route: Route, name: str) -> None:
        """Captures carry their snapshots: nothing to fetch."""

    def switched(self, route: Route) -> None:
        """Replay never opens a replacement connection."""

    def server_shutdown(self, route: Route) -> None:
        """A recorded serverShutdown has no connection to replace."""

    def reconnect(self, market: Market, why: str) -> None:
        """A capture has no connection to replace."""

    def close(self) -> None:
        """Nothing to release: files are closed as each capture ends."""

    def records(self) -> Iterator[Record]:
        """Every record of the captures, in order (see the class): WsMessage, SnapshotRecord,
        RouteOpened (a capture's market seen first) and Disconnected (a loop starting over)."""
        self.captures = [_Capture(s, self.keys, i, self.loop) for i, s in enumerate(self.specs)]
        plays = [c.play() for c in self.captures]
        stop, recorded = self.should_stop, self.recorded
        if len(plays) == 1 and self.speed <= 0:  # one capture as fast as possible: nothing to merge or pace
            for _, t, cls, fields, path, line in plays[0]:
                if stop():
                    return
                if line:
                    self.path, self.line = path, line
                yield _new_record(cls, (t if recorded else time.time_ns(), *fields))
            return
        by = 1 if self.recorded else 0  # merge (and pace) by recorded or by relative time
        heap: list[tuple[int, int, tuple]] = []
        for i, play in enumerate(plays):
            nxt = next(play, None)
            if nxt is not None:
                heap.append((nxt[by], i, nxt))
        heapq.heapify(heap)
        start, speed = time.monotonic(), self.speed
        t0 = heap[0][0] if heap else 0
        while heap:
            at, i, (_, t, cls, fields, path, line) = heap[0]
            if stop():
                return
            if speed > 0:
                wait = (at - t0) / 1e9 / speed - (time.monotonic() - start)
                while wait > 0 and not stop():  # pacing, in short steps to stay stoppable
                    time.sleep(min(wait, 0.05))
                    wait = (at - t0) / 1e9 / speed - (time.monotonic() - start)
            if line:
                self.path, self.line = path, line
            yield _new_record(cls, (t if recorded else time.time_ns(), *fields))
            nxt = next(plays[i], None)
            if nxt is None:
                heapq.heappop(heap)
            else:
                heapq.heapreplace(heap, (nxt[by], i, nxt))
