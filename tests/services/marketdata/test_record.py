"""Recording: the capture format, rotation, crash safety (`kill -9` loses at most the last second)."""
import glob
import gzip
import os
import signal
import subprocess
import sys
import time
import zlib

import orjson

from services.marketdata.capture import build_book, iter_capture
from services.marketdata.record import Recorder, segment_name
from services.marketdata.sync import Market
from tests.conftest import ROOT, SPOT_CAPTURE, clean_environ, tcp_env, wait_for
from tests.fakes.binance import FakeBinance


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def read_partial(path) -> list[dict]:
    """The complete lines of a capture, even one whose writer died mid-file (no gzip trailer)."""
    raw = open(path, "rb").read()
    data = zlib.decompressobj(wbits=31).decompress(raw) if str(path).endswith(".gz") else raw
    return [orjson.loads(line) for line in data.split(b"\n")[:-1]]


def test_segment_names_sort_in_recording_order():
    t = time.strptime("20240808T235413", "%Y%m%dT%H%M%S")
    assert segment_name("caps/btc.jsonl.gz", t, 1) == "caps/btc-20240808T235413Z-0001.jsonl.gz"
    assert segment_name("btc.jsonl", t, 12) == "btc-20240808T235413Z-0012.jsonl"
    names = [segment_name("x.jsonl.gz", t, n) for n in (9, 10, 11)]
    assert sorted(names) == names


def test_frames_are_written_as_received_in_the_capture_format(tmp_path):
    rec = Recorder(str(tmp_path / "c.jsonl.gz"))
    frame = b'{"stream":"btcusdt@depth@100ms","data":{"U":1,"u":2,"b":[],"a":[]}}'
    rec.ws(111, frame, Market.SPOT)
    rec.ws(112, frame.decode(), Market.USDM)
    rec.ws(113, b'{"stream":"btcusdt@trade",\n "data":{"t":1}}', Market.SPOT)  # JSON with a raw newline
    rec.ws(114, {"stream": "btcusdt@bookTicker", "data": {"u": 3}}, Market.SPOT)
    rec.snapshot(115, "btcusdt", {"lastUpdateId": 1, "bids": [], "asks": []}, Market.USDM)
    rec.close()
    got = list(iter_capture(rec.segments[0]))
    assert got == [
        {"t": 111, "k": "ws", "m": orjson.loads(frame)},
        {"t": 112, "k": "ws", "x": "usdm", "m": orjson.loads(frame)},
        {"t": 113, "k": "ws", "m": {"stream": "btcusdt@trade", "data": {"t": 1}}},
        {"t": 114, "k": "ws", "m": {"stream": "btcusdt@bookTicker", "data": {"u": 3}}},
        {"t": 115, "k": "snapshot", "s": "BTCUSDT", "x": "usdm", "m": {"lastUpdateId": 1, "bids": [], "asks": []}},
    ]
    assert rec.lines == 5


def test_flush_makes_everything_readable_before_the_file_is_closed(tmp_path):
    clock = Clock()
    rec = Recorder(str(tmp_path / "c.jsonl.gz"), flush_s=0.5, clock=clock)
    for i in range(100):
        rec.ws(i, b'{"stream":"s@trade","data":{"t":%d}}' % i, Market.SPOT)
    rec.tick()
    assert len(read_partial(rec.segments[0])) < 100  # not flushed yet: compressed in memory
    clock.t += 0.5
    rec.tick()
    assert [r["t"] for r in read_partial(rec.segments[0])] == list(range(100))
    rec.close()


def test_segments_rotate_by_age_and_by_size(tmp_path):
    clock = Clock()
    rec = Recorder(str(tmp_path / "r" / "c.jsonl"), rotate_s=60, rotate_bytes=10_000, clock=clock)
    line = b'{"stream":"s@trade","data":{"t":1}}'
    rec.ws(1, line, Market.SPOT)
    assert rec.tick() is False
    clock.t += 60
    assert rec.tick() is True  # age
    for i in range(400):  # ~23 kB of lines: two full 10 kB segments and the rest in a fourth
        rec.ws(i, line, Market.SPOT)
        rec.tick()
    rec.close()
    sizes = [os.path.getsize(s) for s in rec.segments]
    assert len(sizes) == 4 and sizes[0] < 100 and min(sizes[1:3]) >= 10_000 and sizes[3] < 10_000
    assert sum(len(list(iter_capture(s))) for s in rec.segments) == 401


