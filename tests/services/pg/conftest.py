"""Fixtures for the PostgreSQL tests: one real server for the session (tests/pg.py), a fresh database per test."""
from __future__ import annotations

import pytest

from tests import pg


@pytest.fixture(scope="session")
def pg_server():
    """A running PgServer (Debian's PostgreSQL in a temporary directory, on a free port), started
    once for the session and stopped at its end. Skips, saying why, without the server binaries."""
    if pg.bin_dir() is None:
        pytest.skip(f"PostgreSQL server binaries not found ({pg.BIN_GLOB}/initdb): `make sysdeps` installs "
                    "Debian's postgresql")
    server = pg.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url(pg_server):
    """The URL of a new, empty database on the session's server (postgresql://qf:PASSWORD@127.0.0.1:PORT/NAME),
    owned by the role `qf`; dropped after the test."""
    url = pg_server.create_database()
    try:
        yield url
    finally:
        pg_server.drop_database(url)
