"""`qf backtest` on damaged captures, made here from the shipped one: a bad depth level (NaN, negative,
oversized), a bad trade, receive times going back, a directory. Each bad message is named FILE:LINE
with what is wrong, counted in the summary (text and --json) with what a lost book skipped, and the
exit status is 3 (as for an unrepaired gap: the figures are not those of the capture as recorded);
a file that is no capture in our format is refused, exit 2. Real files, real processes."""
import gzip
import json
import subprocess
import sys

import orjson
import pytest

from services.marketdata.capture import build_book
from tests.conftest import ROOT, capture_head, clean_environ, depth_line

HEAD = 3000  # records kept after the capture's snapshot: ~30 s, enough for the strategy to trade




def with_bad_level(path, side: str, level: list) -> int:
    """The head of the capture with `level` added to one depth event's `side`; returns its line number."""
    lines = capture_head(HEAD)
    i = depth_line(lines)
    rec = orjson.loads(lines[i])
    rec["m"]["data"][side].insert(0, level)
    lines[i] = orjson.dumps(rec) + b"\n"
    path.write_bytes(b"".join(lines))
    return i + 1


def qf(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", *map(str, args)], cwd=ROOT,
                          stdin=subprocess.DEVNULL, env=clean_environ(), capture_output=True, text=True,
                          timeout=120)


def backtest_json(capture, db) -> tuple[subprocess.CompletedProcess, dict | None]:
    proc = qf("backtest", "--capture", capture, "--db", db, "--json")
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc, json.loads(proc.stdout) if proc.stdout.strip() else None


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("clean")
    (d / "head.jsonl").write_bytes(b"".join(capture_head(HEAD)))
    proc, summary = backtest_json(d / "head.jsonl", d / "x.db")
    assert proc.returncode == 0, proc.stderr
    assert summary["bad_events"] == 0 and summary["time_backwards"] == 0 and summary["skipped_messages"] == 0
    return summary


@pytest.mark.parametrize("case, side, level, words", [
    ("nanqty", "b", ["61000.00000000", "NaN"], "'NaN'"),
    ("negqty", "b", ["61000.00000000", "-5.00000000"], "'-5.00000000'"),
    ("hugeqty", "b", ["61000.00000000", "1" + "0" * 400], "not a decimal string"),
    ("negprice", "b", ["-61000.00000000", "1.0"], "'-61000.00000000'"),
    ("numqty", "b", [61000.5, 1e308], "61000.5"),
])
def test_a_bad_depth_level_is_named_counted_and_the_run_exits_3(tmp_path, clean, case, side, level, words):
    capture = tmp_path / f"{case}.jsonl"
    line = with_bad_level(capture, side, level)
    proc, summary = backtest_json(capture, tmp_path / "x.db")
    assert proc.returncode == 3, proc.stderr
    where = f"{capture}:{line}"
    assert summary["bad_events"] == 1
    [bad] = summary["bad_event_list"]
    assert bad["where"] == where and bad["symbol"] == "BTCUSDT" and bad["reason"] == "bad_event"
    assert words in bad["detail"], bad["detail"]
    # the book was lost at that event and nothing in the capture resynced it: what followed is counted
    assert bad["book_lost"] and not bad["repaired"] and bad["skipped_messages"] > 2000 and bad["skipped_s"] > 20
    assert summary["skipped_messages"] == bad["skipped_messages"]
    assert summary["events"] == clean["events"]
    assert summary["strategy_stats"]["books"] < clean["strategy_stats"]["books"]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"qf backtest: 1 bad message in the capture (first: {where}: "), lines
    assert words in lines[0] and "never resynced" in lines[0]


def test_the_text_summary_lists_the_bad_message_and_what_it_cost(tmp_path):
    capture = tmp_path / "nan.jsonl"
    line = with_bad_level(capture, "a", ["61900.00000000", "NaN"])
    proc = qf("backtest", "--capture", capture, "--db", tmp_path / "x.db")
    assert proc.returncode == 3, proc.stderr
    out = proc.stdout
    assert "bad messages 1, " in out
    assert f"bad message  {capture}:{line}: BTCUSDT: bad depth event" in out and "NEVER resynced" in out
    assert "gaps         none" in out and "time         receive times in order" in out


