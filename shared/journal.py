"""The broker's journal: order changes made durable by one write() before anyone is told, written into SQLite after.

Why: a SQLite transaction for one filled order touches ten B-trees and appends ten pages to the
WAL (~140 µs on the broker's path, ~270 µs at p99, after the core slept between orders); one
append to a file costs a few µs. Both survive a kill -9 (SQLite's WAL at synchronous=NORMAL does
not fsync either: the kernel holds the data), neither survives power loss.

A record is `<length u32><crc32 u32><seq u64>` and a msgpack body: a list of `[kind, params]`
statements (kinds in `shared.db.JOURNAL_SQL`), applied in order in one transaction that also
stores the record's `seq` (table `journal_applied`), so a record is applied exactly once even if
the process dies between that commit and the file's reset. Whoever holds the file's lock (flock)
owns it: the broker while it runs; after a crash, the next process that opens the journal
applies what is left (the broker at start, or risk rebuilding its state first).

With QF_DB on a database server (postgresql://…) the journal lives in QF_RUN_DIR (there is no
file to keep it beside), and storing a batch of records is one round trip and one commit, which
waits for the server's fsync (synchronous_commit on): ~1–3 ms on this machine's disk, paid in
the broker's loop between answers (bench/broker.py `broker_durable_fills_per_s_pg`).
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
import struct
import time
import zlib
from typing import Iterable

import msgpack
import peewee as pw

from shared.db import JOURNAL_SQL, PG_JOURNAL_LOCK, JournalApplied, database, journal_sql
from shared import storage
from shared.errors import JournalBusy, StorageError  # JournalBusy: importable from here too

log = logging.getLogger("qf.journal")

HEADER = struct.Struct("<IIQ")  # body length, crc32 of the body, seq


class JournalError(StorageError):
    """The journal cannot be read back: a damaged record with good ones after it. Nothing may
    start on it (acknowledged fills are in it): the file needs a person (exit status 2)."""


def journal_path(db: str, run_dir: str) -> str:
    """Where the journal of database `db` lives: beside a SQLite file (same volume), else in `run_dir`."""
    if "://" in db:
        return os.path.join(run_dir, "broker.journal")
    return db + ".broker-journal"


def read(path: str) -> tuple[list[tuple[int, list]], int]:
    """Every whole record of the file at `path` as (seq, statements), and the byte length they
    take. A torn last record (a write cut short by a crash, never acknowledged) is left out;
    a damaged record followed by more data raises JournalError."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return [], 0
    out, pos = [], 0
    while pos < len(data):
        if pos + HEADER.size > len(data):
            break  # torn header
        length, crc, seq = HEADER.unpack_from(data, pos)
        end = pos + HEADER.size + length
        body = data[pos + HEADER.size:end]
        if end > len(data):
            break  # torn: the write was cut short (a length field gone bad lands here too)
        if zlib.crc32(body) != crc:
            if end == len(data):
                break  # the last record, damaged before its write finished: never acknowledged
            raise JournalError(f"{path}: damaged record at byte {pos} (seq {seq}) with {len(data) - end} "
                               "bytes after it")
        out.append((seq, msgpack.unpackb(body, raw=False, use_list=True)))
        pos = end
    if pos < len(data):
        log.warning("journal_torn_tail", extra={"path": path, "bytes": len(data) - pos})
    return out, pos


