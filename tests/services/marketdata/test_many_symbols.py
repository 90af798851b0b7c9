"""Twenty symbols on one connection: the real `qf marketdata` keeps every book synced and exact, nothing dropped."""
import subprocess
import sys

from bench.md_many import symbol_names, write_captures
from shared import config as qfconfig
from tests.conftest import ROOT, SPOT_CAPTURE, clean_environ, stop_process, tcp_env, wait_for
from tests.fakes.binance import FakeBinance
from tests.fakes.harness import Tap, exact_books

N_SYMBOLS = 20
SECONDS = 40  # of the capture served, recorded time: ~400 depth events and ~1,400 trades a symbol
SPEED = 4  # × the recorded pace: ~3,600 messages/s for the 20 symbols, ~10 s of wall time


def heartbeats(tap):
    return [m for _, m in tap.snapshot() if m.TYPE == "heartbeat" and m.service == "marketdata"]


def caught_up(tap, fake, names):
    """Every symbol's last book is the exchange's last event."""
    return all(tap.books(s) and tap.books(s)[-1].update_id == fake.last_update_id(s) for s in names)


def test_one_process_keeps_twenty_symbols_in_sync_with_exact_books_and_no_message_lost(tmp_path):
    names = symbol_names(N_SYMBOLS)
    captures = write_captures(str(tmp_path), names, SPOT_CAPTURE, seconds=SECONDS)  # renamed copies
    log = tmp_path / "marketdata.log"
    with FakeBinance(captures, speed=SPEED) as fake:
        settings = tcp_env(tmp_path, QF_FEED="live", QF_SYMBOLS=",".join(n.lower() for n in names),
                           QF_BINANCE_WS=fake.ws_url, QF_BINANCE_REST=fake.rest_url, QF_LOG_LEVEL="WARNING")
        tap = Tap(qfconfig.load(settings).bus.md_pub)  # the service's PUB at the configured QF_ZMQ_HWM
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "services.cli", "marketdata"], cwd=ROOT,
                                    env={**clean_environ(), **settings, "PYTHONPATH": ROOT},
                                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            wait_for(lambda: proc.poll() is not None or heartbeats(tap) and heartbeats(tap)[-1].status == "ok",
                     30, "a heartbeat with every book synced")
            assert proc.poll() is None, log.read_text()[-2000:]
            wait_for(fake.finished.is_set, SECONDS / SPEED + 30, "the exchange to send its whole stream")
            wait_for(lambda: caught_up(tap, fake, names), 20, "the last book of every symbol")
            n_beats = len(heartbeats(tap))
            wait_for(lambda: len(heartbeats(tap)) > n_beats, 5, "a heartbeat after the last book")
            beat, missed = heartbeats(tap)[-1], tap._sub.missed
            msgs = tap.snapshot()
        finally:
            code = stop_process(proc)
            tap.close()
    assert code == 0, log.read_text()[-2000:]  # a clean stop on SIGTERM
    # the sync procedure once per symbol: one connection for all, one REST snapshot each
    assert fake.connections == 1 and len(fake.paths[0].split("=")[1].split("/")) == 2 * N_SYMBOLS
    assert sorted(r["symbol"] for r in fake.requests if r["status"] == 200) == sorted(names)
    assert len(fake.requests) == N_SYMBOLS
    # nothing dropped on the bus, and nothing lost or resynced inside the service
    assert missed == 0 and tap._sub.decode_errors == 0
    assert beat.status == "ok" and set(beat.stats["symbols"].values()) == {"SYNCED"}
    counters = {k: beat.stats[k] for k in ("gaps", "resyncs", "bad_messages", "reconnects", "stalls")}
    assert counters == dict.fromkeys(counters, 0)
    for sym in names:
        books = [m for _, m in msgs if m.TYPE == "book" and m.symbol == sym]
        ids, emitted = [b.update_id for b in books], [u for u, _ in fake.emitted[sym]]
        assert len(ids) >= SECONDS * 5 and ids == emitted[emitted.index(ids[0]):], sym  # a book per event
        assert exact_books(fake, books) == [], sym  # each the exchange's top 10 at its update id
        trades = [m.trade_id for _, m in msgs if m.TYPE == "trade" and m.symbol == sym]
        assert trades == list(range(trades[0], trades[0] + len(trades))), sym  # none missing
