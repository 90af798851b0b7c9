"""The conductor's ends of a lock-step replay (shared/lockstep.py) for service tests: an XPUB that
sees a service's SUB join, so each message is published once and the service's counts must equal
what was sent, and the PULL its reports arrive on."""
from __future__ import annotations

import time

import msgpack
import pytest
import zmq

from shared import messages

WAIT_S = 5.0  # bound of every wait here


class XPub:
    """A PUB bound at `endpoint` that sees its subscribers join (XPUB): `joined(*topics)` returns
    once a SUB has subscribed to them all; `publish` numbers each topic's messages like Publisher."""

    def __init__(self, endpoint: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.XPUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)
        self.endpoint = self.sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.seqs: dict[str, int] = {}
        self.topics: set[str] = set()

    def joined(self, *topics: str) -> None:
        deadline = time.monotonic() + WAIT_S
        while not set(topics) <= self.topics:
            left = int((deadline - time.monotonic()) * 1000)
            assert left > 0 and self.sock.poll(left), f"no subscription to {topics} (have {self.topics})"
            frame = self.sock.recv()
            if frame[:1] == b"\x01":
                self.topics.add(frame[1:].decode())

    def publish(self, topic: str, msg: messages.Message) -> None:
        self.seqs[topic] = self.seqs.get(topic, 0) + 1
        self.sock.send_multipart([topic.encode(), messages.encode(msg, self.seqs[topic])])

    def close(self) -> None:
        self.sock.close(0)


class Reports:
    """The conductor's PULL bound at `endpoint`: `until(**want)` reads reports until the latest holds
    every `want` item, and returns it (a service reports only what changed: the latest stays)."""

    def __init__(self, endpoint: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.PULL)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)
        self.last: dict | None = None
        self.seen: list[dict] = []

    def until(self, **want) -> dict:
        deadline = time.monotonic() + WAIT_S
        while self.last is None or any(self.last.get(k) != v for k, v in want.items()):
            left = int((deadline - time.monotonic()) * 1000)
            if left <= 0 or not self.sock.poll(left):
                pytest.fail(f"no report with {want}; the last: {self.last}")
            self.last = msgpack.unpackb(self.sock.recv(), raw=False)
            self.seen.append(self.last)
        return self.last

    def close(self) -> None:
        self.sock.close(0)
