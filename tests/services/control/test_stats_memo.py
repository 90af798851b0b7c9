"""/stats' equity figures (Sharpe from hourly closes, max drawdown): by hand on a small curve, and
over all time (queries.AllTimeEquity, advanced by the rows added since its last answer) equal to
the SQL over the same rows, to the bit, however the rows arrive: in order, late (a clock stepped
back), with equal timestamps, pruned or rewritten underneath it."""
from __future__ import annotations

import math
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.control import queries
from shared.db import EquitySnapshot, close_db, init_db

H = queries.HOUR_NS
EVERYTHING = (-2**63, 2**63 - 1)  # an explicit range: the SQL path, over every row


@pytest.fixture
def db(tmp_path):
    database = init_db(str(tmp_path / "qf.db"))
    yield database
    close_db()


def add(db, rows) -> None:
    with db.bind_ctx([EquitySnapshot]):
        EquitySnapshot.insert_many([{"ts": ts, "equity": Decimal(eq), "cash": Decimal(0)} for ts, eq in rows]).execute()


def all_time() -> dict:
    return queries._equity_curve(None, None)


def test_by_hand(db):
    queries._ALL_TIME.__init__()
    # hour 0 closes at 110 (its newest row), hour 1 at 99, hour 2 at 108.9; the peak 120 falls to 90
    add(db, [(0, "100"), (10, "120"), (H - 1, "110"), (H, "90"), (H + 5, "99"), (2 * H, "108.9")])
    closes = [110.0, 99.0, 108.9]
    returns = [99 / 110 - 1, 108.9 / 99 - 1]
    mean = sum(returns) / 2
    sd = math.sqrt(sum((r - mean) ** 2 for r in returns))
    expected = {"hourly_closes": 3, "sharpe": mean / sd * math.sqrt(8760), "max_drawdown": 30.0,
                "max_drawdown_pct": 25.0}
    assert all_time() == expected == queries._equity_curve(*EVERYTHING)
    assert len(closes) == expected["hourly_closes"]


def test_equal_timestamps_close_on_the_newest_row(db):
    queries._ALL_TIME.__init__()
    add(db, [(5, "100"), (H + 7, "50"), (H + 7, "70"), (2 * H, "80")])
    assert all_time()["hourly_closes"] == 3
    assert all_time() == queries._equity_curve(*EVERYTHING)
    assert all_time()["sharpe"] == queries._curve_figures([100.0, 70.0, 80.0], 50.0, 0.5)["sharpe"]


def test_an_empty_table_and_one_row(db):
    queries._ALL_TIME.__init__()
    assert all_time() == {"hourly_closes": 0, "sharpe": None, "max_drawdown": 0.0, "max_drawdown_pct": 0.0}
    add(db, [(1, "10000")])
    assert all_time() == {"hourly_closes": 1, "sharpe": None, "max_drawdown": 0.0, "max_drawdown_pct": 0.0}


ROWS = st.lists(st.tuples(st.integers(-3 * H, 30 * H), st.decimals(min_value=Decimal("-1000"), max_value=Decimal("100000"),
                                                                   places=4, allow_nan=False)),
                min_size=0, max_size=25)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=st.lists(st.tuples(ROWS, st.sampled_from(["append", "prune", "rewrite", "none"])), min_size=1,
                        max_size=6))
def test_all_time_equals_the_sql_however_the_rows_arrive(db, batches):
    queries._ALL_TIME.__init__()
    with db.bind_ctx([EquitySnapshot]):
        EquitySnapshot.delete().execute()
    for rows, change in batches:
        add(db, [(ts, str(eq)) for ts, eq in rows])
        if change == "prune":  # the oldest rows deleted (a retention job)
            db.execute_sql('DELETE FROM "equity" WHERE "id" IN (SELECT "id" FROM "equity" ORDER BY "id" LIMIT 2)')
        elif change == "rewrite":  # a row changed underneath
            db.execute_sql('UPDATE "equity" SET "equity" = "equity" || \'1\' WHERE "id" = (SELECT MAX("id") FROM "equity")')
        assert all_time() == queries._equity_curve(*EVERYTHING)


def test_only_the_new_rows_are_read(db):
    """After an answer, the rows it read are not read again: a row changed in the middle since
    (which the broker never does) changes the SQL's figures, not the kept ones; a new row does."""
    queries._ALL_TIME.__init__()
    add(db, [(n * 60_000_000_000, str(10_000 + n % 7)) for n in range(500)])
    first = all_time()
    db.execute_sql('UPDATE "equity" SET "equity" = \'1\' WHERE "id" = 250')
    assert queries._equity_curve(*EVERYTHING) != first  # what reading every row again would give
    assert all_time() == first
    add(db, [(500 * 60_000_000_000, "9000")])
    after = all_time()
    assert after != first and after["max_drawdown"] == 10_006 - 9000


def test_a_pruned_oldest_row_that_was_neither_first_nor_last_by_time_is_noticed(db):
    queries._ALL_TIME.__init__()
    add(db, [(5 * H, "100"), (7 * H, "50"), (0, "10"), (9 * H, "40")])  # id 1: the peak, mid-curve
    before = all_time()
    assert before["max_drawdown"] == 60.0
    db.execute_sql('DELETE FROM "equity" WHERE "id" = 1')
    after = all_time()
    assert after == queries._equity_curve(*EVERYTHING) != before
    assert after["max_drawdown"] == 10.0