def test_a_bad_message_repaired_by_a_later_snapshot_says_how_much_was_skipped(tmp_path):
    """The book lost at a bad event comes back at the next snapshot: the summary says where it was
    lost, how many messages came meanwhile and the update id it resynced at; still exit 3."""
    lines = capture_head(HEAD)
    i = depth_line(lines)
    clean_prefix = tmp_path / "prefix.jsonl"
    j = depth_line(lines, after=400)  # a later depth event: a snapshot of the true book right after it
    clean_prefix.write_bytes(b"".join(lines[:j + 1]))
    book = build_book(clean_prefix, "BTCUSDT")
    t = orjson.loads(lines[j])["t"]
    snapshot = {"t": t, "k": "snapshot", "s": "BTCUSDT",
                "m": {"lastUpdateId": book["update_id"], "bids": book["bids"], "asks": book["asks"]}}
    rec = orjson.loads(lines[i])
    rec["m"]["data"]["b"].insert(0, ["61000.00000000", "NaN"])
    lines[i] = orjson.dumps(rec) + b"\n"
    lines.insert(j + 1, orjson.dumps(snapshot) + b"\n")
    capture = tmp_path / "repaired.jsonl"
    capture.write_bytes(b"".join(lines))
    proc, summary = backtest_json(capture, tmp_path / "x.db")
    assert proc.returncode == 3, proc.stderr
    [bad] = summary["bad_event_list"]
    assert bad["where"] == f"{capture}:{i + 1}" and bad["book_lost"] and bad["repaired"]
    assert bad["repaired_at_update_id"] >= book["update_id"]
    skipped = sum(1 for line in lines[i + 1:j + 2] if b'"k":"ws"' in line or b'"k":"snapshot"' in line)
    assert bad["skipped_messages"] == skipped, (bad, skipped)
    assert "resynced at update id" in proc.stderr


def test_a_bad_trade_is_named_and_counted_without_losing_the_book(tmp_path, clean):
    lines = capture_head(HEAD)
    i = next(k for k in range(depth_line(lines), len(lines)) if b"@trade" in lines[k])
    rec = orjson.loads(lines[i])
    rec["m"]["data"].update(p="NaN", q="-1")
    lines[i] = orjson.dumps(rec) + b"\n"
    capture = tmp_path / "trade.jsonl"
    capture.write_bytes(b"".join(lines))
    proc, summary = backtest_json(capture, tmp_path / "x.db")
    assert proc.returncode == 3, proc.stderr
    [bad] = summary["bad_event_list"]
    assert bad["where"] == f"{capture}:{i + 1}" and bad["reason"] == "bad_fields" and "'NaN'" in bad["detail"]
    assert not bad["book_lost"] and summary["skipped_messages"] == 0
    assert summary["strategy_stats"]["books"] == clean["strategy_stats"]["books"]


def test_receive_times_going_backwards_all_along_are_refused(tmp_path):
    out = []
    for j, line in enumerate(capture_head(HEAD)):
        rec = orjson.loads(line)
        rec["t"] = 2_000_000_000_000_000_000 - j * 1_000_000
        out.append(orjson.dumps(rec) + b"\n")
    capture = tmp_path / "backwards.jsonl"
    capture.write_bytes(b"".join(out))
    proc = qf("backtest", "--capture", capture, "--db", tmp_path / "x.db")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (f'qf backtest: {capture}:1-1001: receive times ("t") go backwards in 1000 of '
                                   f"1000 steps: not a capture in our format (records are written in the order "
                                   f"they were received)")
    assert not (tmp_path / "x.db").exists()


def test_a_receive_time_going_back_once_is_named_and_counted(tmp_path):
    lines = capture_head(HEAD)
    i = depth_line(lines, after=100)
    rec, before = orjson.loads(lines[i]), orjson.loads(lines[i - 1])
    rec["t"] = before["t"] - 5_000_000  # 5 ms before the record above it
    lines[i] = orjson.dumps(rec) + b"\n"
    capture = tmp_path / "back_once.jsonl"
    capture.write_bytes(b"".join(lines))
    proc, summary = backtest_json(capture, tmp_path / "x.db")
    assert proc.returncode == 3, proc.stderr
    assert summary["time_backwards"] == 1 and summary["bad_events"] == 0
    assert summary["time_backwards_first"].startswith(f"{capture}:{i + 1}: receive time \"t\" 5.000 ms before")
    first = summary["time_backwards_first"]
    assert proc.stderr.strip() == f"qf backtest: receive times go backwards 1 time (first: {first})"


@pytest.mark.parametrize("case", ["directory", "empty", "empty gz"])
def test_what_is_no_capture_file_is_refused_naming_it(tmp_path, case):
    if case == "directory":
        path, words = tmp_path / "adir", "is a directory, not a capture file"
        path.mkdir()
    elif case == "empty":
        path, words = tmp_path / "empty.jsonl", 'not a capture (no record with an integer receive time "t")'
        path.write_bytes(b"")
    else:
        path, words = tmp_path / "empty.jsonl.gz", 'not a capture (no record with an integer receive time "t")'
        path.write_bytes(gzip.compress(b""))
    proc = qf("backtest", "--capture", path, "--db", tmp_path / "x.db")
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"qf backtest: {path}: {words}"
