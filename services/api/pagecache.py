"""Rendered history pages, kept while the database has not changed.

Two hundred clients polling `/api/v1/trades` mostly ask for the same few pages (the newest, and
the next ones by cursor). Reading a page costs ~0.5 ms of Python (1,800 cells out of SQLite,
rendered to JSON); sending a page already rendered costs next to nothing. A page is kept under
its full path and query string, with the database's version when it was read: SQLite's
`PRAGMA data_version` (it changes whenever another connection commits, so every broker commit
drops every page) and the connection's generation (a reopened file starts again). A page is
therefore never older than the newest commit the request could have seen.

Only answers that depend on nothing but the query string and the database are kept (not
/status, /pnl today or /equity's default range: they depend on the clock or the bus).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

from cachetools import LRUCache

MAX_BYTES = 16 * 2**20  # per gunicorn worker: ~350 pages of 100 fills


@dataclass(frozen=True, slots=True)
class Page:
    body: bytes
    content_type: str
    headers: tuple[tuple[str, str], ...]


class PageCache:
    """Pages by key, valid for one database version; LRU within MAX_BYTES."""

    def __init__(self, max_bytes: int = MAX_BYTES) -> None:
        self._pages: LRUCache[str, Page] = LRUCache(maxsize=max_bytes, getsizeof=lambda p: len(p.body) + 200)
        self._version: object = None
        self._lock = threading.Lock()  # sync workers are single-threaded; gthread would not be
        self.hits = self.misses = 0

    def get(self, key: str, version: object) -> Page | None:
        """The page kept under `key` if it was read at `version`, else None (and, for a new
        version, every page is dropped). `version` None: nothing is kept or served."""
        if version is None:
            return None
        with self._lock:
            if version != self._version:
                self._pages.clear()
                self._version = version
            page = self._pages.get(key)
            if page is None:
                self.misses += 1
            else:
                self.hits += 1
            return page

    def put(self, key: str, version: object, page: Page) -> None:
        """Keep `page`, read at `version` (taken before the read: a commit during the read makes
        the next request's version differ, so the page is never served past it)."""
        if version is None or len(page.body) + 200 > self._pages.maxsize:
            return
        with self._lock:
            if version == self._version:
                self._pages[key] = page
