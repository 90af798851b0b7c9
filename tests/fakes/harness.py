"""Test harness for marketdata: the service on a thread, and a tap recording what it publishes."""
from __future__ import annotations

import threading

import zmq

from services.marketdata.service import MarketDataService
from shared.bus import Subscriber
from shared.errors import DecodeError
from tests.conftest import wait_for


class Tap:
    """A real SUB socket on its own thread keeping every (topic, message) in order."""

    def __init__(self, endpoint: str, topics: tuple[str, ...] = ("",)) -> None:
        self.msgs: list[tuple[str, object]] = []
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._sub = Subscriber(endpoint, topics, 1_000_000, ctx=zmq.Context.instance())
        self.thread = threading.Thread(target=self._run, daemon=True, name="tap")
        self.thread.start()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sub.sock, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(50):
                continue
            while True:
                try:
                    topic, msg = self._sub.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                except DecodeError:
                    continue
                with self.lock:
                    self.msgs.append((topic, msg))

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)
        self._sub.close()

    def snapshot(self) -> list[tuple[str, object]]:
        with self.lock:
            return list(self.msgs)

    def of(self, symbol: str, types: tuple[str, ...] = ("book", "md_status")) -> list:
        """Messages about `symbol` of the given types, in arrival order."""
        return [m for _, m in self.snapshot() if getattr(m, "symbol", None) == symbol and m.TYPE in types]

    def books(self, symbol: str) -> list:
        return self.of(symbol, ("book",))

    def states(self, symbol: str) -> list[str]:
        return [m.state for m in self.of(symbol, ("md_status",))]

    def wait_books(self, symbol: str, n: int, timeout: float = 20.0) -> list:
        return wait_for(lambda: len(self.books(symbol)) >= n and self.books(symbol), timeout,
                        f"{n} books of {symbol}")

    def mark(self) -> int:
        with self.lock:
            return len(self.msgs)

    def since(self, mark: int, symbol: str, types: tuple[str, ...] = ("book", "md_status")) -> list:
        """Messages about `symbol` of the given types received after `mark` (see mark())."""
        return [m for _, m in self.snapshot()[mark:] if getattr(m, "symbol", None) == symbol and m.TYPE in types]


class ServiceThread:
    """A MarketDataService running on a thread of the test process; stopped (and checked to
    have stopped) on exit."""

    def __init__(self, cfg, **kwargs) -> None:
        self.svc = MarketDataService(cfg, **kwargs)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name="marketdata")

    def _run(self) -> None:
        try:
            self.svc.run()
        except BaseException as exc:  # reported by __exit__
            self.error = exc

    def __enter__(self) -> MarketDataService:
        self.thread.start()
        return self.svc

    def __exit__(self, *exc) -> None:
        self.svc.stop()
        self.thread.join(15)
        assert not self.thread.is_alive(), "marketdata did not stop"
        if self.error is not None and exc[0] is None:
            raise self.error


def exact_books(fake, books: list) -> list[str]:
    """Describe every published book that differs from the exchange's book at its update id
    (or that the exchange never had); [] when all are exact."""
    wrong = []
    for b in books:
        symbol = b.symbol.partition(":")[2] or b.symbol
        truth = fake.true_top(symbol, b.update_id)
        if truth is None:
            wrong.append(f"{b.symbol} {b.update_id}: not a state of the exchange's book")
        elif (b.bids, b.asks) != (truth[0][:len(b.bids)], truth[1][:len(b.asks)]) or len(b.bids) != len(truth[0]):
            wrong.append(f"{b.symbol} {b.update_id}: {b.bids[:2]} {b.asks[:2]} != {truth[0][:2]} {truth[1][:2]}")
    return wrong