def _record_env(tmp_path, fake):
    return {**clean_environ(), **tcp_env(tmp_path), "QF_BINANCE_WS": fake.ws_url,
            "QF_BINANCE_REST": fake.rest_url, "PYTHONUNBUFFERED": "1"}


def _depth_ids(recs) -> list[int]:
    return [r["m"]["data"]["u"] for r in recs if r["k"] == "ws" and "@depth" in r["m"]["stream"]]


def test_qf_record_killed_loses_at_most_the_last_second(tmp_path):
    fake = FakeBinance({"BTCUSDT": SPOT_CAPTURE}, speed=10)
    with fake:
        out = tmp_path / "cap.jsonl.gz"
        proc = subprocess.Popen([sys.executable, "-m", "services.cli", "record", "--symbols", "btcusdt",
                                 "--out", str(out)], env=_record_env(tmp_path, fake), cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            seg = wait_for(lambda: glob.glob(str(tmp_path / "cap-*.jsonl.gz")), 30, "a capture file")[0]
            wait_for(lambda: len(_depth_ids(read_partial(seg))) >= 60, 30, "a few seconds recorded")
            killed_at = time.monotonic()
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        opened = fake.opened[0]
        due = [u for u, t in fake.emitted["BTCUSDT"] if opened <= t <= killed_at - 1.0]
    recs = read_partial(seg)
    got = set(_depth_ids(recs))
    assert due and [u for u in due if u not in got] == []
    assert [r["s"] for r in recs if r["k"] == "snapshot"] == ["BTCUSDT"] and "x" not in recs[0]
    # what survived is a valid capture: it rebuilds the exchange's book
    clean = tmp_path / "recovered.jsonl"
    clean.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in recs))
    book = build_book(clean, "BTCUSDT", depth=10)
    assert book["gaps"] == 0
    assert [[float(p), float(q)] for p, q in book["bids"]] == fake.true_top("BTCUSDT", book["update_id"])[0]


def test_qf_record_rotates_into_segments_that_each_replay_alone(tmp_path):
    fake = FakeBinance({"BTCUSDT": SPOT_CAPTURE, "ETHUSDT": SPOT_CAPTURE}, speed=10)
    with fake:
        proc = subprocess.Popen([sys.executable, "-m", "services.cli", "record", "--symbols", "btcusdt,ethusdt",
                                 "--out", str(tmp_path / "cap.jsonl.gz"), "--rotate-s", "1"],
                                env=_record_env(tmp_path, fake), cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        try:
            wait_for(lambda: len(glob.glob(str(tmp_path / "cap-*.jsonl.gz"))) >= 4, 30, "four segments")
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    assert proc.returncode == 0, out[-2000:]
    segments = sorted(glob.glob(str(tmp_path / "cap-*.jsonl.gz")))
    assert len(segments) >= 4
    for i, seg in enumerate(segments):
        with gzip.open(seg) as fh:  # complete gzip files (trailer written), not just flushed
            fh.read()
        if i == len(segments) - 1:
            continue  # the last one may end (stopped) before its snapshots arrive
        for sym in ("BTCUSDT", "ETHUSDT"):
            book = build_book(seg, sym, depth=10)
            assert book["gaps"] == 0
            truth = fake.true_top(sym, book["update_id"])
            assert [[float(p), float(q)] for p, q in book["bids"]] == truth[0], (seg, sym)
    # the segments together are one gap-free recording of what the exchange sent
    us = [r["m"]["data"]["u"] for seg in segments for r in iter_capture(seg)
          if r["k"] == "ws" and r["m"]["stream"].startswith("btcusdt@depth")]
    emitted = [u for u, _ in fake.emitted["BTCUSDT"]]
    start = emitted.index(us[0])
    assert us == emitted[start:start + len(us)]
