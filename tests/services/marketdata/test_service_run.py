"""The marketdata service running: replays of the real captures, its metrics port, `qf replay`."""
import os
import subprocess
import sys
import urllib.request

import orjson

from services.marketdata.capture import build_book, iter_capture
from shared import config as qfconfig
from tests.conftest import ROOT, USDM_CAPTURE, SPOT_CAPTURE, clean_environ, tcp_env, wait_for
from tests.fakes.harness import ServiceThread, Tap


def floats(levels):
    return [[float(p), float(q)] for p, q in levels]


def test_replay_of_a_spot_and_a_usdm_capture_side_by_side(tmp_path):
    env = tcp_env(tmp_path, QF_FEED=f"replay:{SPOT_CAPTURE},{USDM_CAPTURE}", QF_REPLAY_SPEED="0",
                  QF_SYMBOLS="btcusdt,usdm:btcusdt")
    cfg = qfconfig.load(env)
    tap = Tap(cfg.bus.md_pub, ("book.", "status."))
    try:
        with ServiceThread(cfg) as svc:
            wait_for(lambda: tap.states("BTCUSDT")[-1:] == ["REPLAY_DONE"] and
                     tap.states("USDM:BTCUSDT")[-1:] == ["REPLAY_DONE"], 90, "both replays to finish")
            stats, books = dict(svc.router.stats), dict(svc.router.m.books)
        for key, path, market in (("BTCUSDT", SPOT_CAPTURE, "spot"), ("USDM:BTCUSDT", USDM_CAPTURE, "usdm")):
            want = build_book(path, "BTCUSDT", depth=10)
            last = tap.books(key)[-1]
            assert (last.update_id, last.bids, last.asks) == (want["update_id"], floats(want["bids"]),
                                                              floats(want["asks"])), key
            ids = [b.update_id for b in tap.books(key)]
            assert ids == sorted(set(ids))  # never repeated, never backwards
            # a book per applied event; in both captures one event is buffered before the
            # snapshot and applied with it, so the snapshot's book stands in for it
            assert books[key] == want["events"]
        assert stats["trades"] == 19904 + 10701 and stats["gaps"] == 0 and stats["bad_messages"] == 0
        assert {t for t, _ in tap.snapshot()} >= {"book.BTCUSDT", "book.USDM:BTCUSDT"}
    finally:
        tap.close()


def test_a_looping_replay_resyncs_at_each_restart(tmp_path):
    short = tmp_path / "short.jsonl"
    recs = [r for _, r in zip(range(1500), iter_capture(SPOT_CAPTURE))]
    short.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in recs))
    cfg = qfconfig.load(tcp_env(tmp_path, QF_FEED=f"replay:{short}", QF_REPLAY_SPEED="0", QF_REPLAY_LOOP="true"))
    tap = Tap(cfg.bus.md_pub)
    try:
        with ServiceThread(cfg):
            wait_for(lambda: tap.states("BTCUSDT").count("DISCONNECTED") >= 2 and
                     tap.states("BTCUSDT")[-1] == "SYNCED", 30, "two restarts, synced again")
        seq = [(m.TYPE, getattr(m, "state", None), getattr(m, "update_id", None)) for m in tap.of("BTCUSDT")]
        # from the first restart on (the tap may join after the very first messages): update ids
        # go back only across a DISCONNECTED, and no book comes while not synced
        seq = seq[seq.index(("md_status", "DISCONNECTED", None)):]
        state, last = None, 0
        for kind, st, uid in seq:
            if kind == "md_status":
                state = st
                last = 0 if st == "DISCONNECTED" else last
            else:
                assert state == "SYNCED" and uid > last
                last = uid
    finally:
        tap.close()


