"""shared/db.py, shared/journal.py and shared/aggregates.py on a real PostgreSQL server: schema, journal, errors, reconnects."""
from __future__ import annotations

import subprocess
import sys
from decimal import Decimal

import peewee as pw
import pytest

from shared import aggregates, journal
from shared.db import (FILL_INSERT, JOURNAL_SQL, ORDER_INSERT, SIGNAL_INSERT, ServerDatabase, close_db, database,
                       init_db, open_url, where)
from shared.errors import ConfigError, StorageError
from tests import pg
from tests.conftest import ROOT, clean_environ, free_port

pytestmark = pytest.mark.e2e

TS = 1_723_161_298_056_851_584  # ns: BigInteger columns hold them


def _order(n: int) -> tuple:
    return (f"o{n}", f"c{n}", "s", "BTCUSDT", "BUY", "MARKET", "IOC", "0.001", None, "FILLED", "0.001", "61000.5", "",
            TS + n, TS + n, TS + n, "61000.1", "61000.2")


def _fill(n: int, order: int | None = None) -> tuple:
    order = n if order is None else order
    return (f"f{n}", f"o{order}", f"c{order}", "BTCUSDT", "BUY", "61000.5", "0.001", "0.0610005", "USDT", "TAKER",
            TS // 10**6 + n, TS + n, "61000.1", "61000.1", "61000.2", "0.4", "0.3", 1234)


@pytest.fixture
def db(pg_url):
    yield init_db(pg_url)
    close_db()


def test_the_schema_on_the_server_keeps_ns_times_exact_money_and_8_byte_floats(db, pg_url):
    types = dict(pg.rows(pg_url, "SELECT table_name || '.' || column_name, data_type FROM information_schema.columns "
                                 "WHERE table_schema = 'public'"))
    assert types["fills.ts"] == types["orders.created_ts"] == types["equity.ts"] == "bigint"
    assert types["fills.price"] == types["positions.realized"] == "text"  # exact decimal text, as on SQLite
    assert types["signals.confidence"] == types["signals.score"] == "double precision"  # not peewee's 4-byte REAL
    init_db(pg_url)  # a second start finds everything there
    assert isinstance(db, ServerDatabase)


def test_journal_records_are_stored_once_all_or_nothing(db, pg_url):
    journal.write([(ORDER_INSERT, _order(1)), (FILL_INSERT, _fill(1)),
                   (SIGNAL_INSERT, (TS, "BTCUSDT", "BUY", 0.1234567890123, float("nan"), "{}", 7, TS, "c1", "entry"))],
                  seq=1)
    assert journal.applied_seq() == 1
    assert pg.rows(pg_url, 'SELECT "ts", "price", "queue_wait_ns" FROM "fills"') == [(TS + 1, "61000.5", 1234)]
    assert pg.rows(pg_url, 'SELECT "confidence" FROM "signals"') == [(0.1234567890123,)]
    # a batch with a statement the server refuses (a fill stored twice) leaves nothing of it, seq included
    with pytest.raises(pw.IntegrityError):
        journal.write([(ORDER_INSERT, _order(2)), (FILL_INSERT, _fill(2)), (FILL_INSERT, _fill(1))], seq=2)
    assert journal.applied_seq() == 1 and pg.rows(pg_url, 'SELECT COUNT(*) FROM "orders"') == [(1,)]
    journal.write([(ORDER_INSERT, _order(2)), (FILL_INSERT, _fill(2))], seq=2)  # the connection still works
    assert journal.applied_seq() == 2 and set(JOURNAL_SQL) <= set(journal._server_sql("%s"))


def test_aggregates_rebuild_and_agree_on_the_server(db):
    journal.write([s for n in range(1, 6) for s in ((ORDER_INSERT, _order(n)), (FILL_INSERT, _fill(n)))])
    assert aggregates.disagreement() is not None  # written without their rows: the broker's start rebuilds
    aggs = aggregates.rebuild()
    assert aggregates.disagreement() is None
    assert aggregates.load().tallies.keys() == aggs.tallies.keys() == {"BTCUSDT"}
    rows = database.execute_sql('SELECT "qty", "fills" FROM "positions"').fetchall()
    assert rows == [("0.005", 5)] and Decimal(rows[0][0]) == Decimal("0.005")


def test_a_restarted_server_is_reconnected_at_the_next_statement(db, pg_server):
    journal.write([(ORDER_INSERT, _order(1))], seq=1)
    pg_server.restart()  # every connection closed by the server
    with pytest.raises(pw.OperationalError):
        journal.applied_seq()  # the one statement that finds the connection dead fails...
    assert journal.applied_seq() == 1  # ...the next connects afresh
    journal.write([(FILL_INSERT, _fill(1))], seq=2)
    assert journal.applied_seq() == 2


def test_two_processes_creating_the_schema_at_once_both_start(pg_url):
    """Broker and risk start together on an empty database: PostgreSQL's CREATE TABLE IF NOT
    EXISTS races without the schema lock (a duplicate key on its catalog)."""
    code = f"from shared.db import init_db; init_db({pg_url!r}); print('ok')"
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=clean_environ(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs) and [o for o, _ in outs] == ["ok\n"] * 4, outs


def test_a_refused_login_is_one_line_without_the_password(pg_server, pg_url):
    wrong = pg_url.replace(pg.quote(pg_server.password, safe=""), "not-the-Pa55word")
    with pytest.raises(StorageError) as info:
        init_db(wrong)
    text = str(info.value)
    name = pg_url.rsplit("/", 1)[1]
    assert text == (f"cannot use the database postgresql://qf@127.0.0.1:{pg_server.port}/{name}: connection to server "
                    f"at \"127.0.0.1\", port {pg_server.port} failed: FATAL:  password authentication failed for "
                    "user \"qf\"")
    with pytest.raises(StorageError, match='database "nope" does not exist'):
        init_db(pg_url.rsplit("/", 1)[0] + "/nope")
    close_db()


def test_a_server_that_does_not_answer_is_a_passing_error_and_a_bad_url_a_config_error():
    with pytest.raises(pw.OperationalError, match="Connection refused"):  # qf up restarts the service
        init_db(f"postgresql://qf:Sekr3t@127.0.0.1:{free_port()}/qf")
    close_db()
    with pytest.raises(ConfigError) as info:
        open_url("postgresql://qf:Sekr3t@127.0.0.1:notaport/qf")
    assert "Sekr3t" not in str(info.value)
    with pytest.raises(ConfigError, match="names no database"):
        open_url("postgresql://qf:Sekr3t@db.example")
    assert where("postgresql://qf:Sekr3t@db.example:5433/qf?sslmode=require") == "postgresql://qf@db.example:5433/qf"
    assert where("/data/quantumflow.db") == "/data/quantumflow.db"
