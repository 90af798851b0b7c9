"""A burst larger than the kernel's buffers: LiveFeed's inbox stays bounded, the exchange waits on TCP, no frame lost."""
# The real LiveFeed and Conn (websockets' sync client on its own thread) against a plain socket
# server in this process that writes a whole stream of pre-framed real depth frames at once
# (bench/uvloop.py's framing): the test holds the loop back by not pulling records.
from __future__ import annotations

import socket
import threading
import time

from bench.uvloop import _handshake, load, ws_frame
from services.marketdata.binance import INBOX_FRAMES, ConnEvent
from services.marketdata.live import LiveFeed
from services.marketdata.metrics import MdCollector, MdMetrics
from services.marketdata.records import RawFrame
from shared import config as qfconfig
from tests.conftest import wait_for

KEY = "BTCUSDT"
FALLBACK_BUFFERS = 36 << 20  # tcp_rmem's and tcp_wmem's usual maxima, where /proc does not say


def kernel_buffers() -> int:
    """The most a loopback connection's two socket buffers can hold (autotuning's maxima)."""
    try:
        return sum(int(open(f"/proc/sys/net/ipv4/tcp_{k}mem").read().split()[2]) for k in ("r", "w"))
    except (OSError, ValueError, IndexError):
        return FALLBACK_BUFFERS


def burst_frames() -> list[bytes]:
    """The capture's depth frames, repeated to twice what the kernel could buffer: the stream
    cannot all leave the exchange unless marketdata reads it."""
    depth = [f for f in load()[0] if b"@depth" in f[:40]]
    size = sum(len(f) for f in depth)
    return depth * (2 * kernel_buffers() // size + 1)


class Blaster:
    """A WebSocket server on 127.0.0.1 (a thread) writing `frames` at once to its one client;
    `sent` is set once the kernel has taken the last byte. It answers the client's close."""

    def __init__(self, frames: list[bytes]) -> None:
        self.wire = b"".join(ws_frame(f) for f in frames)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.url = f"ws://127.0.0.1:{self.listener.getsockname()[1]}"
        self.sent, self._stop = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="test-blaster")
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            with conn:
                try:
                    conn.settimeout(None)
                    _handshake(conn)
                    conn.sendall(self.wire)
                    self.sent.set()
                    conn.settimeout(5)
                    if conn.recv(4096):  # the client's close frame
                        conn.sendall(b"\x88\x02\x03\xe8")  # close, 1000
                except OSError:
                    pass  # the client went away mid-stream (a test closing it)
            return

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
        self.thread.join(10)


class Feed:
    """The real LiveFeed on `url`, records pulled by the test (`pull`): the loop held back."""

    def __init__(self, url: str) -> None:
        md = qfconfig.load({"QF_SYMBOLS": KEY.lower(), "QF_BINANCE_WS": url,
                            "QF_BINANCE_REST": "http://127.0.0.1:9"}).md  # no snapshot is asked for
        self.metrics = MdMetrics((KEY,))
        self.stopped = False
        self.feed = LiveFeed(md, (KEY,), self.metrics, lambda: self.stopped)
        self.inbox = self.feed.inbox
        self.records = self.feed.records()

    def next_frame(self, timeout: float) -> bytes:
        """The next frame the loop gets (other records passed over)."""
        deadline = time.monotonic() + timeout
        for rec in self.records:
            if type(rec) is RawFrame:
                return rec.frame
            assert time.monotonic() < deadline, "no frame"
        raise AssertionError("the feed ended")

    def close(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.records.close()
            self.feed.close()


def reader_waiting(inbox) -> bool:
    return inbox.waiting and inbox.qsize() >= INBOX_FRAMES


def test_a_burst_waits_on_tcp_with_the_inbox_at_its_bound_and_every_frame_arrives_in_order():
    frames = burst_frames()
    server = Blaster(frames)
    feed = Feed(server.url)
    try:
        assert feed.next_frame(20) == frames[0]
        wait_for(lambda: reader_waiting(feed.inbox), 30, "the reader to wait for room")
        # the loop is held back: the reader has stopped at the bound, and so has the exchange
        assert feed.inbox.qsize() <= INBOX_FRAMES
        assert not server.sent.is_set()
        deepest, wrong = 0, []
        for i, expected in enumerate(frames[1:], 1):
            frame = feed.next_frame(30)
            deepest = max(deepest, feed.inbox.qsize())
            if frame != expected:
                wrong.append(i)
        assert wrong == []  # every frame, in the exchange's order
        assert deepest <= INBOX_FRAMES
        assert server.sent.wait(10)
        waits = feed.inbox.waits
        assert waits >= 1 and feed.inbox.waited_s > 0
    finally:
        feed.close()
        server.close()
    figures = {f.name: f.samples[0].value for f in MdCollector(feed.metrics).collect() if "inbox" in f.name}
    assert figures["qf_md_inbox_waits"] == waits


def test_stopping_while_the_reader_waits_for_room_ends_it_promptly_with_the_frame_it_held():
    server = Blaster(burst_frames())
    feed = Feed(server.url)
    try:
        feed.next_frame(20)
        wait_for(lambda: reader_waiting(feed.inbox), 30, "the reader to wait for room")
        held = feed.inbox.qsize()  # no one takes from it now: the reader is blocked, not reading
        conn = feed.feed.links[next(iter(feed.feed.links))].live
        t0 = time.monotonic()
        feed.close()
        elapsed = time.monotonic() - t0
    finally:
        feed.close()
        server.close()
    # woken at once; websockets' closing handshake, which the blocked exchange cannot answer,
    # takes its close_timeout (1 s)
    assert elapsed < 2.5 and not conn.thread.is_alive()
    left = []
    while not feed.inbox.empty():
        left.append(feed.inbox.get_nowait())
    assert len(left) == held + 2  # the frame in the reader's hand, then its close
    assert type(left[-2]) is RawFrame
    assert type(left[-1]) is ConnEvent and not left[-1].opened and left[-1].why == "stopping"
