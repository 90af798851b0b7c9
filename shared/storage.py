"""The files a service writes, checked at start: a problem becomes one StorageError line naming the path.

A read-only volume, a missing directory that cannot be made, a path that is a directory:
each used to surface as a Python traceback from deep inside `os.open` or SQLite. Start-up
calls these instead, so `qf broker` says `cannot write /data/qf.db.broker-journal: read-only
file system` and exits with status 2 (shared.errors.StorageError).
"""
from __future__ import annotations

import os
import sqlite3
import tempfile

import peewee as pw

from shared.errors import StorageError

SPACE_CHECK_BYTES = 1 << 20  # what `has_room` writes: room for a burst of journal records and WAL pages
# ... but never more than this share of the file system: on a small one (a 1 MiB tmpfs holding the
# database) 1 MiB can never be free again, and a probe asking for it would keep an outage forever
SPACE_CHECK_SHARE = 16


_STORAGE_ERRORS = (OSError, sqlite3.Error, pw.PeeweeException)


def problem(exc: BaseException, path: str | None = None) -> str:
    """What went wrong, in a few lower-case words: `read-only file system`, `no space left
    on device`, `permission denied`, ... (an OSError's strerror; a SQLite error's message, with
    `read-only file system` when `path`'s file system is mounted read-only). The first storage
    error of a chain is the one told: a COMMIT that fails on a full disk makes peewee's
    rollback fail too ("cannot rollback - no transaction is active"), which says nothing."""
    for _ in range(8):
        inner = exc.__context__
        if not isinstance(inner, _STORAGE_ERRORS) or not isinstance(exc, _STORAGE_ERRORS):
            break
        exc = inner
    if isinstance(exc, OSError) and exc.errno is not None:
        return os.strerror(exc.errno).lower()
    if path is not None and read_only(path):
        return "read-only file system"
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]


def busy(exc: BaseException) -> bool:
    """Whether a SQLite error says another connection holds the file (`database is locked`,
    `database table is locked`, SQLITE_BUSY): unavailable now, not a bad file."""
    return isinstance(exc, (sqlite3.OperationalError, pw.OperationalError)) and "locked" in str(exc).lower()


def read_only(path: str) -> bool:
    """Whether the file system holding `path` (or its nearest existing parent) is mounted read-only."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    try:
        return bool(os.statvfs(probe).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def cannot(verb: str, path: str, exc: BaseException) -> StorageError:
    """`StorageError("cannot <verb> <path>: <problem>")`."""
    return StorageError(f"cannot {verb} {path}: {problem(exc, path)}")


def ensure_dir(path: str) -> None:
    """Make directory `path` (and its parents) unless it exists. Raises StorageError naming
    the path (read-only parent, permission, a file in the way)."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        return
    if os.path.exists(path):
        raise StorageError(f"cannot use {path} as a directory: it is a file")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise cannot("create directory", path, exc) from None


def ensure_writable_dir(path: str) -> None:
    """`ensure_dir(path)`, then create and remove a file in it: permission bits alone do not
    tell (root ignores them; a read-only mount does not). Raises StorageError naming the path."""
    ensure_dir(path)
    try:
        with tempfile.TemporaryFile(dir=path, prefix=".qf-write-check-"):
            pass
    except OSError as exc:
        raise cannot("write", os.path.abspath(path), exc) from None


def check_bytes(directory: str, nbytes: int = SPACE_CHECK_BYTES) -> int:
    """What `has_room` writes in `directory`: `nbytes`, at most 1/SPACE_CHECK_SHARE of its file
    system's size (at least one 4 KiB page)."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return nbytes
    total = st.f_blocks * st.f_frsize
    return nbytes if total <= 0 else max(4096, min(nbytes, total // SPACE_CHECK_SHARE))


def has_room(directory: str, nbytes: int | None = None) -> OSError | None:
    """Write `nbytes` (default `check_bytes(directory)`: 1 MiB, less on a small file system) to
    a scratch file in `directory` and remove it: None when that worked, else the OSError
    (ENOSPC, EROFS, EIO...). A free-space figure would not do: root may write into blocks
    reserved from others, and a file system can be full of inodes."""
    if nbytes is None:
        nbytes = check_bytes(directory)
    try:
        with tempfile.TemporaryFile(dir=directory, prefix=".qf-space-check-") as f:
            block = bytes(min(nbytes, 1 << 16))
            left = nbytes
            while left > 0:
                left -= f.write(block[:left])
            f.flush()  # the kernel taking the pages is the test (no fsync: the journal does not either)
    except OSError as exc:
        return exc
    return None

