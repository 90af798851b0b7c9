"""OrderBook and decimal parsing: examples, and hypothesis against brute-force rebuilds."""

import re
from contextlib import contextmanager
from decimal import Context, Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.marketdata import book as book_mod
from services.marketdata.book import (UNITS, BookMetrics, EmptyBookError, OrderBook, PyOrderBook,
                                      parse_units, units_to_str)

VALID = re.compile(r"-?[0-9]+(\.[0-9]{1,8})?")
EXACT = Context(prec=1000)  # the default 28 digits would round long strings


def decimal_units(s: str) -> int:
    return int(EXACT.multiply(Decimal(s), UNITS))


@contextmanager
def region(size: int, high: int):
    """Shrink the sorted top region so small test books exercise refill and trim."""
    old = book_mod._REGION, book_mod._REGION_MAX
    book_mod._REGION, book_mod._REGION_MAX = size, high
    try:
        yield
    finally:
        book_mod._REGION, book_mod._REGION_MAX = old


# -- parse_units / units_to_str ---------------------------------------------------------

@pytest.mark.parametrize("s, units", [
    ("61837.63000000", 6183763000000), ("0.001", 100000), ("5", 500000000), ("0", 0),
    ("0.00000000", 0), ("0.00000001", 1), ("569.567", 56956700000), ("-0.5", -50000000),
    ("007.10", 710000000), ("123456789012.12345678", 12345678901212345678),
])
def test_parse_units_examples(s, units):
    assert parse_units(s) == units
    assert parse_units(s) == units  # second call comes from the cache


@pytest.mark.parametrize("s", [
    "", "1e5", "1E-3", "nan", "NaN", "inf", "Infinity", "0.123456789", "1.000000000",
    " 1", "1 ", "1\n", "1_000", "+1", ".5", "5.", "-", "--1", "1.2.3", "1..00000000",
    "1.2.00000000", "\u0661", "\u0661.00000000", "\u00b2", "0x10", "1,5", "-.5",
])
def test_parse_units_rejects(s):
    with pytest.raises(ValueError):
        parse_units(s)


@pytest.mark.parametrize("bad", [None, 1, 1.5, b"1.0"])
def test_parse_units_rejects_non_strings(bad):
    with pytest.raises(ValueError):
        parse_units(bad)


@pytest.mark.parametrize("units, s", [
    (6183763000000, "61837.63"), (0, "0"), (1, "0.00000001"), (500000000, "5"),
    (-50000000, "-0.5"), (100000, "0.001"), (-1, "-0.00000001"),
])
def test_units_to_str_examples(units, s):
    assert units_to_str(units) == s


@given(st.integers(-10**20, 10**20))
def test_units_round_trip(u):
    s = units_to_str(u)
    assert parse_units(s) == u
    assert VALID.fullmatch(s)
    assert not s.endswith(".") and (("." not in s) or not s.endswith("0"))


@given(st.from_regex(VALID, fullmatch=True))
def test_parse_units_agrees_with_decimal(s):
    assert parse_units(s) == decimal_units(s)


@given(st.text(max_size=20))
def test_parse_units_accepts_exactly_the_grammar(s):
    if VALID.fullmatch(s) and s.isascii():
        assert parse_units(s) == decimal_units(s)
    else:
        with pytest.raises(ValueError):
            parse_units(s)


# -- OrderBook examples -----------------------------------------------------------------

def small_book() -> OrderBook:
    b = OrderBook("BTCUSDT")
    b.apply_snapshot(100, [["100.0", "1"], ["99.5", "2"], ["99", "0"]],
                     [["101", "3"], ["102.25", "1.5"]])
    return b


def test_snapshot_and_best():
    b = small_book()
    assert b.update_id == 100
    assert b.best_bid() == (100 * UNITS, 1 * UNITS)
    assert b.best_ask() == (101 * UNITS, 3 * UNITS)
    assert b.depth() == (2, 2)  # the zero-quantity level is not stored
    b.check()


