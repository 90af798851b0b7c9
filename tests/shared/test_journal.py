"""The broker's journal: records made durable by one write, stored into SQLite exactly once, a crash's leftovers recovered."""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys

import pytest

from shared import journal
from shared.db import EQUITY_INSERT, ORDER_INSERT, close_db, init_db
from shared.journal import HEADER, Journal, JournalBusy, JournalError, journal_path, read, recover
from tests.conftest import ROOT, clean_environ, tcp_env


def equity(ts: int) -> list:
    return [(EQUITY_INSERT, (ts, "100.5", "100.5", f"note-{ts}"))]


@pytest.fixture()
def db(tmp_path):
    path = str(tmp_path / "qf.db")
    init_db(path)
    yield path
    close_db()


def rows(path: str) -> list[tuple]:
    con = sqlite3.connect(path)
    try:
        return con.execute("SELECT ts, equity, note FROM equity ORDER BY id").fetchall()
    finally:
        con.close()


def test_records_read_back_in_order_and_a_second_opener_is_refused(tmp_path):
    path = str(tmp_path / "j")
    j = Journal(path)
    assert [j.append(equity(ts)) for ts in (1, 2, 3)] == [1, 2, 3]
    with pytest.raises(JournalBusy):
        Journal(path)  # a second broker on the same database
    records, size = read(path)
    assert [seq for seq, _ in records] == [1, 2, 3] and size == os.path.getsize(path)
    assert records[1][1] == [[EQUITY_INSERT, [2, "100.5", "100.5", "note-2"]]]
    j.close()
    again = Journal(path)  # the lock went with the first
    assert [seq for seq, _ in again.pending] == [1, 2, 3] and again.seq == 3
    again.close()


def test_a_torn_last_record_is_dropped_and_appends_follow_whole_records(tmp_path):
    path = str(tmp_path / "j")
    j = Journal(path)
    j.append(equity(1))
    j.append(equity(2))
    j.close()
    whole = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(whole - 3)  # the second write cut short by a crash (never answered)
    j = Journal(path)
    assert [seq for seq, _ in j.pending] == [1] and os.path.getsize(path) < whole - 3
    j.append(equity(3))
    j.close()
    assert [seq for seq, _ in read(path)[0]] == [1, 2]  # seq 2 again: the torn one was never told


def test_a_damaged_record_with_good_ones_after_it_is_an_error_not_a_silent_loss(tmp_path):
    path = str(tmp_path / "j")
    j = Journal(path)
    for ts in (1, 2, 3):
        j.append(equity(ts))
    j.close()
    first, _ = read(path)
    with open(path, "r+b") as f:
        f.seek(HEADER.size + 2)  # inside the first record's body
        f.write(b"\xff")
    with pytest.raises(JournalError, match="damaged record at byte 0"):
        read(path)
    assert len(first) == 3


def test_stored_records_are_applied_once_even_when_the_file_outlived_the_commit(db, tmp_path):
    path = str(tmp_path / "j")
    j = Journal(path)
    for ts in (1, 2):
        j.append(equity(ts))
    assert journal.store(j.pending) == 2 and journal.applied_seq() == 2
    j.close()  # died before emptying the file: both records are still in it
    j = Journal(path)
    j.skip_applied(journal.applied_seq())
    assert j.pending == [] and os.path.getsize(path) == 0 and j.seq == 2
    j.append(equity(3))  # numbering goes on from the database's
    j.applied(journal.store(j.pending))
    assert rows(db) == [(1, "100.5", "note-1"), (2, "100.5", "note-2"), (3, "100.5", "note-3")]
    assert os.path.getsize(path) == 0
    j.close()


def test_a_failing_statement_stores_nothing_of_the_batch(db, tmp_path):
    j = Journal(str(tmp_path / "j"))
    j.append(equity(1))
    j.append([(ORDER_INSERT, ("o",) * 3)])  # wrong arity: the database refuses it
    with pytest.raises(sqlite3.Error):
        journal.store(j.pending)
    assert rows(db) == [] and journal.applied_seq() == 0 and len(j.pending) == 2
    j.close()


def test_recover_stores_what_a_killed_writer_left_and_waits_for_a_live_one(db, tmp_path):
    path = str(tmp_path / "j")
    # a writer process appends two records and dies without storing them (SIGKILL: no goodbye)
    code = ("import os, signal, sys; from shared.journal import Journal; from shared.db import EQUITY_INSERT\n"
            f"j = Journal({path!r})\n"
            "for ts in (7, 8): j.append([(EQUITY_INSERT, (ts, '1', '1', 'x'))])\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                          timeout=30)
    assert proc.returncode == -9 and len(read(path)[0]) == 2
    assert recover(path) == {"journal": "recovered", "journal_records": 2}
    assert rows(db) == [(7, "1", "x"), (8, "1", "x")] and os.path.getsize(path) == 0
    assert recover(path) == {"journal": "recovered", "journal_records": 0}
    live = Journal(path)  # a running broker holding records it has not stored yet
    live.append(equity(9))
    assert recover(path, wait_s=0.05) == {"journal": "held", "journal_waiting": os.path.getsize(path)}
    live.applied(journal.store(live.pending))
    assert recover(path, wait_s=0.05) == {"journal": "held", "journal_waiting": 0}
    live.close()


def test_the_broker_refuses_to_start_on_a_damaged_journal(tmp_path):
    settings = tcp_env(tmp_path)
    path = journal_path(settings["QF_DB"], settings["QF_RUN_DIR"])
    j = Journal(path)
    for ts in (1, 2):
        j.append(equity(ts))
    j.close()
    with open(path, "r+b") as f:
        f.seek(HEADER.size + 1)
        f.write(b"\xff")
    proc = subprocess.run([sys.executable, "-m", "services.cli", "broker"], cwd=ROOT, capture_output=True, text=True,
                          env={**clean_environ(), **settings, "PYTHONPATH": ROOT}, timeout=60)
    # a file only a person can fix: one line, status 2 (which `qf up` does not restart), no traceback
    assert proc.returncode == 2 and "damaged record at byte 0" in proc.stderr, proc.stderr[-500:]
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr + proc.stdout
