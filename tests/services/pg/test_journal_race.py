"""A broker killed with its store's message sent leaves a transaction PostgreSQL still runs; the
next process's recovery must neither apply those records again nor fail on them (the kill -9 test
once failed on a duplicate key in `orders` this way)."""
from __future__ import annotations

import threading

import psycopg2

from shared.db import PG_JOURNAL_LOCK, close_db, init_db, journal_sql, parse_url
from shared.journal import Journal, recover

# an ORDER_INSERT (kind 0) of shared.db.ORDER_COLS
ORDER = ["o-1", "c-1", "race", "BTCUSDT", "BUY", "LIMIT", "GTC", "0.001", "61000", "PENDING", "0", None, "",
         1, 1, None, None, None]


def _connect(url: str):
    kwargs = parse_url(url, unquote_password=True, unquote_user=True)
    kwargs["dbname"] = kwargs.pop("database")
    return psycopg2.connect(**kwargs)


def test_recovery_waits_for_a_dead_brokers_store_still_running(tmp_path, pg_url):
    init_db(pg_url)  # the schema
    close_db()
    path = str(tmp_path / "broker.journal")
    journal = Journal(path)
    seq = journal.append([[0, ORDER]])
    journal.close()  # the broker is dead, its record unstored in its journal ...

    # ... and its store of that record on the server, running: its lock, its statements, its seq
    dead = _connect(pg_url)
    cur = dead.cursor()
    cur.execute(f"SELECT pg_advisory_xact_lock({PG_JOURNAL_LOCK})")
    cur.execute(journal_sql("%s")[0], ORDER)
    cur.execute('INSERT INTO "journal_applied" ("id", "seq") VALUES (1, %s) '
                'ON CONFLICT ("id") DO UPDATE SET "seq" = excluded."seq"', (seq,))

    done: dict = {}

    def recovering():
        init_db(pg_url, create=False)
        try:
            done.update(recover(path, wait_s=0))
        except Exception as exc:  # the duplicate key, if the race is back
            done["error"] = exc
        finally:
            close_db()
    thread = threading.Thread(target=recovering)
    thread.start()
    thread.join(1.0)
    assert thread.is_alive(), done  # recovery waits for the store that holds the journal's lock
    dead.commit()
    dead.close()
    thread.join(30)
    assert done == {"journal": "recovered", "journal_records": 0}, done  # nothing applied twice
    check = _connect(pg_url)
    try:
        with check.cursor() as c:
            c.execute('SELECT count(*) FROM "orders"')
            assert c.fetchone() == (1,)
    finally:
        check.close()