def test_diff_adds_changes_and_removes_levels():
    b = small_book()
    # Spot lists bids high to low, futures low to high: order must not matter.
    b.apply_diff([["99.5", "0"], ["100.5", "0.25"], ["100", "4"]],
                 [["102.25", "0"], ["100.75", "1"], ["150", "0"]], 105)
    assert b.update_id == 105
    assert b.best_bid() == (10050000000, 25000000)
    assert b.best_ask() == (10075000000, UNITS)
    assert b.top(5) == ([(10050000000, 25000000), (10000000000, 4 * UNITS)],
                        [(10075000000, UNITS), (10100000000, 3 * UNITS)])
    assert b.levels() == ({10050000000: 25000000, 10000000000: 4 * UNITS},
                          {10075000000: UNITS, 10100000000: 3 * UNITS})
    b.check()


def test_removing_absent_level_is_silent():
    b = small_book()
    before = b.levels()
    b.apply_diff([["42", "0.00000000"]], [["4242", "0"]], 101)
    assert b.levels() == before and b.update_id == 101


def test_metrics_values():
    b = OrderBook("BTCUSDT")
    b.apply_snapshot(1, [["100", "1"], ["99", "3"]], [["101", "2"], ["103", "2"]])
    m = b.metrics(10)
    assert isinstance(m, BookMetrics)
    assert m.bids == [[100.0, 1.0], [99.0, 3.0]] and m.asks == [[101.0, 2.0], [103.0, 2.0]]
    assert m.mid == 100.5 and m.spread == 1.0
    assert m.spread_bps == pytest.approx(1.0 / 100.5 * 1e4)
    assert m.imbalance == 0.0
    assert m.microprice == pytest.approx((100 * 2 + 101 * 1) / 3)
    m1 = b.metrics(1)
    assert m1.bids == [[100.0, 1.0]] and m1.imbalance == pytest.approx((1 - 2) / 3)
    with pytest.raises(AttributeError):
        m.mid = 1.0  # frozen


def test_metrics_exact_float_prices():
    b = OrderBook("BTCUSDT")
    b.apply_snapshot(1, [["61837.63000000", "3.78826000"]], [["61837.64000000", "1.54698000"]])
    m = b.metrics(5)
    assert m.bids == [[61837.63, 3.78826]] and m.asks == [[61837.64, 1.54698]]
    assert m.spread == pytest.approx(0.01)


def test_metrics_needs_both_sides():
    b = OrderBook("BTCUSDT")
    with pytest.raises(EmptyBookError):
        b.metrics(10)
    b.apply_snapshot(1, [["100", "1"]], [])
    with pytest.raises(EmptyBookError):
        b.metrics(10)
    assert issubclass(EmptyBookError, ValueError)
    with pytest.raises(ValueError):
        small_book().metrics(0)


def test_empty_book_and_clear():
    b = OrderBook("ETHUSDT")
    assert b.best_bid() is None and b.best_ask() is None and b.top(3) == ([], [])
    assert b.update_id == 0
    b = small_book()
    b.clear()
    assert b.depth() == (0, 0) and b.update_id == 0 and b.best_ask() is None


@pytest.mark.parametrize("bids, asks", [
    ([["100", "-1"]], []), ([["abc", "1"]], []), ([], [["0", "1"]]), ([["1", "1", "1"]], []),
])
def test_bad_diff_raises(bids, asks):
    with pytest.raises(ValueError):
        small_book().apply_diff(bids, asks, 101)


def test_bad_snapshot_leaves_empty_book():
    b = small_book()
    with pytest.raises(ValueError, match="bad snapshot 7"):
        b.apply_snapshot(7, [["100", "1"]], [["1e3", "1"]])
    assert b.depth() == (0, 0) and b.update_id == 0


