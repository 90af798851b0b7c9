"""A fake Binance on 127.0.0.1: real WebSocket + REST servers playing a real capture, faults on request."""
# It speaks Binance's protocol as documented: /stream?streams=a/b with {"stream", "data"}
# frames, ping frames the client must answer (websockets' keepalive: no pong, connection
# closed), a serverShutdown event, connections cut at a maximum age (Binance: 24 h),
# /api/v3/depth (spot) or /fapi/v1/depth (USD-M) with X-MBX-USED-WEIGHT-1m, and 429/418
# with Retry-After. All connections see one timeline, as on the exchange.
from __future__ import annotations

import json
import queue
import socket
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import orjson
from websockets.exceptions import ConnectionClosed
from websockets.sync.server import serve

from services.marketdata.binance import depth_weight
from services.marketdata.sync import Market
from tests.fakes.exchange import Msg, timeline

_CLOSE = object()


class Binary(bytes):
    """A frame to send as a binary WebSocket message (anything else goes out as text)."""


def inflate_digit(x: int, pos: int = 2) -> int:
    """`x` with its digit at `pos` (from the left) raised to 9 (or carried if it is one): the
    corrupted digit of issue #11, e.g. 50093696318 -> 50993696318."""
    s = str(x)
    d = int(s[pos])
    return x + (9 - d if d < 9 else 1) * 10 ** (len(s) - 1 - pos)


class _Client:
    def __init__(self, ws, streams: list[str]) -> None:
        self.ws, self.streams, self.opened = ws, set(streams), time.monotonic()
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        self.depth_stream = {s.split("@")[0]: s for s in streams if s.split("@")[1:2] == ["depth"]}
        self.sent = 0
        self.muted: set[str] = set()  # symbols (lower case) whose depth this connection no longer gets


