"""Risk's link to the broker: a DEALER with many requests in flight, each answered or timed out once."""
from __future__ import annotations

import itertools
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import zmq

from services.risk.telemetry import LogLimiter
from shared import messages
from shared.bus import NOBLOCK, connect, readable, recv_frames, send_frames
from shared.curve import Curve

log = logging.getLogger("qf.risk")

# A reply bigger than this drops the broker's connection (libzmq reconnects; the requests on it
# time out, fail closed) instead of being read into memory: an honest ack is a few hundred
# bytes a fill, and the broker's ROUTER refuses requests of this size too.
MAX_REPLY = messages.MAX_FRAME * 2

Callback = Callable[[bytes | None], None]  # the broker's reply, or None: no answer (fail closed)


@dataclass(slots=True)
class Pending:
    reqid: bytes
    sent_ns: int  # perf_counter_ns
    deadline_ns: int
    callbacks: list[Callback] = field(default_factory=list)


class BrokerLink:
    """Requests to the broker's ROUTER as `[request id, "", payload]`, so replies (which
    the broker may defer while it simulates the exchange's latency) are matched to
    their request while risk goes on serving everyone else.

    Fail closed like Lazy Pirate: no answer within `timeout_ms` → the callback gets None.
    IMMEDIATE means nothing is queued for a broker that is not connected (the send fails
    at once instead of being delivered after risk has already said BROKER_UNAVAILABLE);
    after a timeout with nothing else in flight the socket is replaced, so no stale
    request can reach a broker that comes back."""

    def __init__(self, endpoint: str, timeout_ms: int, ctx: zmq.Context | None = None,
                 curve: Curve | None = None) -> None:
        self.endpoint = endpoint
        self.curve = curve  # shared/curve.py: risk's key, the one the broker's order port accepts
        self.timeout_ns = timeout_ms * 1_000_000
        self.ctx = ctx or zmq.Context.instance()
        self.pending: OrderedDict[bytes, Pending] = OrderedDict()  # in deadline order: one timeout for all
        self.ids = itertools.count(1)
        self.stats = {"timeouts": 0, "late": 0, "bad_replies": 0, "send_failed": 0}
        self.quiet = LogLimiter(log)
        self.sock = self._open()
        self.on_reopen: Callable[[zmq.Socket, zmq.Socket], None] | None = None

    def _open(self) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_REPLY)
        connect(sock, self.endpoint, self.curve)
        return sock

    def send(self, payload: bytes, callback: Callback) -> bool:
        """Send `payload`; `callback` gets the reply bytes, or None on timeout (or when the
        link closes). Returns False (callback not called, nothing in flight) when the
        broker is not connected or the send queue is full."""
        reqid = next(self.ids).to_bytes(8, "big")
        try:
            send_frames(self.sock, (reqid, b"", payload), NOBLOCK)
        except zmq.Again:
            self.stats["send_failed"] += 1
            return False
        now = time.perf_counter_ns()
        self.pending[reqid] = Pending(reqid, now, now + self.timeout_ns, [callback])
        return True

    def receive(self) -> int:
        """Deliver every waiting reply to its callback; returns how many. A reply to a request
        that already timed out is dropped (its sender was told BROKER_UNAVAILABLE)."""
        n, reads = 0, 0
        while True:
            if reads == 1 and not readable(self.sock):  # the usual one reply: no zmq.Again to pay for
                return n
            reads += 1
            try:
                frames = recv_frames(self.sock, NOBLOCK)
            except zmq.Again:
                return n
            if len(frames) != 3 or frames[1] != b"":
                self.stats["bad_replies"] += 1
                continue
            pending = self.pending.pop(frames[0], None)
            if pending is None:
                self.stats["late"] += 1
                continue
            n += 1
            for callback in pending.callbacks:
                callback(frames[2])

    def expire(self) -> int:
        """Time out requests past their deadline (callbacks get None); returns how many. What
        the broker has already sent is read first: a risk held up (a slow disk, a busy machine)
        must not call an answer that waits in its socket a silence."""
        now = time.perf_counter_ns()
        if self.pending and next(iter(self.pending.values())).deadline_ns <= now and readable(self.sock):
            self.receive()
        expired = []
        while self.pending:
            first = next(iter(self.pending.values()))
            if first.deadline_ns > now:
                break
            expired.append(self.pending.popitem(last=False)[1])
        if expired:
            self.stats["timeouts"] += len(expired)
            self.quiet.log_event(logging.WARNING, "broker_timeout", "broker_timeout",
                                 {"endpoint": self.endpoint, "requests": len(expired)})  # ≤ 10 lines a second
            if not self.pending:
                self._reopen()
            for pending in expired:
                for callback in pending.callbacks:
                    callback(None)
        return len(expired)

    def _reopen(self) -> None:
        old, self.sock = self.sock, self._open()
        if self.on_reopen is not None:
            self.on_reopen(old, self.sock)
        old.close(linger=0)

    def wait_ms(self, default_ms: int) -> int:
        """How long the owner may sleep before the next deadline (at most `default_ms`)."""
        if not self.pending:
            return default_ms
        first = next(iter(self.pending.values()))
        left = (first.deadline_ns - time.perf_counter_ns()) // 1_000_000 + 1
        return max(0, min(default_ms, left))

    def close(self) -> None:
        """Close the socket; requests still in flight are answered None (fail closed)."""
        pending, self.pending = list(self.pending.values()), OrderedDict()
        self.sock.close(linger=0)
        for p in pending:
            for callback in p.callbacks:
                callback(None)