@pytest.mark.parametrize("book_type", [PyOrderBook, OrderBook])
def test_region_refills_when_top_is_eaten(book_type):
    """PyOrderBook's sorted region, shrunk: refills and trims stay exact (the C book, with its
    blocks, goes through the same moves)."""
    with region(2, 4):
        b = book_type("BTCUSDT")
        b.apply_snapshot(1, [[str(p), "1"] for p in range(90, 100)], [[str(p), "1"] for p in range(100, 110)])
        # Remove the best bids and asks one by one: the region must refill from the dict.
        for i, p in enumerate(range(99, 91, -1)):
            b.apply_diff([[str(p), "0"]], [[str(199 - p), "0"]], 2 + i)
            b.check()
            assert b.best_bid()[0] == (p - 1) * UNITS
            assert b.best_ask()[0] == (200 - p) * UNITS
        assert [p for p, _ in b.top(10)[0]] == [91 * UNITS, 90 * UNITS]
        # A new best far above, then many levels: the region trims and stays exact.
        b.apply_diff([[str(p), "2"] for p in range(200, 220)], [], 50)
        b.check()
        assert b.top(3)[0] == [(219 * UNITS, 2 * UNITS), (218 * UNITS, 2 * UNITS), (217 * UNITS, 2 * UNITS)]
        assert len(b.top(100)[0]) == 22


# -- properties ---------------------------------------------------------------------------

def _px(ticks: int) -> str:
    return units_to_str(ticks * 1_000_000)  # 0.01 ticks, like BTCUSDT


levels_st = st.lists(st.tuples(st.integers(1, 400), st.integers(0, 5_000)), max_size=60)


@settings(max_examples=150, deadline=None)
@given(snap_bids=levels_st, snap_asks=levels_st,
       diffs=st.lists(st.tuples(levels_st, levels_st), max_size=25),
       small=st.booleans(), n=st.integers(1, 30), book_type=st.sampled_from([OrderBook, PyOrderBook]))
def test_book_equals_brute_force_rebuild(snap_bids, snap_asks, diffs, small, n, book_type):
    size = (2, 5) if small else (64, 512)  # PyOrderBook's region; no effect on the C book
    with region(*size):
        b = book_type("BTCUSDT")
        b.apply_snapshot(10, [[_px(p), str(q)] for p, q in snap_bids],
                         [[_px(p), str(q)] for p, q in snap_asks])
        for uid, (db, da) in enumerate(diffs, 11):
            b.apply_diff([[_px(p), str(q)] for p, q in db], [[_px(p), str(q)] for p, q in da], uid)
            b.check()
        b.check()
        got_b, got_a = b.levels()
        want_b, want_a = _normalise(snap_bids, diffs, 0), _normalise(snap_asks, diffs, 1)
        assert got_b == want_b and got_a == want_a
        assert all(q > 0 for q in got_b.values()) and all(q > 0 for q in got_a.values())
        top_b, top_a = b.top(n)
        assert top_b == sorted(want_b.items(), reverse=True)[:n]
        assert top_a == sorted(want_a.items())[:n]
        assert b.best_bid() == (top_b[0] if top_b else None)
        assert b.best_ask() == (top_a[0] if top_a else None)
        assert b.depth() == (len(want_b), len(want_a))


def _normalise(snap, diffs, side):
    """Brute force: replay snapshot then diffs into a plain dict of units."""
    ref = {}
    for p, q in snap:
        ref[p * 1_000_000] = q * UNITS
    ref = {p: q for p, q in ref.items() if q}
    for d in diffs:
        for p, q in d[side]:
            if q:
                ref[p * 1_000_000] = q * UNITS
            else:
                ref.pop(p * 1_000_000, None)
    return ref


@settings(max_examples=150, deadline=None)
@given(mid=st.integers(1_000, 100_000),
       snap=st.tuples(levels_st, levels_st),
       diffs=st.lists(st.tuples(levels_st, levels_st), max_size=20),
       n=st.integers(1, 20))