def test_metrics_on_the_service_port(tmp_path):
    cfg = qfconfig.load(tcp_env(tmp_path, QF_FEED=f"replay:{SPOT_CAPTURE}", QF_REPLAY_SPEED="0",
                                QF_MD_METRICS_BIND="127.0.0.1:0"))
    with ServiceThread(cfg) as svc:
        wait_for(lambda: svc.router.state["BTCUSDT"] == "REPLAY_DONE", 60, "the replay to finish")
        port = wait_for(lambda: svc.metrics_port, 5, "the metrics port")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    assert 'qf_md_events_total{stream="depth",symbol="BTCUSDT"} 6495.0' in text
    assert 'qf_md_events_total{stream="trade",symbol="BTCUSDT"} 19904.0' in text
    assert 'qf_md_books_published_total{symbol="BTCUSDT"} 6493.0' in text
    assert 'qf_md_gaps_total{symbol="BTCUSDT"} 0.0' in text
    assert 'qf_md_event_seconds_count 6495.0' in text and 'qf_md_event_seconds_bucket{le="+Inf"}' in text
    assert 'qf_md_exchange_lag_seconds_count{symbol="BTCUSDT"}' in text
    for name in ("qf_md_bytes_total", "qf_md_resyncs_total", "qf_md_book_age_seconds", "qf_md_synced",
                 "qf_md_decode_errors", "qf_md_reconnects", "qf_md_snapshot_weight"):
        assert name in text, name


def test_qf_replay_publishes_a_capture_and_exits(tmp_path):
    short = tmp_path / "short.jsonl.gz"
    import gzip
    recs = [r for _, r in zip(range(700), iter_capture(SPOT_CAPTURE))]  # ~5 s recorded
    short.write_bytes(gzip.compress(b"".join(orjson.dumps(r) + b"\n" for r in recs)))
    settings = tcp_env(tmp_path)
    cfg = qfconfig.load(settings)
    tap = Tap(cfg.bus.md_pub)
    try:
        proc = subprocess.run([sys.executable, "-m", "services.cli", "replay", "--capture", str(short),
                               "--speed", "4"], env={**clean_environ(), **settings}, cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert "replay finished" in proc.stdout
        want = build_book(short, "BTCUSDT", depth=10)
        last = wait_for(lambda: tap.books("BTCUSDT") and tap.books("BTCUSDT")[-1].update_id == want["update_id"]
                        and tap.books("BTCUSDT")[-1], 10, "the final book")
        assert (last.bids, last.asks) == (floats(want["bids"]), floats(want["asks"]))
        assert tap.states("BTCUSDT")[-1] == "REPLAY_DONE"
    finally:
        tap.close()
    assert not os.path.exists(os.path.join(settings["QF_RUN_DIR"], "marketdata.alive"))


def test_qf_replay_of_a_cut_capture_says_so_and_fails(tmp_path):
    """A capture cut mid-record (a recorder killed while writing): what it holds is replayed,
    then REPLAY_FAILED naming the file, not REPLAY_DONE; `qf replay` exits 1 and says why."""
    import gzip
    recs = [r for _, r in zip(range(700), iter_capture(SPOT_CAPTURE))]
    whole = gzip.compress(b"".join(orjson.dumps(r) + b"\n" for r in recs))
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(whole[:len(whole) * 2 // 3])
    settings = tcp_env(tmp_path)
    cfg = qfconfig.load(settings)
    tap = Tap(cfg.bus.md_pub, ("book.", "status."))
    try:
        # paced (~1.5 s): the tap, which connects before the replay binds, joins while it plays
        proc = subprocess.run([sys.executable, "-m", "services.cli", "replay", "--capture", str(cut),
                               "--speed", "2"], env={**clean_environ(), **settings}, cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert f"qf replay: capture unreadable: {cut}" in proc.stderr, proc.stderr
        assert "replay failed" in proc.stdout and "replay finished" not in proc.stdout
        final = wait_for(lambda: [m for m in tap.of("BTCUSDT", ("md_status",)) if m.state.startswith("REPLAY")],
                         10, "the replay's end on the bus",
                         explain=lambda: f"states {tap.states('BTCUSDT')}, {len(tap.books('BTCUSDT'))} books")
        assert [m.state for m in final] == ["REPLAY_FAILED"], final
        assert final[0].detail.startswith(f"capture unreadable: {cut}"), final[0].detail
        assert tap.books("BTCUSDT"), "what the capture held before the cut was replayed"
    finally:
        tap.close()


def test_a_metrics_port_in_use_is_a_fatal_error_not_a_traceback(tmp_path):
    import socket

    import pytest

    from services.marketdata.service import MarketDataService
    from shared.errors import FatalError
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        cfg = qfconfig.load(tcp_env(tmp_path, QF_FEED=f"replay:{SPOT_CAPTURE}",
                                    QF_MD_METRICS_BIND=f"127.0.0.1:{busy.getsockname()[1]}"))
        with pytest.raises(FatalError, match="cannot serve metrics on 127.0.0.1:"):
            MarketDataService(cfg).run()
