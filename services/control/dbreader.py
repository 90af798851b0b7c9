"""The API's read-only handle on the database: never creates it, notices it gone or replaced.

The broker owns the database file; the API only reads it. Opening it the way
the writers do (`init_db`) created an empty file and its directory when none was
there, and `/health` then said 200 over nothing. A connection also keeps the
file it opened: deleted or swapped for a restored copy, the API went on serving
the old inode with 200. So the file is opened `mode=ro` (SQLite refuses to
create it; WAL readers never block the broker's writes), and before each
request the path's `stat` (about 1 µs) is compared with the file the
connection was opened on: gone → 503 until it is back; another file (st_dev,
st_ino) → reopened on it; the same file with another mtime or size → reopened
too, quietly: a WAL reader trusts its page cache while the WAL index says
nothing changed, so a file rewritten in place (a restore by `cp`) was served
from the old pages with 200. A broker checkpoint also changes the mtime; the
reopen it causes costs ~0.2 ms. A failed query drops the connection as well,
so a database server that restarts is reconnected by the next request."""
from __future__ import annotations

import logging
import os
from urllib.parse import quote

import peewee as pw
from playhouse.db_url import parse as parse_url

from shared.db import PG_SCHEMES, database, open_url, schema_problem
from shared.errors import TransientError
from shared.storage import busy

log = logging.getLogger("qf.api")

READ_PRAGMAS = {"busy_timeout": 5000}  # journal_mode is the broker's to set: a read-only connection cannot


