"""The whole pipeline as real OS processes with QF_DB on a real PostgreSQL server: tests/test_e2e.py's replay, unchanged."""
from __future__ import annotations

import pytest

from tests import pg
from tests.test_e2e import replay_through_every_service

pytestmark = pytest.mark.e2e


def test_replay_flows_through_every_service_on_postgresql(tmp_path, pg_url):
    """Broker (journal stored into PostgreSQL), risk (rebuilt from it), strategy (its signals), the
    API (read-only sessions) on one database server; every assertion of tests/test_e2e.py holds."""
    replay_through_every_service(tmp_path, "tcp", QF_DB=pg_url)
    # every service stopped: what the broker told is stored, each fill once, each with its order
    fills = pg.rows(pg_url, 'SELECT "fill_id", "order_id" FROM "fills"')
    orders = {o for (o,) in pg.rows(pg_url, 'SELECT "order_id" FROM "orders"')}
    assert fills and len({f for f, _ in fills}) == len(fills) and {o for _, o in fills} <= orders
    positions = pg.rows(pg_url, 'SELECT "symbol", "fills" FROM "positions"')
    assert positions == [("BTCUSDT", len(fills))]  # the aggregates kept in the same transactions
    assert pg.rows(pg_url, 'SELECT "seq" FROM "journal_applied"')[0][0] > 0
    assert pg.rows(pg_url, 'SELECT COUNT(*) FROM "sessions" WHERE "service" = %s', ("broker",))[0][0] == 1
