"""StoreKeeper: the broker's journal stored into SQLite, and its storage outages met (docs/fill-model.md, "Disk full").

When to store is `shared.journal_policy.StorePolicy`'s (generic); what an outage means is the
broker's: after a failed write it raises alert STORE_UNAVAILABLE once, keeps the records in the
journal, and probes the storage with a backoff (`services.broker.outage.StoreHealth`) until
the journal and the database take writes again. The desk refuses new orders meanwhile.

The database file deleted or replaced under the running broker (`rm qf.db*`, a copy restored over
it): the broker's connection keeps writing into the file it opened, which nobody will ever read
again, and would empty its journal after each store, so every fill would be gone with the process.
So once per FILE_CHECK_S (one os.stat, 3-5 µs here; ~0.2 µs a loop turn otherwise, never per
order) the loop compares the file at QF_DB with the one it opened (st_dev, st_ino); a difference
is an outage like a full disk's (alert STORE_UNAVAILABLE "the database file was deleted or
replaced", qf_broker_store_available 0, qf_broker_database_file_lost_total), during which nothing
is stored into the lost file and the journal keeps every record. Orders are still taken (they are
durable in the journal) unless the journal grows past JOURNAL_PENDING_MAX. The probe then puts
the broker's database back: its open connection still reads the lost file whole, so SQLite's
backup copies it (every fill stored so far) to a new file beside QF_DB, which is renamed into
place (a file someone put there is first renamed aside to `<QF_DB>.replaced-<time>-<pid>`, never
overwritten; -wal/-shm files of the lost one left at QF_DB, which this process holds open, are
removed); then the connection is reopened on it, the journal stored into it, and the outage
resolved. Nothing acknowledged is lost, provided the broker is not killed before that (the lost
file dies with its last connection); a failed copy (a full disk) is retried by the probe, and the
final store at close puts the file back the same way before it stores anything.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from decimal import Decimal
from typing import Callable

import peewee as pw

from services.broker import store
from services.broker.core import Account
from services.broker.outage import StoreHealth
from services.broker.telemetry import DB_FILE_LOST, FAILURES, STORE_AVAILABLE
from shared import journal, storage
from shared.db import database
from shared.alerts import Alerter
from shared.journal import Journal
from shared.journal_policy import StorePolicy

log = logging.getLogger("qf.broker")

# The alert's code, and the error code of a request refused meanwhile (services/broker/desk.py).
STORE_UNAVAILABLE = "STORE_UNAVAILABLE"
FILE_CHECK_S = 0.25  # how often the loop compares the file at QF_DB with the one its connection writes
FILE_LOST = "the database file was deleted or replaced"


def file_id(path: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the file at `path`; None when there is none."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _held_files() -> set[tuple[int, int]]:
    """(st_dev, st_ino) of every file this process holds open (Linux: /proc/self/fd; else none)."""
    out = set()
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return out
    for fd in fds:
        try:
            st = os.stat(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        out.add((st.st_dev, st.st_ino))
    return out


class StoreKeeper:
    """The broker's storage: `journal` (records durable, not yet in SQLite), the database `db`
    they go into, and `health` (the current outage, if any).

    The service loop calls `store(idle=...)` each turn and `store(force=True)` at close,
    `probe(reload)` when `health.probe_due`, `snapshot(...)` on each equity tick; the desk
    calls `outage(why, exc, frozen=True)` when the journal refused a record, and
    `refusal()` before it takes a new order during an outage."""

    def __init__(self, journal_: Journal, db: str, alerts: Alerter, stats: dict,
                 policy: StorePolicy | None = None, health: StoreHealth | None = None,
                 reopened: Callable[[], None] | None = None) -> None:
        self.journal, self.db, self.alerts, self.stats = journal_, db, alerts, stats
        self.policy = policy if policy is not None else StorePolicy()
        self.health = health if health is not None else StoreHealth()
        self.reopened = reopened  # called once the connection is on a restored file (the checkpointer's)
        # the file the loop's connection writes (`opened`); None: not watched (a database server)
        self.file: tuple[int, int] | None = None
        self.lost = False  # the file at QF_DB is not `file`: nothing is stored until it is put back
        self.next_file_check = 0.0
        for key in ("store_failures", "snapshot_failures", "db_file_lost"):
            stats.setdefault(key, 0)
        STORE_AVAILABLE.set(1)

    # -- the database file deleted or replaced (see the module's docstring) ------------------------

    def opened(self) -> None:
        """The loop's connection is open: note which file it writes (SQLite only)."""
        if isinstance(database.obj, pw.SqliteDatabase) and "://" not in self.db and ":memory:" not in self.db:
            self.file = file_id(self.db)

    def check_file(self, now: float) -> bool:
        """At most once per FILE_CHECK_S (monotonic `now`; the loop calls it every turn): whether
        the file at QF_DB is still the one the connection writes; when it is not, starts the
        outage. Returns False while the file is lost."""
        if self.file is None or self.lost:
            return not self.lost
        if now < self.next_file_check:
            return True
        self.next_file_check = now + FILE_CHECK_S
        return self._still_ours()

    def _still_ours(self) -> bool:
        """`check_file` without its rate: one os.stat."""
        if self.file is None or self.lost:
            return not self.lost
        try:
            here = file_id(self.db)
        except OSError:  # cannot tell (EACCES, EIO): the stores will say
            return True
        if here == self.file:
            return True
        self.lost = True
        DB_FILE_LOST.inc()
        self.stats["db_file_lost"] += 1
        what = "deleted" if here is None else "replaced by another file"
        self.outage(f"{FILE_LOST}: {self.db} was {what} under the running broker; its journal keeps "
                    f"every record and it puts its database back", None)
        return False

    def _put_back(self) -> str | None:
        """The lost database copied from the open connection to QF_DB (see the module's docstring)
        and the connection reopened on it: None when done, else why not (retried)."""
        path, tmp = self.db, self.db + ".restoring"
        aside = None
        if database.is_closed():  # a new connection would open whatever is at QF_DB now, not the lost file
            return f"{FILE_LOST}: cannot put {path} back: the broker's connection to it is closed"
        try:
            if os.path.exists(tmp):
                os.unlink(tmp)
            target = sqlite3.connect(tmp)
            try:
                database.connection().backup(target)
            finally:
                target.close()
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            # what is at QF_DB now: the lost file's own WAL and index (a `rm qf.db` that left them,
            # or a copy put over qf.db alone) are held open by this process and go (nothing of
            # them is lost: the copy has it all); anything else is someone's, kept under another name
            held = _held_files()
            stamp = f"{path}.replaced-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
            for suffix in ("", "-wal", "-shm"):
                here = file_id(path + suffix)
                if here is None:
                    continue
                if suffix and here in held:
                    os.unlink(path + suffix)
                else:
                    os.rename(path + suffix, stamp + suffix)
                    aside = stamp
            os.rename(tmp, path)
        except (OSError, sqlite3.Error, pw.PeeweeException) as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            return f"{FILE_LOST}: cannot put {path} back: {storage.problem(exc, path)}"
        database.close()  # the lost file goes with its last connection: everything of it is copied
        database.connect()
        self.file, self.lost = file_id(path), False
        if self.reopened is not None:
            try:
                self.reopened()
            except Exception:  # the checkpointer's connection: the stores that follow say more
                log.exception("database_reopen_failed")
        log.warning("database_restored", extra={"db": path, "moved_aside": aside,
                                                "journal_pending": len(self.journal.pending)})
        return None

    def store(self, force: bool = False, idle: bool = False) -> bool:
        """Store the journal's records into SQLite in one transaction when `force`d, or when the
        policy says so (during an outage only when forced: the probe's turn). Returns whether
        nothing is left unstored. A failure leaves the records in the journal and starts (or
        extends) an outage."""
        pending = self.journal.pending
        if not pending:
            return True
        if force and not self._still_ours():  # at close, say: never into a lost file, put it back first
            why = self._put_back()
            if why is not None:
                log.error("database_not_restored", extra={"why": why, "journal_pending": len(pending)})
                return False
        if not force and (self.health.down or not self.policy.due(len(pending), self.journal.oldest,
                                                                    time.monotonic(), idle)):
            return False
        try:
            self.journal.applied(journal.store(pending))
            return True
        except Exception as exc:
            FAILURES.inc()
            self.stats["store_failures"] += 1
            self.outage(f"cannot store the journal into {self.db}: {storage.problem(exc, self.db)}", exc)
            return False

    def wait_ms(self, longest_ms: int) -> int:
        """How long the loop may sleep for storage's sake: until the next probe during an outage
        (no idle store then), else as the policy says."""
        if self.health.down:
            return min(longest_ms, int(self.health.wait_s(time.monotonic()) * 1000) + 1)
        return self.policy.wait_ms(len(self.journal.pending), longest_ms)

    def refusal(self) -> str | None:
        """Why a new order is refused now (None: take it); see StoreHealth.refusal."""
        return self.health.refusal(len(self.journal.pending))

    def outage(self, why: str, exc: BaseException | None, frozen: bool = False) -> None:
        """A write failed: start an outage (logged with its traceback, alerted once) or note one
        more failure of the current one (counted by the alert; logged when it reminds).
        `frozen`: the journal itself refused a record (the desk stops its model)."""
        started = self.health.fail(why, time.monotonic(), frozen)
        if started:
            STORE_AVAILABLE.set(0)
            log.error("store_unavailable", exc_info=exc, extra={"why": why, "frozen": frozen,
                                                                 "journal_pending": len(self.journal.pending)})
        text = f"broker: {why}" + ("; new orders are refused until it can write" if self.health.frozen else "")
        if self.alerts.raise_(STORE_UNAVAILABLE, text) and not started:
            log.warning("store_still_unavailable", extra={"why": why, "down_s": round(self.health.down_s(
                time.monotonic()), 1), "journal_pending": len(self.journal.pending)})

    def probe(self, reload: Callable[[], None]) -> None:
        """Try the storage again: a lost database file put back (`_put_back`), room for a burst of
        writes beside the journal, a record through the journal into the database (stores what
        waits), and `reload()` (the desk's model rebuilt from the database) when frozen. Ends the
        outage when all of that worked (the alert resolved), else backs off."""
        why = self._put_back() if self.lost else None
        if why is None:
            room = storage.has_room(os.path.dirname(os.path.abspath(self.journal.path)))
            if room is not None:
                why = f"no room for writes beside {self.journal.path}: {storage.problem(room)}"
        if why is None:
            try:
                self.journal.append([])  # a record of nothing: the journal and the database take a write
            except OSError as exc:
                why = f"cannot write {self.journal.path}: {storage.problem(exc)}"
        if why is None:
            try:
                self.journal.applied(journal.store(self.journal.pending))
                if self.health.frozen:
                    reload()
            except Exception as exc:
                why = f"cannot store the journal into {self.db}: {storage.problem(exc, self.db)}"
        now = time.monotonic()
        if why is not None:
            self.health.probe_failed(why, now)
            self.outage(why, None)
            return
        lasted = self.health.recover(now)
        STORE_AVAILABLE.set(1)
        log.warning("store_recovered", extra={"down_s": round(lasted, 3), "probes": self.health.probes})
        self.alerts.resolve(STORE_UNAVAILABLE, "broker: the journal and the database take writes again; "
                                               "new orders are taken")

    def snapshot(self, ts: int, account: Account, marks: dict[str, Decimal]) -> None:
        """Write an equity snapshot; a failure is an outage like any write's."""
        try:
            store.snapshot(ts, account, marks)
        except Exception as exc:
            self.stats["snapshot_failures"] += 1
            self.outage(f"cannot write an equity snapshot into {self.db}: {storage.problem(exc, self.db)}", exc)

    def describe(self) -> dict:
        """The storage's part of the broker's heartbeat."""
        health = self.health
        return {"journal_pending": len(self.journal.pending),
                "store": ("frozen" if health.frozen else "unavailable") if health.down else "ok",
                "store_down_s": round(health.down_s(time.monotonic()), 3), "store_outages": health.outages}
