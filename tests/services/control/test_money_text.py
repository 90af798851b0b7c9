"""The pages' money text (queries.money_text, and its inline copy in queries._page) is what
render_decimal makes of the Decimal stored, for every value DecimalText can store."""
from __future__ import annotations

from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from services.control import queries
from services.control.queries import money_text, render_decimal
from shared.db import FillRow, init_db


@given(st.decimals(allow_nan=False, allow_infinity=False, min_value=Decimal("-1e12"), max_value=Decimal("1e12")))
def test_money_text_is_render_decimal(value):
    assert money_text(format(value, "f")) == render_decimal(value)  # as DecimalText stores it (shared/db.py)


def test_a_page_renders_every_money_column_as_render_decimal(tmp_path):
    db = init_db(str(tmp_path / "qf.db"))
    prices = ["61837.63000000", "100", "0.00000001", "-0.000", "12.50"]
    with db.bind_ctx([FillRow]):
        for n, p in enumerate(prices):
            FillRow.create(fill_id=f"f{n}", order_id="o", client_order_id="c", symbol="BTCUSDT", side="BUY",
                           price=Decimal(p), qty=Decimal("0.0010"), fee=Decimal("-0.00"), fee_asset="USDT",
                           liquidity="TAKER", exch_ts=n, ts=n, slippage_arrival=Decimal("-0.0500"))
    rows, cursor = queries.trades_page(limit=10)
    db.close()
    assert cursor is None
    assert [r["price"] for r in rows] == [render_decimal(Decimal(p)) for p in reversed(prices)]
    assert {(r["qty"], r["fee"], r["slippage_arrival"], r["mid_at_fill"]) for r in rows} == {("0.001", "0", "-0.05", None)}