class Journal:
    """The open journal, locked for this process: `append` makes a record durable, `pending`
    holds what is not yet in SQLite (`oldest`: when the first of it was appended), `applied(seq)`
    forgets up to `seq` and empties the file once nothing is pending. `Journal(path)` raises
    JournalBusy when another process holds it, or still holds it after `wait_s`: risk holds it
    for the milliseconds its start-up recovery takes (`recover`), so a broker starting beside
    it waits that out rather than give up."""

    def __init__(self, path: str, wait_s: float = 0.0) -> None:
        self.path = path
        storage.ensure_dir(os.path.dirname(os.path.abspath(path)))
        if os.path.isdir(path):
            raise StorageError(f"cannot use {path} as the broker journal: it is a directory")
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        except OSError as exc:  # a read-only volume, a directory the process may not write
            raise storage.cannot("write", path, exc) from None
        deadline, told = time.monotonic() + wait_s, False
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(self.fd)
                    raise JournalBusy(f"{path} is held by another process (a running broker)") from None
                if not told:
                    log.info("journal_busy_waiting", extra={"path": path, "wait_s": wait_s})
                    told = True
                time.sleep(0.01)  # polling a lock another process holds for milliseconds
        try:
            records, size = read(path)
            if size < os.fstat(self.fd).st_size:
                os.ftruncate(self.fd, size)  # the torn tail goes: appends must follow whole records
        except BaseException:
            os.close(self.fd)
            raise
        self.size = size
        self.pending: list[tuple[int, list]] = records
        # monotonic time the oldest pending record was appended (StorePolicy's age); 0.0 for
        # records an earlier process left: due at once
        self.oldest = 0.0
        self.seq = records[-1][0] if records else 0

    def append(self, statements: list) -> int:
        """Write one record of `statements`; returns its seq once the kernel holds it. Raises
        OSError, e.g. ENOSPC on a full disk (the file is cut back to its previous length: no
        partial record stays, and nothing of this record is pending)."""
        seq = self.seq + 1
        body = msgpack.packb(statements, use_bin_type=True)
        record = HEADER.pack(len(body), zlib.crc32(body), seq) + body
        try:
            written = os.write(self.fd, record)
            if written != len(record):
                raise OSError(f"short write to {self.path}: {written} of {len(record)} bytes")
        except BaseException:
            try:
                os.ftruncate(self.fd, self.size)
            except OSError:
                log.exception("journal_truncate_failed")
            raise
        self.size += len(record)
        self.seq = seq
        if not self.pending:
            self.oldest = time.monotonic()
        self.pending.append((seq, statements))
        return seq

    def skip_applied(self, applied_seq: int) -> None:
        """Drop pending records with seq ≤ `applied_seq` (stored by an earlier process that died
        before emptying the file); a seq counter behind the database's catches up."""
        self.pending = [r for r in self.pending if r[0] > applied_seq]
        self.seq = max(self.seq, applied_seq)
        if not self.pending:
            self._reset()

    def applied(self, seq: int) -> None:
        """Records up to `seq` are in SQLite: forget them, and empty the file when none is left."""
        self.pending = [r for r in self.pending if r[0] > seq]
        if not self.pending:
            self._reset()

    def catch_up(self) -> int:
        """Store into the bound database what an earlier holder left unstored (records it stored
        but did not forget are skipped); returns how many records that was. Raises like `store`.
        On PostgreSQL the newest stored seq is read and the rest stored in one transaction holding
        the journal's lock (PG_JOURNAL_LOCK), so a store a killed broker had sent, which the server
        may still be running, is either waited for or fails behind this one, never applied twice."""
        with _under_journal_lock():
            self.skip_applied(applied_seq())
            left = len(self.pending)
            seq = store(self.pending)  # on PostgreSQL inside the transaction: statement by statement
        if left:
            self.applied(seq)
        return left

    def _reset(self) -> None:
        if self.size:
            os.ftruncate(self.fd, 0)
            self.size = 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # releases the lock
            self.fd = -1


def statements_of(records: Iterable[tuple[int, list]]) -> list:
    """All statements of `records`, in order."""
    return [s for _, body in records for s in body]


def applied_seq() -> int:
    """The newest record seq stored in the bound database (0: none)."""
    row = JournalApplied.get_or_none(JournalApplied.id == 1)
    return row.seq if row is not None else 0


def store(records: list[tuple[int, list]]) -> int:
    """Apply `records` to the bound database in ONE transaction, with the newest seq; returns
    that seq (0 for none). Raises peewee or sqlite3 errors (nothing stored)."""
    if not records:
        return 0
    seq = records[-1][0]
    write(statements_of(records), seq)
    return seq


