"""The notifier's durable outbox: a message leaves it only once Telegram accepted it.

A small SQLite file of its own under QF_RUN_DIR (`notifier-outbox.sqlite`), not the
trading database: the notifier must not write where the broker commits fills, and the
API opens that one read-only. SQLite rather than a file of lines because a message is
taken out one at a time, in any chat's order, once its answer came: a row delete is one
small transaction, where a line file would be rewritten or compacted; the fan-out of one
message to every chat is one transaction too, a daily report's PNG goes along as a BLOB,
and WAL with synchronous=NORMAL keeps every committed row through a `kill -9` (only an
OS crash can lose the last ones). sqlite3 is the standard library's: nothing to add.

Delivery is at least once: a message Telegram accepted, but whose answer was lost (a
timeout, the notifier killed while waiting), is sent again after the restart. Nothing is
dropped but on a refusal no retry can fix (400, 403) or past MAX_PENDING rows (the oldest
go, and the log says how many). A small `kv` table keeps what the core and the report
schedule must remember across restarts."""
from __future__ import annotations

import json
import logging
import os
import sqlite3
from dataclasses import dataclass

from services.notifier.core import Outgoing
from services.notifier.ratelimit import Head
from shared import storage
from shared.errors import StorageError

log = logging.getLogger("qf.notifier")

FILE = "notifier-outbox.sqlite"
MAX_PENDING = 10_000  # a Telegram that refuses for days must not fill the disk

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    chat_id INTEGER NOT NULL,
    kind TEXT NOT NULL,
    text TEXT NOT NULL,
    photo BLOB,
    created_ns INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    not_before_ns INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS outbox_chat ON outbox (chat_id, id);
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True, slots=True)
class Pending:
    """One message waiting for one chat."""
    id: int
    chat_id: int
    kind: str
    text: str
    photo: bytes | None
    created_ns: int
    attempts: int


class Outbox:
    """`Outbox(run_dir)` opens (or creates) the file; raises StorageError when it cannot.
    One thread uses it (the service's loop)."""

    def __init__(self, run_dir: str) -> None:
        storage.ensure_writable_dir(run_dir)
        self.path = os.path.join(run_dir, FILE)
        try:
            # made where the service is built, used by the thread that runs it: one at a time
            self.db = sqlite3.connect(self.path, isolation_level=None, timeout=5, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(SCHEMA)
        except sqlite3.Error as exc:
            raise StorageError(f"notifier outbox {self.path}: {exc}") from None
        self.dropped = 0

    def add(self, chat_ids: tuple[int, ...], out: Outgoing, now: int) -> list[int]:
        """Queue `out` for each chat, in one transaction; returns the new row ids."""
        ids = []
        with self._tx():
            for chat in chat_ids:
                cur = self.db.execute("INSERT INTO outbox (chat_id, kind, text, photo, created_ns) VALUES (?,?,?,?,?)",
                                      (chat, out.kind, out.text, out.photo, now))
                ids.append(cur.lastrowid)
            over = self.pending() - MAX_PENDING
            if over > 0:
                self.db.execute("DELETE FROM outbox WHERE id IN (SELECT id FROM outbox ORDER BY id LIMIT ?)", (over,))
                self.dropped += over
                log.warning("outbox_full", extra={"dropped": over, "kept": MAX_PENDING})
        return ids

    def heads(self) -> list[Head[Pending]]:
        """The oldest message of each chat (messages to one chat keep their order)."""
        rows = self.db.execute(
            "SELECT o.id, o.chat_id, o.kind, o.text, o.photo, o.created_ns, o.attempts, o.not_before_ns "
            "FROM outbox o JOIN (SELECT MIN(id) AS id FROM outbox GROUP BY chat_id) h ON o.id = h.id").fetchall()
        return [Head(r[1], Pending(*r[:7]), r[7]) for r in rows]

    def done(self, row_id: int) -> None:
        """Telegram accepted it (or refused it for good): it leaves the outbox."""
        self.db.execute("DELETE FROM outbox WHERE id = ?", (row_id,))

    def failed(self, row_id: int, not_before_ns: int = 0) -> None:
        """An attempt failed; the message stays, not to be tried before `not_before_ns`."""
        self.db.execute("UPDATE outbox SET attempts = attempts + 1, not_before_ns = ? WHERE id = ?",
                        (not_before_ns, row_id))

    def retarget(self, old_chat: int, new_chat: int) -> None:
        """A group became a supergroup with a new id: its waiting messages go there."""
        self.db.execute("UPDATE outbox SET chat_id = ? WHERE chat_id = ?", (new_chat, old_chat))

    def pending(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]

    def get(self, key: str, default=None):
        row = self.db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def put(self, key: str, value) -> None:
        self.db.execute("INSERT INTO kv (key, value) VALUES (?, ?) "
                        "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, json.dumps(value)))

    def close(self) -> None:
        self.db.close()

    def _tx(self):
        return _Tx(self.db)


class _Tx:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb):
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
        return False
