"""Fixtures for the service tests: services in threads, REQ clients, books, bounded waits.

Each service folder's conftest.py defines `env` (its QF_ settings); `cfg` builds on it."""
from __future__ import annotations

import sqlite3
import threading
import uuid
from typing import Callable

import pytest
import zmq

from shared import messages
from shared.bus import Publisher
from shared.config import Config, load
from shared.messages import Book
from tests.conftest import journal_stored, wait_for

WAIT_S = 5.0  # bound of every wait; the happy path takes milliseconds


def wait_until(predicate: Callable[[], object], what: str, timeout: float = WAIT_S, step: float = 0.005):
    """Poll `predicate` until truthy (returned); AssertionError after `timeout` s."""
    return wait_for(predicate, timeout, what, step)


def endpoints() -> dict[str, str]:
    """In-process endpoints, and no Shabbat pause: services on the wall clock must not depend on
    the weekday (the pauses are tested with a clock the test moves)."""
    tag = uuid.uuid4().hex[:10]
    return {**{key: f"inproc://{tag}-{name}" for key, name in (
        ("QF_MD_PUB", "md"), ("QF_RISK_REP", "risk"), ("QF_BROKER_REP", "broker"),
        ("QF_BROKER_PUB", "broker-pub"), ("QF_RISK_PUB", "risk-pub"),
        ("QF_STRATEGY_PUB", "strategy-pub"))}, "QF_SHABBAT_PAUSE": "false"}


@pytest.fixture
def cfg(env) -> Config:
    return load(env)


def make_book(symbol: str = "BTCUSDT", bids=((100.0, 1.0),), asks=((100.5, 1.0),), ts: int = 1) -> Book:
    """A `book` message with hand-made levels (floats, best first, as on the wire)."""
    bids, asks = [list(b) for b in bids], [list(a) for a in asks]
    mid = (bids[0][0] + asks[0][0]) / 2 if bids and asks else 0.0
    return Book(ts=ts, symbol=symbol, exch_ts=1_700_000_000_000, update_id=1, bids=bids, asks=asks,
                mid=mid, spread=0.0, spread_bps=0.0, imbalance=0.0, microprice=mid, recv_ts=ts)


class Runner:
    """Runs services in threads; `stop_all()` stops and joins every one of them."""

    def __init__(self) -> None:
        self.running: list[tuple[object, threading.Thread]] = []

    def start(self, service):
        thread = threading.Thread(target=service.run, name=type(service).__name__, daemon=True)
        thread.start()
        self.running.append((service, thread))
        return service

    def stop(self, service) -> None:
        for svc, thread in list(self.running):
            if svc is service:
                svc.stop()
                thread.join(WAIT_S)
                assert not thread.is_alive(), f"{type(svc).__name__} did not stop"
                self.running.remove((svc, thread))

    def stop_all(self) -> None:
        for svc, _ in list(self.running):
            self.stop(svc)


@pytest.fixture
def runner():
    r = Runner()
    try:
        yield r
    finally:
        r.stop_all()


class Client:
    """A REQ socket with a bounded wait per request."""

    def __init__(self, endpoint: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.REQ)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def raw(self, payload: bytes, timeout: float = WAIT_S) -> bytes:
        self.sock.send(payload)
        if not self.sock.poll(int(timeout * 1000)):
            raise AssertionError(f"no reply within {timeout}s")
        return self.sock.recv()

    def request(self, msg: messages.Message, timeout: float = WAIT_S) -> messages.Message:
        return messages.decode(self.raw(messages.encode(msg), timeout), messages.REQUESTS)

    def close(self) -> None:
        self.sock.close(linger=0)


@pytest.fixture
def clients():
    """`clients(endpoint)` -> Client; all closed at teardown."""
    made: list[Client] = []

    def make(endpoint: str) -> Client:
        made.append(Client(endpoint))
        return made[-1]
    try:
        yield make
    finally:
        for c in made:
            c.close()


@pytest.fixture
def md_pub(cfg):
    """The test's stand-in for marketdata: a PUB bound on cfg.bus.md_pub."""
    pub = Publisher(cfg.bus.md_pub, cfg.bus.hwm)
    try:
        yield pub
    finally:
        pub.close()


def feed(pub: Publisher, book: Book, seen: Callable[[], object], what: str = "the book") -> None:
    """Publish `book` until `seen()` holds: a SUB's subscription reaches the PUB asynchronously."""
    def publish_and_check():
        pub.publish(f"book.{book.symbol}", book)
        return seen()
    wait_until(publish_and_check, what)


def db_rows(path: str, sql: str, *args) -> list[tuple]:
    """Read the database through a separate plain sqlite3 connection (what another process sees),
    once the broker has stored what its journal holds (within milliseconds of its answers)."""
    journal_stored(path)
    con = sqlite3.connect(path, timeout=5)
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()


# Helpers as fixtures: test modules must not import a `conftest` (several share that name).

@pytest.fixture(name="wait_until", scope="session")
def _wait_until_fixture():
    return wait_until


@pytest.fixture(name="make_book", scope="session")
def _make_book_fixture():
    return make_book


@pytest.fixture(name="feed", scope="session")
def _feed_fixture():
    return feed


@pytest.fixture(name="db_rows", scope="session")
def _db_rows_fixture():
    return db_rows
