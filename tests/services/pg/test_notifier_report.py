"""The notifier's daily report reads a PostgreSQL QF_DB with the services' own opener: the
server's password (it holds @ / : % ?, percent-escaped in the URL) logs in, and a URL it cannot
use is ReportUnavailable naming it without the password."""
from __future__ import annotations

from decimal import Decimal

import pytest

from services.notifier.report import ReportUnavailable, read_window
from shared.db import EquitySnapshot, FillRow, close_db, init_db

pytestmark = pytest.mark.e2e

TS = 1_723_161_298_056_851_584


def test_the_daily_report_reads_the_server_with_an_escaped_password(pg_server, pg_url):
    db = init_db(pg_url)
    try:
        with db.bind_ctx([FillRow, EquitySnapshot]):
            FillRow.create(fill_id="f1", order_id="o1", client_order_id="c1", symbol="BTCUSDT", side="BUY",
                           price=Decimal("61000.5"), qty=Decimal("0.001"), fee=Decimal("0.061"), fee_asset="USDT",
                           liquidity="TAKER", exch_ts=TS // 1_000_000, ts=TS)
            EquitySnapshot.create(ts=TS + 1, equity=Decimal("9999.9"), cash=Decimal("9938.9"))
    finally:
        close_db()
    window = read_window(pg_url, TS - 1, TS + 10)
    assert [(f.order_id, f.price, f.qty) for f in window.fills] == [("o1", Decimal("61000.5"), Decimal("0.001"))]
    assert window.equity == [(TS + 1, Decimal("9999.9"))]


def test_a_server_url_it_cannot_use_is_unavailable_without_the_password(pg_server):
    with pytest.raises(ReportUnavailable) as err:
        read_window(f"postgresql://qf:{pg_server.password}@127.0.0.1:1/", 0, 1)  # no database named
    assert pg_server.password not in str(err.value)