def test_uncrossed_stream_gives_consistent_metrics(mid, snap, diffs, n):
    # Bids strictly below mid, asks strictly above: the stream never crosses.
    def bid(levels):
        return [[_px(mid - p), units_to_str(q * 1000)] for p, q in levels]

    def ask(levels):
        return [[_px(mid + p), units_to_str(q * 1000)] for p, q in levels]

    b = OrderBook("BTCUSDT")
    b.apply_snapshot(1, bid(snap[0]), ask(snap[1]))
    for uid, (db, da) in enumerate(diffs, 2):
        b.apply_diff(bid(db), ask(da), uid)
    bb, ba = b.best_bid(), b.best_ask()
    if bb is None or ba is None:
        with pytest.raises(EmptyBookError):
            b.metrics(n)
        return
    assert bb[0] < ba[0]
    m = b.metrics(n)
    assert m.bids[0][0] < m.asks[0][0]
    assert [p for p, _ in m.bids] == sorted((p for p, _ in m.bids), reverse=True)
    assert [p for p, _ in m.asks] == sorted(p for p, _ in m.asks)
    assert 1 <= len(m.bids) <= n and 1 <= len(m.asks) <= n
    assert m.spread > 0 and m.spread_bps > 0
    assert m.bids[0][0] < m.mid < m.asks[0][0]
    assert m.bids[0][0] <= m.microprice <= m.asks[0][0]
    assert -1.0 <= m.imbalance <= 1.0
    assert all(q > 0 for _, q in m.bids + m.asks)


# -- apply_diff's parser and level checks (both books) ------------------------------------

@pytest.mark.parametrize("bids, asks", [
    (["12"], []), ([{"100.00000000": 1, "1.00000000": 2}], []), ([["1.00000000"]], []),
    ([["1.00000000", "1.00000000", "1"]], []), ([[100, "1"]], []), ([["100.00000000", None]], []),
    ([[["100.00000000"], "1"]], []), ([["100.0000000a", "1"]], []), (None, []), ([], 5),
    ([], [["100.00000000", "1.0000000.0"]]), ([], [["1.000000000", "1"]]),
    ([], [["\u0661\u0660\u0660.00000000", "1"]]), ([["100.00000000", "-1.00000000"]], []),
    ([["0.00000000", "1.00000000"]], []), ([], [["-5", "1"]]),
])
def test_malformed_levels_raise_value_error(bids, asks):
    # Only ValueError (never TypeError/AttributeError): BookSync turns it into BadEventError.
    with pytest.raises(ValueError, match="BTCUSDT"):
        small_book().apply_diff(bids, asks, 101)


def test_tuples_and_other_zero_forms_are_accepted():
    b = small_book()
    b.apply_diff((("100.5", "2.000"),), [("101", "0.000"), ("102.25000000", "0")], 101)
    assert b.levels() == ({10050000000: 2 * UNITS, 10000000000: UNITS, 9950000000: 2 * UNITS}, {})


eight = st.builds(lambda w, f: f"{w}.{f}", st.text("0123456789\u0661.x", min_size=1, max_size=6),
                  st.text("0123456789\u0661.-", min_size=8, max_size=8))
any_str = st.one_of(eight, st.from_regex(VALID, fullmatch=True), st.text(max_size=12))


@settings(max_examples=300, deadline=None)
@given(p=any_str, q=any_str, side=st.sampled_from(["bids", "asks"]), book_type=st.sampled_from([OrderBook, PyOrderBook]))
def test_apply_diff_parses_exactly_like_parse_units(p, q, side, book_type):
    """Both books (C, and Python's through parse_units) accept and reject the strings
    parse_units does."""
    def units(s):
        try:
            return parse_units(s)
        except ValueError:
            return None
    pu, qu = units(p), units(q)
    b = book_type("BTCUSDT")
    args = ([[p, q]], []) if side == "bids" else ([], [[p, q]])
    if pu is None or qu is None or not 0 <= qu < 1 << 62 or not 0 < pu < 1 << 62:
        with pytest.raises(ValueError):
            b.apply_diff(*args, 7)
        return
    b.apply_diff(*args, 7)
    levels = b.levels()[0 if side == "bids" else 1]
    assert levels == ({pu: qu} if qu else {})
    b.check()
