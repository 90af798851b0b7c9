"""bench/uvloop.py's three ingests give the exchange's exact books from the fake Binance, and the bench runs."""
import importlib.util

import pytest

from bench import uvloop as bench_uvloop
from services.marketdata.router import BookRouter
from tests.conftest import SPOT_CAPTURE
from tests.fakes.binance import FakeBinance
from tests.fakes.harness import exact_books

HAVE_UVLOOP = importlib.util.find_spec("uvloop") is not None
needs_uvloop = pytest.mark.skipif(not HAVE_UVLOOP, reason=f"uvloop is not installed ({bench_uvloop.UVLOOP_PIN})")


class Books:
    """A sink for an ingest: every record into a BookRouter whose books are kept here;
    `finished` after `n` books."""

    def __init__(self, n: int) -> None:
        self.router = BookRouter(("BTCUSDT",), 10, None)
        self.router.pub, self.router.live_feed = self, True
        self.books: list = []
        self.n = n

    def publish(self, topic: str, msg) -> None:
        if msg.TYPE == "book":
            self.books.append(msg)

    def dispatch(self, rec, now_ns: int, now: float) -> None:
        self.router.dispatch(rec, now_ns, now)

    @property
    def finished(self) -> bool:
        return len(self.books) >= self.n


@pytest.mark.parametrize("variant", ["threaded", "asyncio", pytest.param("uvloop", marks=needs_uvloop)])
def test_each_ingest_publishes_only_the_exchanges_books(variant):
    """A comparison of ingests that built different books would compare nothing."""
    with FakeBinance({"BTCUSDT": SPOT_CAPTURE}, speed=25) as fake:
        sink = Books(80)
        if variant == "threaded":
            bench_uvloop.ingest_threaded(fake.ws_url, fake.rest_url, sink, timeout_s=30)
        else:
            factory = None
            if variant == "uvloop":
                import uvloop
                factory = uvloop.new_event_loop
            bench_uvloop.ingest_async(fake.ws_url, fake.rest_url, sink, factory, timeout_s=30)
        assert fake.connections == 1
    ids = [b.update_id for b in sink.books]
    assert len(ids) >= 80 and ids == sorted(set(ids))
    assert exact_books(fake, sink.books) == []
    stats = sink.router.stats
    assert stats["gaps"] == stats["bad_messages"] == 0 and stats["trades"] > 0


@needs_uvloop
def test_a_short_run_of_the_bench_measures_all_three(monkeypatch):
    for name, value in {"ROUNDS": 1, "BLAST": 600, "PACED": 60, "PACE_PER_S": 2000.0}.items():
        monkeypatch.setattr(bench_uvloop, name, value)
    figures = bench_uvloop.run()
    variants = bench_uvloop.VARIANTS
    assert set(figures) == ({f"md_ingest_events_per_s_{v}" for v in variants}
                            | {f"md_ingest_us_p{p}_{v}" for p in (50, 99) for v in variants}
                            | {"md_ingest_uvloop_speedup", "md_ingest_uvloop_vs_threaded"})
    assert all(value > 0 for value in figures.values())
    assert figures["md_ingest_us_p50_uvloop"] <= figures["md_ingest_us_p99_uvloop"]


def test_without_uvloop_the_bench_says_so_and_measures_nothing(monkeypatch, capsys):
    def missing():
        raise ImportError("No module named 'uvloop'")

    monkeypatch.setattr(bench_uvloop, "_uvloop", missing)
    assert bench_uvloop.run() == {}
    assert "skipped: uvloop is not installed" in capsys.readouterr().out