class FakeBinance:
    """Serve `captures` ({SYMBOL: capture path}) as market `market` ("spot" or "usdm") at
    `speed` × the recorded pace. Use as a context manager; `ws_url`/`rest_url` are the bases."""

    def __init__(self, captures: dict[str, str], market: str = "spot", speed: float = 20.0,
                 ping_interval: float | None = None, ping_timeout: float | None = None,
                 max_conn_age_s: float | None = None) -> None:
        self.market = Market(market)
        self.usdm = self.market is Market.USDM
        self.books, self.msgs = timeline(captures, self.usdm)
        self.speed, self.max_conn_age_s = speed, max_conn_age_s
        self.ping_interval, self.ping_timeout = ping_interval, ping_timeout
        self.lock = threading.Lock()
        self.history: dict[str, dict[int, tuple]] = {s: {} for s in self.books}  # u -> true top 10
        self.emitted: dict[str, list[tuple[int, float]]] = {s: [] for s in self.books}  # depth (u, monotonic t) sent
        self.clients: list[_Client] = []
        self.connections = 0
        self.opened: list[float] = []  # monotonic time each connection opened
        self.paths: list[str] = []
        # faults
        self.drop: dict[str, int] = dict.fromkeys(self.books, 0)
        self.dropped: list[int] = []
        self._corrupt: dict[str, list] = {s: [] for s in self.books}  # [fields, mutate, left, every, skip]
        # (symbol, true u, monotonic t, event as sent, wall ns) of each corrupted event sent
        self.corrupted: list[tuple[str, int, float, dict, int]] = []
        self.last_sent: dict[tuple[str, str], bytes] = {}  # (SYMBOL, kind) -> the last frame queued to clients
        self._garble: dict[str, list] = {s: [] for s in self.books}  # frame -> frame, for the next depth events
        self.garbled: list[tuple[str, int, float]] = []  # (symbol, true u, monotonic t) of each garbled one
        self.silent = False
        self.snapshot_delay_s = 0.0
        self.snapshot_events_behind = 0  # with a delay: also hold it until this many newer events went out
        self.rest_errors: deque[tuple[int, float | None]] = deque()
        self._stale: list = [None, 0]  # [saved snapshots by symbol, uses left]
        self.requests: list[dict] = []  # every REST request: t (monotonic), symbol, status, lastUpdateId
        self._weight = [0, 0]  # [minute, used]
        self._stop = threading.Event()
        self.finished = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> "FakeBinance":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self._ws = serve(self._handler, "127.0.0.1", 0, ping_interval=self.ping_interval,
                         ping_timeout=self.ping_timeout, compression=None, close_timeout=1)
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), _RestHandler)
        self._http.daemon_threads = True
        self._http.fake = self
        self.ws_url = f"ws://127.0.0.1:{self._ws.socket.getsockname()[1]}"
        self.rest_url = f"http://127.0.0.1:{self._http.server_address[1]}"
        for target in (self._ws.serve_forever, self._http.serve_forever, self._engine):
            t = threading.Thread(target=target, daemon=True, name=f"fake-binance-{target.__name__}")
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        for c in list(self.clients):
            c.q.put(_CLOSE)
        self._ws.shutdown()
        self._http.shutdown()
        self._http.server_close()
        for t in self._threads:
            t.join(5)

    # -- the market --------------------------------------------------------------------

    def _engine(self) -> None:
        start = time.monotonic()
        for msg in self.msgs:
            delay = start + msg.t_ns / 1e9 / self.speed - time.monotonic()
            if delay > 0 and self._stop.wait(delay):
                return
            self._emit(msg)
        self.finished.set()

    def _emit(self, msg: Msg) -> None:
        sym, low, data = msg.symbol, msg.symbol.lower(), dict(msg.data)
        now_ms = time.time_ns() // 1_000_000
        garble = None
        with self.lock:
            if msg.kind == "depth":
                book = self.books[sym]
                book.apply(data)
                self.history[sym][data["u"]] = book.top()
                if self.drop[sym]:
                    self.drop[sym] -= 1
                    self.dropped.append(data["u"])
                    return
                self.emitted[sym].append((data["u"], time.monotonic()))
                self._corrupt_next(sym, data)
                if self._garble[sym]:
                    garble = self._garble[sym].pop(0)
                    self.garbled.append((sym, data["u"], time.monotonic()))
            clients = [] if self.silent else list(self.clients)
        data["E"] = now_ms
        if "T" in data:
            data["T"] = now_ms
        frames: dict[str, bytes] = {}
        clean = None
        for c in clients:
            if msg.kind == "depth":
                stream = c.depth_stream.get(low) if low not in c.muted else None
            elif msg.kind == "trade":
                stream = f"{low}@aggTrade" if f"{low}@aggTrade" in c.streams else \
                    f"{low}@trade" if f"{low}@trade" in c.streams else None
            else:
                stream = f"{low}@{msg.kind}" if f"{low}@{msg.kind}" in c.streams else None
            if stream is None:
                continue
            frame = frames.get(stream)
            if frame is None:
                payload = _agg_trade(data) if stream.endswith("@aggTrade") else data
                frame = clean = orjson.dumps({"stream": stream, "data": payload})
                frame = frames[stream] = garble(frame) if garble is not None else frame
            c.q.put(frame)
        if clean is not None:  # queued to every client: a copy injected from now on comes after it
            self.last_sent[(sym, msg.kind)] = clean

    def _corrupt_next(self, sym: str, data: dict) -> None:
        """Corrupt `data` (a copy, about to be sent) if a corruption of `sym` is pending. Lock held."""
        pending = self._corrupt[sym]
        if not pending:
            return
        job = pending[0]
        fields, mutate, left, every, skip = job
        if skip:
            job[4] -= 1
            return
        true_u = data["u"]
        for f in fields:
            if f in data:
                data[f] = mutate(data[f])
        self.corrupted.append((sym, true_u, time.monotonic(), dict(data), time.time_ns()))
        job[2], job[4] = left - 1, every - 1
        if job[2] <= 0:
            pending.pop(0)

    def true_top(self, symbol: str, update_id: int) -> tuple | None:
        """The exchange's top-10 levels (floats, best first) right after event `update_id`."""
        with self.lock:
            return self.history[symbol.upper()].get(update_id)

    def last_update_id(self, symbol: str) -> int:
        with self.lock:
            return self.books[symbol.upper()].u

    # -- the WebSocket side --------------------------------------------------------------

    def _handler(self, ws) -> None:
        path = ws.request.path
        self.paths.append(path)
        if not path.startswith("/stream?streams="):
            ws.close(1008, "only combined streams here")
            return
        client = _Client(ws, path.split("=", 1)[1].split("/"))
        with self.lock:
            self.clients.append(client)
            self.connections += 1
            self.opened.append(client.opened)
        try:
            while not self._stop.is_set():
                try:
                    frame = client.q.get(timeout=0.05)
                except queue.Empty:
                    if self.max_conn_age_s and time.monotonic() - client.opened > self.max_conn_age_s:
                        ws.close(1001, "connection too old")  # Binance's 24 h cut
                        return
                    continue
                if frame is _CLOSE:
                    ws.close(1001, "server shutdown")
                    return
                ws.send(bytes(frame) if type(frame) is Binary else frame if isinstance(frame, str)
                        else frame.decode())
                client.sent += 1
        except (ConnectionClosed, OSError):
            pass
        finally:
            with self.lock:
                self.clients.remove(client)

    def open_clients(self) -> int:
        with self.lock:
            return len(self.clients)

    # -- faults ------------------------------------------------------------------------

    def drop_depth(self, symbol: str, n: int = 1) -> None:
        """Do not send the next n depth events of `symbol` (the book still moves)."""
        with self.lock:
            self.drop[symbol.upper()] += n

    def inject(self, frame: str | bytes) -> None:
        """Send `frame` as is to every connected client, in order with the stream (a `Binary`
        goes out as a binary message, anything else as text)."""
        for c in list(self.clients):
            c.q.put(frame)

    def corrupt_depth(self, symbol: str, fields: tuple[str, ...] = ("u",), n: int = 1, every: int = 1,
                      mutate=inflate_digit) -> None:
        """Send `n` of the next depth events of `symbol` (one in `every`) with `fields` (of U, u,
        pu) changed by `mutate`, as a corrupted digit on the way would: the exchange's own book
        moves with the true event. Each is noted in `corrupted`."""
        with self.lock:
            self._corrupt[symbol.upper()].append([tuple(fields), mutate, n, max(1, every), 0])

    def garble_depth(self, symbol: str, garble) -> None:
        """Send the next depth event of `symbol` as `garble(frame bytes)` (str, bytes or Binary)
        instead: a frame damaged on the way. The exchange's own book moves with the true event."""
        with self.lock:
            self._garble[symbol.upper()].append(garble)

    def corrupting(self, symbol: str) -> bool:
        """True while corruptions (or garblings) of `symbol` asked for are still to be sent."""
        with self.lock:
            return bool(self._corrupt[symbol.upper()] or self._garble[symbol.upper()])

    def mute_depth(self, symbol: str) -> None:
        """The connections open now stop getting `symbol`'s depth events (its trades go on);
        connections opened later get everything."""
        with self.lock:
            for c in self.clients:
                c.muted.add(symbol.lower())

    def serve_fresh_snapshots(self) -> None:
        """End serve_stale_snapshots(): the next snapshot is the book as it is then."""
        with self.lock:
            self._stale[1] = 0

    def weight_between(self, t0: float, t1: float) -> tuple[int, int]:
        """(requests, request weight) of the REST requests made between monotonic t0 and t1."""
        with self.lock:
            got = [r for r in self.requests if t0 <= r["t"] < t1]
        return len(got), sum(r["weight"] for r in got)

    def cut(self) -> None:
        """Cut every connection mid-stream: the TCP connection dies without a close frame."""
        for c in list(self.clients):
            try:
                c.ws.socket.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def announce_shutdown(self, grace_s: float) -> None:
        """Send `serverShutdown` to the connected clients and close them after grace_s."""
        clients = list(self.clients)
        event = json.dumps({"e": "serverShutdown", "E": time.time_ns() // 1_000_000})
        for c in clients:
            c.q.put(event)
        timer = threading.Timer(grace_s, lambda: [c.q.put(_CLOSE) for c in clients])
        timer.daemon = True
        timer.start()

    def ping_clients(self) -> list[threading.Event]:
        """Send a ping to every client; each Event is set when its pong arrives."""
        return [c.ws.ping(b"binance") for c in list(self.clients)]

    def serve_stale_snapshots(self, n: int = 1) -> int:
        """Answer the next n snapshot requests with the books as they are now; return their id."""
        with self.lock:
            self._stale = [{s: b.snapshot(5000) for s, b in self.books.items()}, n]
            return next(iter(self._stale[0].values()))["lastUpdateId"]

    def rest_error(self, status: int, retry_after: float | None = None) -> None:
        """Answer the next snapshot request with `status` (429/418/5xx) and Retry-After."""
        self.rest_errors.append((status, retry_after))

    # -- the REST side -----------------------------------------------------------------

    def snapshot_response(self, path: str, query: dict) -> tuple[int, dict, dict]:
        """(status, headers, body) for one REST request; called by the HTTP handler."""
        expected = "/fapi/v1/depth" if self.usdm else "/api/v3/depth"
        symbol = query.get("symbol", [""])[0].upper()
        limit = int(query.get("limit", ["100" if not self.usdm else "500"])[0])
        with self.lock:
            minute = int(time.time() // 60)
            if self._weight[0] != minute:
                self._weight = [minute, 0]
            self._weight[1] += depth_weight(self.market, limit)
            headers = {"X-MBX-USED-WEIGHT-1m": str(self._weight[1])}
            entry = {"t": time.monotonic(), "symbol": symbol, "status": 200, "lastUpdateId": None,
                     "weight": depth_weight(self.market, limit)}
            self.requests.append(entry)
            if path != expected:
                entry["status"] = 404
                return 404, headers, {"code": -1, "msg": f"no such endpoint {path}"}
            if self.rest_errors:
                status, retry_after = self.rest_errors.popleft()
                entry["status"] = status
                if retry_after is not None:
                    headers["Retry-After"] = f"{retry_after:g}"
                return status, headers, {"code": -1003, "msg": "Too many requests; IP banned" if status == 418
                                         else "Too many requests"}
            if symbol not in self.books:
                entry["status"] = 400
                return 400, headers, {"code": -1121, "msg": "Invalid symbol."}
            if self._stale[1] > 0:
                self._stale[1] -= 1
                full = self._stale[0][symbol]
                snap = {**full, "bids": full["bids"][:limit], "asks": full["asks"][:limit]}
            else:
                snap = self.books[symbol].snapshot(limit)
            entry["lastUpdateId"] = snap["lastUpdateId"]
        if self.usdm:
            now_ms = time.time_ns() // 1_000_000
            snap = {"lastUpdateId": snap["lastUpdateId"], "E": now_ms, "T": now_ms,
                    "bids": snap["bids"], "asks": snap["asks"]}
        if self.snapshot_delay_s:
            self._stop.wait(self.snapshot_delay_s)  # taken now, delivered late: events pile up meanwhile
            # ...and at least `snapshot_events_behind` of them, however slow a loaded machine emits (bounded)
            deadline = time.monotonic() + 10
            while self.snapshot_events_behind and time.monotonic() < deadline and not self._stop.is_set():
                with self.lock:
                    behind = sum(1 for u, _ in self.emitted[symbol] if u > snap["lastUpdateId"])
                if behind >= self.snapshot_events_behind:
                    break
                self._stop.wait(0.01)
        return 200, headers, snap


def _agg_trade(trade: dict) -> dict:
    """An aggTrade event for one trade (the captures hold raw trades)."""
    return {"e": "aggTrade", "E": trade["E"], "s": trade["s"], "a": trade["t"], "p": trade["p"],
            "q": trade["q"], "f": trade["t"], "l": trade["t"], "T": trade.get("T", trade["E"]), "m": trade["m"]}


class _RestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        url = urlsplit(self.path)
        status, headers, body = self.server.fake.snapshot_response(url.path, parse_qs(url.query))
        data = orjson.dumps(body)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args) -> None:  # noqa: A002 - http.server's signature
        pass
