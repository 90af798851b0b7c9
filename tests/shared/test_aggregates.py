"""Per-symbol aggregates: the API's ledger over the same fills, tallies by hand, copy on write, rows stored whole."""
from __future__ import annotations

import sqlite3
from decimal import Decimal as D, localcontext

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.control.queries import positions_from
from shared import aggregates, journal
from shared.aggregates import DAY_NS, Aggregates, from_rows
from shared.db import (FILL_INSERT, JOURNAL_SQL, PNL_DAY_UPSERT, POSITION_COLS, POSITION_UPSERT, close_db,
                       database, init_db)
from shared.enums import Side
from shared.ledger import Position
from shared.money import MONEY

T0 = 19_900 * DAY_NS + DAY_NS - 3_600_000_000_000  # an hour before a UTC midnight
ASSETS = {"BTCUSDT": ("USDT", "BTC"), "ETHBTC": ("BTC", "ETH"), "NOQUOTE": ("", "")}


@st.composite
def fills(draw, max_size: int = 40) -> list[tuple]:
    """Fills as the fills table holds them (FILL_FIELDS, text): both sides, sizes that close part of a
    position, all of it or go through zero, fees in the quote, the base or another asset, slippage or
    none, times that cross midnights and sometimes step back."""
    out, ts = [], T0
    for _ in range(draw(st.integers(0, max_size))):
        symbol = draw(st.sampled_from(sorted(ASSETS)))
        quote, base = ASSETS[symbol]
        side = draw(st.sampled_from(["BUY", "SELL"]))
        qty = draw(st.sampled_from(["0.1", "0.25", "0.3", "1", "2.5", "0.00000001"]))
        price = str(D(draw(st.integers(1, 10**7))) / 100)
        fee = draw(st.sampled_from(["0", "0.001", "0.0000001", "0.25"]))
        fee_asset = draw(st.sampled_from(["", quote, base, "BNB"]))
        liquidity = draw(st.sampled_from(["MAKER", "TAKER"]))
        slip = draw(st.one_of(st.none(), st.sampled_from(["0", "0.01", "-0.5", "1.25"])))
        ts += draw(st.integers(-DAY_NS // 4, DAY_NS // 2))
        out.append((symbol, side, qty, price, fee, fee_asset, liquidity, ts, slip))
    return out


def by_hand(rows: list[tuple]) -> tuple[dict, dict]:
    """Per symbol and per (day, symbol), the tallies computed the long way, Position.apply by Position.apply."""
    syms: dict[str, dict] = {}
    days: dict[tuple[int, str], dict] = {}
    with localcontext(MONEY):
        for symbol, side, qty, price, fee, fee_asset, liquidity, ts, slip in rows:
            s = syms.setdefault(symbol, {"pos": Position(symbol), "trips": 0, "wins": 0, "gross_win": D(0),
                                         "gross_loss": D(0), "maker_fills": 0, "notional": D(0),
                                         "maker_notional": D(0), "slip_n": 0, "slip_sum": D(0), "slip_cost": D(0),
                                         "last_ts": None})
            d = days.setdefault((ts // DAY_NS, symbol), {"realized": D(0), "fees": D(0), "fills": 0, "trips": 0,
                                                         "wins": 0, "notional": D(0)})
            pos = s["pos"]
            realized, fees = pos.realized, pos.fees
            trip = pos.apply(Side(side), D(qty), D(price), D(fee), fee_asset)
            d["realized"] += pos.realized - realized
            d["fees"] += pos.fees - fees
            d["fills"] += 1
            d["notional"] += D(price) * D(qty)
            s["notional"] += D(price) * D(qty)
            if trip is not None:
                s["trips"] += 1
                d["trips"] += 1
                s["wins"] += trip > 0
                d["wins"] += trip > 0
                if trip > 0:
                    s["gross_win"] += trip
                if trip < 0:
                    s["gross_loss"] += trip
            if liquidity == "MAKER":
                s["maker_fills"] += 1
                s["maker_notional"] += D(price) * D(qty)
            if slip is not None:
                s["slip_n"] += 1
                s["slip_sum"] += D(slip)
                s["slip_cost"] += D(slip) * D(qty)
            s["last_ts"] = ts if s["last_ts"] is None else max(s["last_ts"], ts)
    return syms, days


@settings(max_examples=300, deadline=None)
@given(fills())
def test_the_aggregates_equal_the_api_ledger_and_the_tallies_by_hand(rows):
    aggs = from_rows(rows)
    ledger = positions_from((s, side, D(q), D(p), D(f), a) for s, side, q, p, f, a, *_ in rows)
    assert set(aggs.tallies) == set(ledger)
    syms, days = by_hand(rows)
    for symbol, want in ledger.items():
        got = aggs.position(symbol)
        for name in ("qty", "cost", "realized", "fees", "other_fees", "fills", "last_price", "trip_pnl"):
            assert getattr(got, name) == getattr(want, name), name
        t, hand = aggs.tallies[symbol], syms[symbol]
        for name in ("trips", "wins", "gross_win", "gross_loss", "maker_fills", "notional", "maker_notional",
                     "slip_n", "slip_sum", "slip_cost", "last_ts"):
            assert getattr(t, name) == hand[name], name
        assert t.gross_win >= 0 >= t.gross_loss and t.wins <= t.trips
        # the day rows add up to the position's totals
        held = t.days()
        assert list(held) == sorted(held)
        with localcontext(MONEY):
            assert sum(d.realized for d in held.values()) == want.realized
            assert sum(d.fees for d in held.values()) == want.fees
            assert sum(d.notional for d in held.values()) == t.notional
        assert sum(d.fills for d in held.values()) == want.fills
        assert sum(d.trips for d in held.values()) == t.trips and sum(d.wins for d in held.values()) == t.wins
    positions, day_rows = aggs.rows()
    assert {(r[0], r[1]): (D(r[2]), D(r[3]), *r[4:7], D(r[7])) for r in day_rows} == {
        k: (v["realized"], v["fees"], v["fills"], v["trips"], v["wins"], v["notional"]) for k, v in days.items()}
    assert [r[0] for r in positions] == sorted(syms)


@settings(max_examples=200, deadline=None)
@given(fills(), st.data())
def test_a_copy_shares_nothing_it_changes_and_its_upserts_are_what_changed(rows, data):
    cut = data.draw(st.integers(0, len(rows)))
    extra = data.draw(fills(max_size=3))
    original = from_rows(rows[:cut])
    held = original.rows()
    copy = original.copy()
    assert copy.rows() == held and copy.upserts() == []
    for row in rows[cut:]:
        copy.apply_row(row)
    assert original.rows() == held  # changing the copy left the original as it was
    for row in extra:  # and the original changed after the copy leaves the copy alone
        original.apply_row(row)
    assert original.rows() == from_rows(rows[:cut] + extra).rows()
    full = from_rows(rows)
    assert copy.rows() == full.rows()
    # the copy's statements: each row its fills touched, once, whole, as a fresh fold makes it
    want_days = {(r[7] // DAY_NS, r[0]) for r in rows[cut:]}
    stmts = copy.upserts()
    assert sorted(p for k, p in stmts if k == PNL_DAY_UPSERT) == sorted(full.day_row(*k) for k in want_days)
    assert sorted(p for k, p in stmts if k == POSITION_UPSERT) == sorted(
        full.position_row(s) for s in {s for _, s in want_days})
    # the fill objects' path and the text rows' path write the same text
    by_value = Aggregates()
    for symbol, side, qty, price, fee, fee_asset, liquidity, ts, slip in rows:
        by_value.apply(symbol, Side(side), D(qty), D(price), D(fee), fee_asset, liquidity,
                       None if slip is None else D(slip), ts)
    assert by_value.rows() == full.rows()


def test_a_round_trip_through_zero_counts_once_a_zero_trip_is_neither_win_nor_loss():
    aggs = Aggregates()
    aggs.apply("BTCUSDT", Side.BUY, D("1"), D("100"), D("0.1"), "USDT", "MAKER", D("0.5"), T0)
    trip = aggs.apply("BTCUSDT", Side.SELL, D("2"), D("110"), D("0.2"), "USDT", "TAKER", None, T0 + DAY_NS)
    assert trip == D("10") - D("0.1") - D("0.2")
    assert aggs.apply("BTCUSDT", Side.BUY, D("1"), D("110"), ts=T0 + DAY_NS) == D("0")
    t = aggs.tallies["BTCUSDT"]
    assert (t.trips, t.wins, t.gross_win, t.gross_loss) == (2, 1, D("9.7"), D("0"))
    assert (t.maker_fills, t.maker_notional, t.slip_n, t.slip_sum, t.slip_cost) == (1, D("100"), 1, D("0.5"),
                                                                                    D("0.5"))
    day = T0 // DAY_NS
    assert aggs.day_row(day, "BTCUSDT") == (day, "BTCUSDT", "0", "0.1", 1, 0, 0, "100")
    assert aggs.day_row(day + 1, "BTCUSDT") == (day + 1, "BTCUSDT", "10", "0.2", 2, 2, 1, "330")
    row = dict(zip(POSITION_COLS, aggs.position_row("BTCUSDT")))
    assert (row["qty"], row["cost"], row["other_fees"], row["last_price"], row["last_ts"]) == (
        "0", "0", "{}", "110", T0 + DAY_NS)
    aggs.apply("ETHBTC", Side.BUY, D("1"), D("0.05"), D("0.001"), "BNB", ts=T0)
    assert dict(zip(POSITION_COLS, aggs.position_row("ETHBTC")))["other_fees"] == '{"BNB":"0.001"}'
    with pytest.raises(KeyError):
        aggs.day_row(day + 5, "BTCUSDT")


# -- the database --------------------------------------------------------------------------

@pytest.fixture
def db(tmp_path):
    path = str(tmp_path / "agg.db")
    init_db(path)
    try:
        yield path
    finally:
        close_db()


def _fill_params(i: int, row: tuple) -> tuple:
    symbol, side, qty, price, fee, fee_asset, liquidity, ts, slip = row
    return (f"f{i}", f"o{i}", f"c{i}", symbol, side, price, qty, fee, fee_asset, liquidity, ts // 10**6, ts,
            None, None, None, None, slip, 0)


def _tables(path: str) -> tuple[list, list]:
    con = sqlite3.connect(path)
    try:
        return (con.execute("SELECT * FROM positions ORDER BY symbol").fetchall(),
                con.execute("SELECT * FROM pnl_days ORDER BY symbol, day").fetchall())
    finally:
        con.close()


ROWS = [("BTCUSDT", "BUY", "1", "100", "0.1", "USDT", "TAKER", T0, "0.05"),
        ("ETHBTC", "BUY", "2", "0.05", "0.001", "BNB", "MAKER", T0 + 1, None),
        ("BTCUSDT", "SELL", "0.4", "104", "0.04", "USDT", "MAKER", T0 + DAY_NS // 2, None),
        ("BTCUSDT", "SELL", "1", "90", "0.0009", "BTC", "TAKER", T0 + DAY_NS, "-0.2"),
        ("ETHBTC", "SELL", "2", "0.06", "0.00012", "BTC", "TAKER", T0 + 2 * DAY_NS, "0")]


def test_rebuild_recomputes_both_tables_from_the_fills_and_load_reads_them_back(db):
    assert aggregates.disagreement() is None  # empty and empty agree
    journal.write([(FILL_INSERT, _fill_params(i, r)) for i, r in enumerate(ROWS)])
    assert aggregates.disagreement() == {"fills": 5, "position_fills": 0, "day_fills": 0, "position_symbols": 0}
    built = aggregates.rebuild()
    assert built.rows() == from_rows(ROWS).rows()
    assert aggregates.disagreement() is None
    positions, days = _tables(db)
    assert (positions, days) == built.rows()
    loaded = aggregates.load()
    assert loaded.rows() == built.rows()
    # going on from the loaded tallies (past days included) is going on from the fold
    more = ("BTCUSDT", "BUY", "0.6", "95", "0.06", "USDT", "TAKER", T0 - DAY_NS, "0.1")  # a day before all
    loaded.apply_row(more)
    assert loaded.rows() == from_rows([*ROWS, more]).rows()
    # a row lost from either table is a disagreement
    database.execute_sql('DELETE FROM "pnl_days" WHERE "day" = ?', [T0 // DAY_NS])
    assert aggregates.disagreement()["day_fills"] == 3
    aggregates.rebuild()
    assert _tables(db) == (positions, days)
    # a symbol's row under another name: the counts add up, the symbol sets do not
    database.execute_sql('UPDATE "positions" SET "symbol" = ? WHERE "symbol" = ?', ["ETHUSDT", "ETHBTC"])
    database.execute_sql('UPDATE "pnl_days" SET "symbol" = ? WHERE "symbol" = ?', ["ETHUSDT", "ETHBTC"])
    assert aggregates.disagreement() == {"fills": 5, "position_fills": 5, "day_fills": 5, "position_symbols": 2,
                                         "symbols": 2}
    aggregates.rebuild()
    assert _tables(db) == (positions, days)


def test_the_upserts_store_absolute_values_twice_is_once(db):
    aggs = from_rows(ROWS[:3]).copy()
    for row in ROWS[3:]:
        aggs.apply_row(row)
    journal.write([(FILL_INSERT, _fill_params(i, r)) for i, r in enumerate(ROWS)])
    aggregates.rebuild()
    stored = _tables(db)
    journal.write(aggs.upserts())  # the same record's rows again
    journal.write(aggs.upserts())
    assert _tables(db) == stored
    database.execute_sql('DELETE FROM "positions"')
    database.execute_sql('DELETE FROM "pnl_days"')
    journal.write(from_rows(ROWS).copy().upserts())  # nothing changed since the copy: nothing to write
    assert _tables(db) == ([], [])


def test_a_rebuild_whose_fills_change_while_it_reads_starts_over(db, monkeypatch):
    journal.write([(FILL_INSERT, _fill_params(i, r)) for i, r in enumerate(ROWS[:4])])
    calls = []
    real = aggregates.from_rows

    def racing(rows):
        out = real(rows)
        calls.append(len(out.tallies))
        if len(calls) == 1:  # another writer adds a fill after the read, before the write
            con = sqlite3.connect(db)
            con.execute(JOURNAL_SQL[FILL_INSERT], _fill_params(4, ROWS[4]))
            con.commit()
            con.close()
        return out
    monkeypatch.setattr(aggregates, "from_rows", racing)
    built = aggregates.rebuild()
    assert len(calls) == 2 and built.rows() == real(ROWS).rows() and _tables(db) == built.rows()
    assert aggregates.disagreement() is None
