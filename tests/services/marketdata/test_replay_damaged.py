"""`qf replay` (and the ReplayFeed under it) on damaged captures made here from the shipped one: a bad
message is logged with FILE:LINE and what is wrong, the final line counts it, and the exit status is
3 (replayed to its end, not clean); a capture without one event of QF_SYMBOLS is exit 2, "no book
for …"; a directory, an empty file, receive times going back all along are refused before anything
is replayed (exit 2); a receive time going back once is named and counted (exit 3). Real files,
real processes."""
import gzip
import subprocess
import sys

import orjson
import pytest

from services.marketdata.feeds import ReplayFeed
from services.marketdata.records import WsMessage
from tests.conftest import ROOT, capture_head, clean_environ, depth_line, tcp_env

HEAD = 3000  # records kept after the capture's snapshot




def nan_capture(path) -> int:
    lines = capture_head(HEAD)
    i = depth_line(lines)
    rec = orjson.loads(lines[i])
    rec["m"]["data"]["b"].insert(0, ["61000.00000000", "NaN"])
    lines[i] = orjson.dumps(rec) + b"\n"
    path.write_bytes(b"".join(lines))
    return i + 1


def replay(tmp_path, capture, *extra) -> subprocess.CompletedProcess:
    settings = tcp_env(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "services.cli", "replay", "--capture", str(capture),
                           "--speed", "0", *extra], env={**clean_environ(), **settings}, cwd=ROOT,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout[-3000:] + proc.stderr
    return proc


def final_line(proc) -> str:
    return next(line for line in reversed(proc.stdout.splitlines()) if "replay finished" in line)


def test_a_clean_head_replays_clean(tmp_path):
    capture = tmp_path / "head.jsonl"
    capture.write_bytes(b"".join(capture_head(HEAD)))
    proc = replay(tmp_path, capture)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    last = final_line(proc)
    assert 'event="replay finished"' in last and "bad_messages=0" in last and "time_backwards=0" in last


def test_a_bad_depth_event_is_named_by_file_and_line_and_the_replay_exits_3(tmp_path):
    capture = tmp_path / "nan.jsonl"
    line = nan_capture(capture)
    proc = replay(tmp_path, capture)
    assert proc.returncode == 3, proc.stderr
    where = f"{capture}:{line}"
    warning = next(x for x in proc.stdout.splitlines() if 'event="bad feed message"' in x)
    assert f"at={where} reason=bad_event" in warning and "'NaN'" in warning, warning
    last = final_line(proc)
    assert 'event="replay finished with problems"' in last and "level=warning" in last
    assert "bad_messages=1" in last and f"first: {where}: BTCUSDT: bad depth event" in last
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"qf replay: 1 bad message (first: {where}: BTCUSDT: bad depth event")
    assert lines[0].endswith("; no book of BTCUSDT since then"), lines[0]


def test_a_capture_of_another_symbol_is_no_book_exit_2(tmp_path):
    capture = tmp_path / "eth.jsonl"
    capture.write_bytes(b"".join(line.replace(b"BTCUSDT", b"ETHUSDT").replace(b"btcusdt", b"ethusdt")
                                 for line in capture_head(HEAD)))
    proc = replay(tmp_path, capture)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == ("qf replay: no book for BTCUSDT: not one event of it in the capture "
                                   f"({len(capture_head(HEAD)):,} messages of other symbols ignored)")


@pytest.mark.parametrize("case", ["directory", "empty", "empty gz", "missing", "backwards"])
def test_what_is_no_capture_is_refused_before_replaying(tmp_path, case):
    words = 'not a capture (no record with an integer receive time "t")'
    if case == "directory":
        path, words = tmp_path / "adir", "is a directory, not a capture file"
        path.mkdir()
    elif case == "empty":
        path = tmp_path / "empty.jsonl"
        path.write_bytes(b"")
    elif case == "empty gz":
        path = tmp_path / "empty.jsonl.gz"
        path.write_bytes(gzip.compress(b""))
    elif case == "missing":
        path, words = tmp_path / "nothing.jsonl", "no such file"
    else:
        out = []
        for j, line in enumerate(capture_head(HEAD)):
            rec = orjson.loads(line)
            rec["t"] = 2_000_000_000_000_000_000 - j * 1_000_000
            out.append(orjson.dumps(rec) + b"\n")
        path = tmp_path / "backwards.jsonl"
        path.write_bytes(b"".join(out))
    proc = replay(tmp_path, path)
    assert proc.returncode == 2, proc.stderr
    if case == "backwards":
        assert proc.stderr.strip() == (f'qf replay: {path}:1-1001: receive times ("t") go backwards in 1000 of 1000 '
                                       f"steps: not a capture in our format (records are written in the order they "
                                       f"were received)")
    else:
        assert proc.stderr.strip() == f"qf replay: {path}: {words}"
    assert "marketdata started" not in proc.stdout  # refused before anything was replayed


def test_a_receive_time_going_back_once_is_named_counted_and_exit_3(tmp_path):
    lines = capture_head(HEAD)
    i = depth_line(lines, after=100)
    rec, before = orjson.loads(lines[i]), orjson.loads(lines[i - 1])
    rec["t"] = before["t"] - 5_000_000
    lines[i] = orjson.dumps(rec) + b"\n"
    capture = tmp_path / "back_once.jsonl"
    capture.write_bytes(b"".join(lines))
    proc = replay(tmp_path, capture)
    assert proc.returncode == 3, proc.stderr
    where = f"{capture}:{i + 1}"
    warning = next(x for x in proc.stdout.splitlines() if "capture receive time goes backwards" in x)
    assert f"at={where} by_ms=5.0" in warning, warning
    assert "time_backwards=1" in final_line(proc)
    assert proc.stderr.strip() == (f'qf replay: receive times go backwards 1 time (first: {where}: receive time '
                                   f'"t" 5.000 ms before the previous record\'s)')


def test_the_feed_says_where_each_record_was_read(tmp_path):
    """ReplayFeed.where() is the FILE:LINE of the record it handed out last, across files played
    one after another (a+b) and blank lines."""
    lines = capture_head(HEAD)
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz"
    a.write_bytes(b"".join(lines[:20]) + b"\n")  # a blank line at the end of a
    b.write_bytes(gzip.compress(b"".join(lines[20:40])))
    feed = ReplayFeed(f"{a}+{b}", ("BTCUSDT",), 0, stamp="recorded")
    seen = [(type(rec), feed.where()) for rec in feed.records()]
    messages = [where for kind, where in seen if kind is WsMessage]
    snap_line = next(i for i, line in enumerate(lines) if b'"k":"snapshot"' in line) + 1
    want = [f"{a}:{n}" for n in range(1, 21) if n != snap_line] + [f"{b}:{n}" for n in range(1, 21)]
    assert messages == want
    assert feed.backwards == 0 and feed.first_backwards == ""


def test_a_gap_nothing_repairs_is_named_and_exit_3(tmp_path):
    """One depth event left out: the book is lost at the gap and the capture has no later snapshot."""
    lines = capture_head(HEAD)
    i = depth_line(lines, after=100)
    capture = tmp_path / "gap.jsonl"
    capture.write_bytes(b"".join(lines[:i] + lines[i + 1:]))
    proc = replay(tmp_path, capture)
    assert proc.returncode == 3, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("qf replay: BTCUSDT ends without a book: after update id ") and \
        line.endswith("never repaired by a later snapshot"), line
