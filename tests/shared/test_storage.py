"""storage.problem: the few words an operator reads, naming the first storage error of a chain."""
import errno
import sqlite3

import peewee as pw

from shared.storage import problem


def raised(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the test wants the exception object itself
        return exc
    raise AssertionError("nothing raised")


def test_a_commit_failing_on_a_full_disk_is_told_not_the_rollback_after_it():
    def commit_then_rollback():
        try:
            raise sqlite3.OperationalError("database or disk is full")
        except sqlite3.Error:
            raise pw.OperationalError("cannot rollback - no transaction is active")
    assert problem(raised(commit_then_rollback)) == "database or disk is full"


def test_an_os_error_is_its_strerror():
    assert problem(OSError(errno.ENOSPC, "x")) == "no space left on device"


def test_an_error_handled_while_something_else_failed_is_not_blamed():
    def unrelated():
        try:
            raise KeyError("not a storage error")
        except KeyError:
            raise sqlite3.OperationalError("disk I/O error")
    assert problem(raised(unrelated)) == "disk I/O error"
