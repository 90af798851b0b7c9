"""StorePolicy: when the journal's records go into SQLite; Journal.oldest, the age it is judged by."""
from __future__ import annotations

import time

from shared.journal import Journal
from shared.journal_policy import STORE_AGE_S, STORE_IDLE_MS, STORE_RECORDS, StorePolicy


def test_nothing_pending_is_never_due():
    assert not StorePolicy().due(0, 0.0, 100.0, idle=True)


def test_records_are_stored_after_an_idle_turn_when_enough_wait_or_when_the_oldest_is_old():
    p = StorePolicy()
    assert (p.idle_ms, p.records, p.age_s) == (STORE_IDLE_MS, STORE_RECORDS, STORE_AGE_S) == (1, 8, 0.01)
    assert not p.due(1, 10.0, 10.005)  # one fresh record on a busy loop: it waits
    assert p.due(1, 10.0, 10.005, idle=True)
    assert p.due(8, 10.0, 10.0)
    assert not p.due(7, 10.0, 10.0)
    assert p.due(1, 10.0, 10.02)


def test_the_loop_sleeps_one_idle_turn_while_records_wait():
    p = StorePolicy(idle_ms=3)
    assert p.wait_ms(0, 100) == 100 and p.wait_ms(5, 100) == 3


def test_the_journal_keeps_when_its_oldest_pending_record_was_appended(tmp_path):
    path = str(tmp_path / "j")
    j = Journal(path)
    try:
        before = time.monotonic()
        j.append([])
        first = j.oldest
        assert before <= first <= time.monotonic()
        j.append([])
        assert j.oldest == first  # the second record does not make the batch younger
        j.applied(j.seq)
        j.append([])
        assert j.oldest > first
    finally:
        j.close()
    j = Journal(path)  # records an earlier process left: due at once
    try:
        assert j.pending and j.oldest == 0.0
    finally:
        j.close()
