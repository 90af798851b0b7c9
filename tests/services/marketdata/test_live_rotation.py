"""Planned connection replacement (24 h cut, serverShutdown): synced first, not one book missed."""
from services.marketdata.capture import build_book
from shared import config as qfconfig
from tests.conftest import SPOT_CAPTURE, tcp_env, wait_for
from tests.fakes.binance import FakeBinance
from tests.fakes.harness import ServiceThread, Tap, exact_books


def config(tmp_path, fake, **extra):
    return qfconfig.load(tcp_env(tmp_path, **{"QF_FEED": "live", "QF_BINANCE_WS": fake.ws_url,
                                              "QF_BINANCE_REST": fake.rest_url, "QF_MD_BACKOFF_MAX_S": "0.3",
                                              **extra}))


def assert_every_event_published_once(fake, books):
    """From the second book the tap saw on, the books are exactly the exchange's events, in order."""
    ids = [b.update_id for b in books][1:]
    emitted = [u for u, _ in fake.emitted["BTCUSDT"]]
    start = emitted.index(ids[0])
    assert ids == emitted[start:start + len(ids)]


def test_connections_are_replaced_before_the_cut_without_a_gap(tmp_path):
    # the fake cuts connections at 2.5 s like Binance at 24 h; marketdata replaces them at 1 s
    fake = FakeBinance({"BTCUSDT": SPOT_CAPTURE}, speed=25, max_conn_age_s=2.5)
    with fake:
        cfg = config(tmp_path, fake, QF_MD_ROTATE_S="1", QF_MD_RECORD=str(tmp_path / "rec" / "cap.jsonl.gz"))
        tap = Tap(cfg.bus.md_pub)
        try:
            with ServiceThread(cfg) as svc:
                tap.wait_books("BTCUSDT", 5)
                wait_for(lambda: svc.router.m.switches.get("spot", 0) >= 2, 20, "two planned switches")
                n = len(tap.books("BTCUSDT"))
                tap.wait_books("BTCUSDT", n + 20)
                stats, reconnects = dict(svc.router.stats), dict(svc.router.m.reconnects)
                recording = svc.recorder.segments
        finally:
            tap.close()
    msgs = tap.of("BTCUSDT")
    first_book = next(i for i, m in enumerate(msgs) if m.TYPE == "book")
    assert [m.state for m in msgs[first_book:] if m.TYPE == "md_status"] == []  # SYNCED throughout
    books = tap.books("BTCUSDT")
    assert_every_event_published_once(fake, books)
    assert exact_books(fake, books) == []
    assert fake.connections >= 3 and reconnects == {} and stats["gaps"] == 0
    # the recording spans the switches without a hole: it rebuilds to the exchange's book
    got = build_book(recording[0], "BTCUSDT", depth=10)
    assert got["gaps"] == 0 and got["resyncs"] == 0
    truth = fake.true_top("BTCUSDT", got["update_id"])
    assert [[float(p), float(q)] for p, q in got["bids"]] == truth[0]
    assert [[float(p), float(q)] for p, q in got["asks"]] == truth[1]


def test_server_shutdown_is_answered_by_a_new_connection_before_the_old_one_closes(tmp_path):
    fake = FakeBinance({"BTCUSDT": SPOT_CAPTURE}, speed=25)
    with fake:
        cfg = config(tmp_path, fake)
        tap = Tap(cfg.bus.md_pub)
        try:
            with ServiceThread(cfg) as svc:
                tap.wait_books("BTCUSDT", 20)
                mark = tap.mark()
                fake.announce_shutdown(grace_s=1.5)
                wait_for(lambda: svc.router.m.switches.get("spot", 0) == 1, 10, "the switch to a new connection")
                n = len(tap.books("BTCUSDT"))
                tap.wait_books("BTCUSDT", n + 20)
        finally:
            tap.close()
    after = tap.since(mark, "BTCUSDT")
    assert [m for m in after if m.TYPE == "md_status"] == []
    assert_every_event_published_once(fake, tap.books("BTCUSDT"))
    assert exact_books(fake, tap.books("BTCUSDT")) == []
    assert fake.connections == 2 and svc.router.m.reconnects == {}