_MARK = ('INSERT INTO "journal_applied" ("id", "seq") VALUES (1, {p}) '
         'ON CONFLICT ("id") DO UPDATE SET "seq" = excluded."seq"')


def write(statements: list, seq: int | None = None) -> None:
    """Execute journal `statements` in ONE transaction on the bound database, storing `seq` as
    the newest applied record when given. Raises peewee or sqlite3 errors (nothing written).
    SQLite: a raw BEGIN IMMEDIATE/COMMIT. A server (PostgreSQL through psycopg2): one message
    of all the statements, one round trip; through another driver: one statement at a time."""
    if isinstance(database.obj, pw.SqliteDatabase):
        # the raw cursor, BEGIN/COMMIT by hand: peewee's wrappers cost more than the statements
        con: sqlite3.Connection = database.connection()
        cur = con.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            for kind, params in statements:
                cur.execute(JOURNAL_SQL[kind], params)
            if seq is not None:
                cur.execute(_MARK.format(p="?"), (seq,))
            cur.execute("COMMIT")
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise
        return
    param = database.obj.param
    sql = _server_sql(param)
    cur = database.cursor()
    if hasattr(cur, "mogrify") and not database.in_transaction():
        # psycopg2 on a database server: the statements with their values bound by the driver, sent
        # as ONE message, which PostgreSQL runs as one implicit transaction (all or nothing) — one
        # round trip and one commit per record batch instead of one round trip per statement
        with _DRIVER_ERRORS:  # the driver's errors as peewee's, like every other statement's
            parts = [_JOURNAL_LOCK] + [cur.mogrify(sql[kind], params) for kind, params in statements]
            if seq is not None:
                parts.append(cur.mogrify(sql[_MARK_KIND], (seq,)))
            if len(parts) > 1:
                cur.execute(b";\n".join(parts))
        return
    with database.atomic(), _under_journal_lock():
        for kind, params in statements:
            database.execute_sql(sql[kind], list(params))
        if seq is not None:
            database.execute_sql(sql[_MARK_KIND], [seq])


_JOURNAL_LOCK = f"SELECT pg_advisory_xact_lock({PG_JOURNAL_LOCK})".encode()  # see shared/db.py


@contextlib.contextmanager
def _under_journal_lock():
    """On PostgreSQL, a transaction holding PG_JOURNAL_LOCK (joining one already open); elsewhere
    nothing: SQLite's writers are serialised by BEGIN IMMEDIATE, and a dead process has no
    transaction still running."""
    if not isinstance(database.obj, pw.PostgresqlDatabase):
        yield
        return
    with database.atomic():
        database.execute_sql(_JOURNAL_LOCK.decode())
        yield
_DRIVER_ERRORS = getattr(pw, "__exception_wrapper__")  # peewee's driver-error translator (a module global)
_MARK_KIND = -1  # the journal_applied upsert, beside the statement kinds in `_server_sql`
_SERVER_SQL: dict[str, dict[int, str]] = {}


def _server_sql(param: str) -> dict[int, str]:
    """journal_sql(param) with the journal_applied upsert under _MARK_KIND, built once per placeholder."""
    sql = _SERVER_SQL.get(param)
    if sql is None:
        sql = _SERVER_SQL[param] = {**journal_sql(param), _MARK_KIND: _MARK.format(p=param)}
    return sql


def recover(path: str, wait_s: float = 1.0) -> dict:
    """Make the database current with the journal at `path` before reading it: when no process
    holds the journal (its broker died), store what it left and empty it; when the broker runs,
    wait up to `wait_s` for it to store what it holds (it does within milliseconds). Needs the
    database bound. Returns what was done, for the caller's log line."""
    try:
        journal = Journal(path)
    except JournalBusy:
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not os.path.exists(path) or os.path.getsize(path) == 0:
                return {"journal": "held", "journal_waiting": 0}
            time.sleep(0.005)
        return {"journal": "held", "journal_waiting": os.path.getsize(path)}
    try:
        return {"journal": "recovered", "journal_records": journal.catch_up()}
    finally:
        journal.close()