class DatabaseUnavailable(TransientError):
    """The database cannot be read now (`code`: db_missing, db_unreadable, db_unavailable).
    Handled by the API's views: 503 with `code` and `message`; the next request tries again."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def sqlite_file(target: str) -> tuple[str, dict] | None:
    """`(absolute path, extra connect parameters)` when `target` (QF_DB) is a SQLite file —
    a path or a `sqlite:///path` URL — else None (a database server, e.g. postgresql://…)."""
    if "://" not in target:
        return os.path.abspath(target), {}
    if not target.split("://", 1)[0].startswith("sqlite"):
        return None
    params = parse_url(target)
    path = params.pop("database", "") or ""
    return (os.path.abspath(path), params) if path and path != ":memory:" else None


# A PostgreSQL session of the API's: read-only (as SQLite's mode=ro: the API never writes), and each
# transaction one snapshot (as a SQLite read transaction: a page of several queries, e.g.
# `summary`, reads one state of the database; read-only snapshots never fail to serialise)
SERVER_READ_OPTIONS = "-c default_transaction_read_only=on -c default_transaction_isolation=repeatable\\ read"


def server_read_params(target: str) -> dict:
    """The driver parameters of the API's read-only session on the server `target` names (its own
    `options`, if the URL has any, kept after ours)."""
    if target.split("://", 1)[0] not in PG_SCHEMES:
        return {}
    own = parse_url(target).get("options")
    return {"options": SERVER_READ_OPTIONS + (f" {own}" if own else "")}


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _stamp(st: os.stat_result) -> tuple[int, int]:
    return st.st_mtime_ns, st.st_size


class ReadOnlyDatabase:
    """The database QF_DB names, opened lazily once per process (gunicorn forks its workers,
    and a SQLite connection must never cross a fork) and re-checked by `ensure()` per request."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.file = sqlite_file(target)
        self.db: pw.Database | None = None
        self.pid: int | None = None
        self.identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the open file
        self.stamp: tuple[int, int] | None = None  # its (st_mtime_ns, st_size) when opened
        self.missing = False  # logged once per outage, not once per request
        self.generation = 0  # counts the connections opened: part of `version()`
        self.schema: tuple | None = None  # (file identity, schema_version) last found complete

    def ensure(self) -> pw.Database:
        """Bind the models to a connection on the database as it is now and return it.

        Raises DatabaseUnavailable: `db_missing` when the file does not exist (it is never
        created here), `db_unreadable` when it is not a database this process can read,
        `db_unavailable` when a database server cannot be reached."""
        if self.pid != os.getpid():
            self.db = None  # the parent's connection, if any, stays the parent's: never closed here
            self.pid = os.getpid()
        if self.file is None:
            self._ensure_server()
        else:
            self._ensure_file()
        if database.obj is not self.db:
            database.initialize(self.db)  # another app in this process (tests) rebound the models
        return self.db

    def version(self) -> tuple[int, int] | None:
        """A token that changes whenever the data this process reads may have: the connection's
        generation and SQLite's data_version (changed by every other connection's commit). None
        when there is no such cheap token (a database server, or no connection yet)."""
        if self.file is None or self.db is None:
            return None
        return self.generation, self.db.execute_sql("PRAGMA data_version").fetchone()[0]

    def close(self) -> None:
        """Close this process's connection, if open; the next `ensure()` opens a fresh one.
        Call it after a query failed: the connection may be what is wrong."""
        if self.db is not None and self.pid == os.getpid():
            try:
                self.db.close()
            except pw.PeeweeException:  # a transaction left open by the failure: dropped with it
                pass
        self.db, self.identity, self.stamp = None, None, None

    # -- a SQLite file ------------------------------------------------------------------

    def _ensure_file(self) -> None:
        path, params = self.file
        try:
            st = os.stat(path)
        except FileNotFoundError:
            self._gone("db_missing", "the database file does not exist (the broker creates it)")
        except OSError as exc:
            self._gone("db_unreadable", f"the database file cannot be read ({exc.strerror})")
        if self.db is not None and _identity(st) != self.identity:
            log.warning("db_replaced", extra={"path": path})
            self.close()
        elif self.db is not None and _stamp(st) != self.stamp:
            self.close()  # written since it was opened: by a checkpoint, or rewritten in place
        if self.db is None:
            self._open(path, params, st)

    def _gone(self, code: str, message: str):
        if self.db is not None or not self.missing:
            log.warning("db_gone", extra={"path": self.file[0], "code": code, "detail": message})
        self.close()
        self.missing = True
        raise DatabaseUnavailable(code, message) from None

    def _open(self, path: str, params: dict, st: os.stat_result) -> None:
        uri = "file:" + quote(path) + "?mode=ro"  # mode=ro: SQLite never creates the file
        db = pw.SqliteDatabase(uri, uri=True, pragmas=READ_PRAGMAS, check_same_thread=False, **params)
        try:
            db.connect()
            db.execute_sql("SELECT count(*) FROM sqlite_master").fetchall()  # reads the header now
            # the tables and columns (~0.2 ms), checked again only when the schema may have changed:
            # another file, or this one's schema_version moved (every CREATE, ALTER or DROP moves it)
            schema = (_identity(st), db.execute_sql("PRAGMA schema_version").fetchone()[0])
            lacking = None if schema == self.schema else schema_problem(db)
            now = os.stat(path)
        except FileNotFoundError:
            db.close()
            self._gone("db_missing", "the database file does not exist (the broker creates it)")
        except Exception as exc:  # sqlite3, peewee and OS errors alike: this file cannot be read
            db.close()
            if busy(exc):  # another connection holds it (an exclusive lock, a long write): not a bad file
                self._gone("db_unavailable", f"the database is locked by another connection ({str(exc)[:80]})")
            self._gone("db_unreadable", f"the database file cannot be read as SQLite ({str(exc)[:80]})")
        if lacking:
            db.close()
            self._gone("db_unavailable", "it is not a QuantumFlow database, or the broker has not set it "
                       f"up yet ({lacking})")
        if _identity(now) != _identity(st):  # swapped while opening: the next request opens the new one
            db.close()
            raise DatabaseUnavailable("db_unavailable", "the database file was replaced while being opened")
        self.db, self.identity, self.stamp, self.schema = db, _identity(st), _stamp(now), schema
        self.generation += 1
        if self.missing:
            log.warning("db_back", extra={"path": path})
        else:
            log.info("db_opened", extra={"path": path})
        self.missing = False

    # -- a database server ----------------------------------------------------------------

    def _ensure_server(self) -> None:
        if self.db is not None:
            return
        try:
            db = open_url(self.target, **server_read_params(self.target))
            db.connect(reuse_if_open=True)
            lacking = schema_problem(db)
        except Exception as exc:  # no driver, no server, refused login: all "unavailable now"
            if not self.missing:  # once per outage; log lines mask the URL's password
                log.warning("db_open_failed", extra={"target": self.target, "detail": str(exc)})
            self.missing = True
            raise DatabaseUnavailable("db_unavailable", "the database cannot be reached") from None
        if lacking:
            db.close()
            if not self.missing:
                log.warning("db_open_failed", extra={"target": self.target, "detail": lacking})
            self.missing = True
            raise DatabaseUnavailable("db_unavailable", "it is not a QuantumFlow database, or the "
                                      f"broker has not set it up yet ({lacking})")
        self.db = db
        if self.missing:
            log.warning("db_back", extra={"target": self.target})
        self.missing = False
