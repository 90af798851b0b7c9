"""The C book and depth-frame scanner (_cbook.c) against the pure-Python reference and orjson.

The C OrderBook must agree with PyOrderBook level for level, and its metrics bit for bit, after
any sequence of snapshots and diffs, valid or not (the same ValueError at the same point, the same
partial state). parse_depth_frame must give exactly what orjson gives, or None: never accept a
frame orjson refuses, never produce a different event."""

import random
import tracemalloc

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.marketdata import _cbook
from services.marketdata.book import (EmptyBookError, Levels, OrderBook, PyOrderBook, parse_depth_frame,
                                      parse_units)
from services.marketdata.sync import BookSync, Market, SyncResult


def units_or_none(s):
    try:
        return parse_units(s)
    except ValueError:
        return None


def same_books(c: OrderBook, py: PyOrderBook, n: int = 12) -> None:
    c.check()
    py.check()
    assert c.levels() == py.levels()
    assert c.depth() == py.depth() and c.update_id == py.update_id
    assert c.best_bid() == py.best_bid() and c.best_ask() == py.best_ask()
    assert c.top(n) == py.top(n)
    try:
        mp = py.metrics(n)
    except EmptyBookError:
        with pytest.raises(EmptyBookError):
            c.metrics(n)
        return
    mc = c.metrics(n)
    assert type(mc) is type(mp) and mc == mp  # floats equal bit for bit (same operations)


def both(c, py, method: str, *args) -> None:
    """Call method on both books: both raise ValueError or neither does."""
    errors = []
    for book in (c, py):
        try:
            getattr(book, method)(*args)
            errors.append(None)
        except ValueError as exc:
            errors.append(exc)
    assert (errors[0] is None) == (errors[1] is None), errors
    if errors[0] is not None:
        assert c.symbol in str(errors[0])


# -- the real captures --------------------------------------------------------------------

def frames(records):
    for rec in records:
        if rec["k"] == "ws":
            yield orjson.dumps(rec["m"]), rec["m"]


@pytest.mark.parametrize("which", ["spot_records", "usdm_records"])
def test_scanner_gives_orjson_event_for_every_depth_frame_of_the_captures(which, request):
    depth = 0
    for raw, msg in frames(request.getfixturevalue(which)):
        got = parse_depth_frame(raw)
        if "@depth" not in msg["stream"]:
            assert got is None
            continue
        depth += 1
        assert got is not None, raw[:120]
        data, ref = got["data"], msg["data"]
        assert got["stream"] == msg["stream"] and data.keys() == ref.keys()
        for k in ref:
            if k in ("b", "a"):
                assert type(data[k]) is Levels and len(data[k]) == len(ref[k])
                assert data[k].units() == [(parse_units(p), parse_units(q)) for p, q in ref[k]]
            else:
                assert data[k] == ref[k] and type(data[k]) is type(ref[k])
        assert as_plain(parse_depth_frame(raw.decode())) == as_plain(got)  # str frames alike
    assert depth > 1000


@pytest.mark.parametrize("which, market", [("spot_records", Market.SPOT), ("usdm_records", Market.USDM)])
def test_c_and_python_books_agree_at_every_event_of_the_captures(which, market, request):
    c, py = BookSync("BTCUSDT", market), BookSync("BTCUSDT", market, book_type=PyOrderBook)
    assert type(c.book) is OrderBook and type(py.book) is PyOrderBook
    applied = 0
    for rec in request.getfixturevalue(which):
        if rec["k"] == "snapshot":
            assert c.on_snapshot(rec["m"]) is py.on_snapshot(rec["m"])
            continue
        msg = rec["m"]
        if rec["k"] != "ws" or "@depth" not in msg["stream"]:
            continue
        fast = parse_depth_frame(orjson.dumps(msg))["data"]  # the C book eats Levels, the reference lists
        r = c.on_depth(fast)
        assert py.on_depth(msg["data"]) is r
        if r is SyncResult.APPLIED:
            applied += 1
            if applied % 7 == 0 or applied < 200:
                assert c.book.metrics(10) == py.book.metrics(10)
                assert c.book.top(30) == py.book.top(30)
    for rec in request.getfixturevalue(which):  # then the snapshots, as one more resync
        if rec["k"] == "snapshot":
            c.book.apply_snapshot(rec["m"]["lastUpdateId"], rec["m"]["bids"], rec["m"]["asks"])
            py.book.apply_snapshot(rec["m"]["lastUpdateId"], rec["m"]["bids"], rec["m"]["asks"])
            same_books(c.book, py.book, 50)
    assert applied > 1000


def test_capture_books_rebuilt_from_snapshots_and_diffs_are_equal(spot_records):
    c, py = BookSync("BTCUSDT"), BookSync("BTCUSDT", book_type=PyOrderBook)
    for rec in spot_records:
        if rec["k"] == "snapshot":
            assert c.on_snapshot(rec["m"]) is py.on_snapshot(rec["m"])
        elif "@depth" in rec["m"]["stream"]:
            assert c.on_depth(rec["m"]["data"]) is py.on_depth(rec["m"]["data"])
    same_books(c.book, py.book, 10**6)


# -- hypothesis: random books, valid and not ----------------------------------------------

PRICES = [f"{p}.{c:02d}000000" for p in (99, 100, 101, 102) for c in (0, 1, 50, 99)]
good_price = st.one_of(st.sampled_from(PRICES), st.integers(1, 10**6).map(lambda u: f"{u / 100:.2f}"),
                       st.integers(1, (1 << 62) - 1).map(lambda u: f"{u // 10**8}.{u % 10**8:08d}"))
good_qty = st.one_of(st.just("0.00000000"), st.just("0"), st.sampled_from(["1.5", "0.001", "2.00000000"]),
                     st.integers(0, (1 << 62) - 1).map(lambda u: f"{u // 10**8}.{u % 10**8:08d}"))
odd = st.one_of(st.sampled_from(["", "-1", "-0", "1e3", "1.", ".5", "1.123456789", "abc", " 1", "+1",
                                 "46116860184.27387904", "46116860184.27387903", "\u0661", "0.000000001",
                                 "00000000000000000000000001.5", "0"]),
                st.text(max_size=10), st.integers(-(2**63) + 1, 2**63 - 1), st.none())
level = st.one_of(st.tuples(good_price, good_qty).map(list),
                  st.tuples(st.one_of(good_price, odd), st.one_of(good_qty, odd)).map(list),
                  st.sampled_from([["1"], ["1", "1", "1"], "12", None, {"a": 1}]))
side = st.lists(st.tuples(good_price, good_qty).map(list), max_size=40)
messy_side = st.one_of(st.lists(level, max_size=8), side, st.just(None), st.just(5))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(
    st.tuples(st.just("snapshot"), st.integers(0, 10**12), side, side),
    st.tuples(st.just("diff"), messy_side, messy_side, st.integers(0, 10**12)),
    st.tuples(st.just("diff"), side, side, st.integers(0, 10**12)),
    st.tuples(st.just("clear")),
), max_size=25), st.integers(1, 40))
def test_c_book_equals_python_book_for_any_sequence(ops, n):
    c, py = OrderBook("BTCUSDT"), PyOrderBook("BTCUSDT")
    for op in ops:
        if op[0] == "snapshot":
            both(c, py, "apply_snapshot", op[1], op[2], op[3])
        elif op[0] == "diff":
            both(c, py, "apply_diff", op[1], op[2], op[3])
        else:
            c.clear()
            py.clear()
        if c.update_id != py.update_id:  # a failed diff leaves update_id alone in both
            pytest.fail(f"update ids differ: {c.update_id} != {py.update_id}")
        same_books(c, py, n)


@settings(max_examples=60, deadline=None)
@given(st.randoms(use_true_random=False), st.integers(200, 3000))
def test_many_levels_split_and_empty_blocks_and_stay_sorted(rnd, count):
    """Far more levels than a block holds, inserted and removed in random order."""
    c, ref = OrderBook("X"), {}
    prices = rnd.sample(range(1, 10**6), count)
    for i, p in enumerate(prices):
        c.apply_diff([[f"{p}", "1"]], [[f"{p}", f"{i + 1}"]], i)
        ref[p * 10**8] = i + 1
        if i % 97 == 0:
            c.check()
    c.check()
    assert c.levels()[1] == {k: q * 10**8 for k, q in ref.items()}
    assert c.depth() == (count, count)
    rnd.shuffle(prices)
    for i, p in enumerate(prices):
        c.apply_diff([[f"{p}", "0"]], [[f"{p}", "0"]], i)
        if i % 89 == 0:
            c.check()
            assert c.depth() == (count - i - 1, count - i - 1)
    assert c.depth() == (0, 0) and c.best_bid() is None
    assert _cbook.BLOCK < 200  # the sizes above really split blocks


# -- the scanner: never different from orjson ---------------------------------------------

def as_plain(msg):
    """A parse_depth_frame result with its Levels as [price units, qty units] lists, for comparison."""
    data = {k: ([list(t) for t in v.units()] if type(v) is Levels else v) for k, v in msg["data"].items()}
    return {"stream": msg["stream"], "data": data}


def orjson_units(msg):
    """orjson's parse with the levels parsed by parse_units (None if one does not parse)."""
    data = dict(msg["data"])
    for k in ("b", "a"):
        if k in data:
            data[k] = [[parse_units(p), parse_units(q)] for p, q in data[k]]
    return {"stream": msg["stream"], "data": data}


def check_frame(raw: bytes) -> None:
    got = parse_depth_frame(raw)
    if got is None:
        return
    ref = orjson.loads(raw)  # must not raise: the scanner accepted it
    assert list(ref) == ["stream", "data"] and "@depth" in ref["stream"]
    assert as_plain(got) == orjson_units(ref)
    for k in ("b", "a"):  # accepted levels are ones the book accepts: price > 0, qty >= 0
        for p, q in ref["data"].get(k, []):
            assert parse_units(p) > 0 and parse_units(q) >= 0


BASE = orjson.dumps({"stream": "btcusdt@depth@100ms", "data": {
    "e": "depthUpdate", "E": 1723161255208, "s": "BTCUSDT", "U": 50093239189, "u": 50093239190,
    "b": [["62212.01000000", "0.00100000"], ["62000.00000000", "0.00000000"]],
    "a": [["62525.00000000", "0.00020000"]]}})


@settings(max_examples=1500, deadline=None)
@given(st.data())
def test_scanner_on_mutated_frames_agrees_with_orjson(data):
    raw = bytearray(BASE)
    for _ in range(data.draw(st.integers(1, 4))):
        if not raw:
            break
        kind = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        i = data.draw(st.integers(0, len(raw) - 1))
        ch = data.draw(st.sampled_from(list(b'"[]{},:.-0123456789eE \t\nabtu\\\x00\xff')))
        if kind == "flip":
            raw[i] = ch
        elif kind == "insert":
            raw.insert(i, ch)
        elif kind == "delete":
            del raw[i]
        else:
            del raw[i:]
    check_frame(bytes(raw))


json_value = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63) + 1, 2**63 - 1), st.floats(allow_nan=False),
              st.text(max_size=6)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=3), inner, max_size=3)),
    max_leaves=6)


@settings(max_examples=600, deadline=None)
@given(st.dictionaries(st.sampled_from(["e", "E", "s", "U", "u", "pu", "T", "b", "a", "x"]),
                       st.one_of(json_value, st.lists(level, max_size=4), st.lists(st.tuples(good_price, good_qty))),
                       max_size=8),
       st.sampled_from(["btcusdt@depth@100ms", "btcusdt@depth", "btcusdt@aggTrade", "x@depth20"]),
       st.booleans())
def test_scanner_on_generated_frames_agrees_with_orjson(data, stream, spaced):
    msg = {"stream": stream, "data": data}
    raw = orjson.dumps(msg, option=orjson.OPT_INDENT_2) if spaced else orjson.dumps(msg)
    check_frame(raw)
    if "@depth" in stream and all(type(v) in (int, str) for k, v in data.items() if k not in "ba") and all(
            type(data.get(k, [])) is list and all(type(lv) is list and len(lv) == 2 and type(lv[0]) is str
                                                  and type(lv[1]) is str and 0 < (units_or_none(lv[0]) or 0) < 2**62
                                                  and 0 <= (units_or_none(lv[1]) if units_or_none(lv[1]) is not None
                                                            else -1) < 2**62  # the scanner's range (_cbook.c)
                                                  for lv in data.get(k, []))
            for k in ("b", "a")) and all(type(v) is not int or abs(v) < 10**18 for v in data.values()) and all(
            k in "ba" or type(v) is not str or (v.isascii() and v.isprintable() and "\\" not in v and '"' not in v)
            for k, v in data.items()):
        assert parse_depth_frame(raw) is not None  # the fast path is really taken for the usual shape


def test_scanner_refuses_what_it_does_not_know():
    ok = orjson.loads(BASE)
    assert parse_depth_frame(BASE) is not None
    for bad in [BASE + b"x", BASE[:-1], BASE.replace(b'"U":', b'"U":1,"U":'), BASE.replace(b"62212.01", b"6e4"),
                BASE.replace(b'"E":1723161255208', b'"E":1.5'), BASE.replace(b'"E":1723161255208', b'"E":true'),
                BASE.replace(b"0.00100000", b"-0.001"), BASE.replace(b'"62212.01000000"', b'"0"'),
                BASE.replace(b'"stream":"btcusdt@depth@100ms"', b'"stream":"btcusdt@trade"'),
                BASE.replace(b'"BTCUSDT"', b'"BTC\\u0055SDT"'), BASE.replace(b'"E":1723161255208', b'"E":01'),
                "\u00e9".encode() + BASE, b"", b"{}", b"[]", 12, None, bytearray(BASE)]:
        assert parse_depth_frame(bad) is None, bad
    assert ok["data"]["U"] == 50093239189


def test_levels_apply_like_lists():
    msg = parse_depth_frame(BASE)["data"]
    c, py = OrderBook("BTCUSDT"), PyOrderBook("BTCUSDT")
    c.apply_snapshot(1, [["62000.00000000", "3"]], [["62600", "1"]])
    py.apply_snapshot(1, [["62000.00000000", "3"]], [["62600", "1"]])
    c.apply_diff(msg["b"], msg["a"], 5)
    ref = orjson.loads(BASE)["data"]
    py.apply_diff(ref["b"], ref["a"], 5)
    same_books(c, py)
    assert repr(msg["b"]) == "Levels(2 changes)" and len(msg["a"]) == 1


def test_no_memory_is_kept_per_call():
    """Scanning, applying, metrics and the error paths return every allocation: what is traced
    (tracemalloc sees the extension's PyMem allocations too) does not grow with the rounds."""
    bad_levels = [["62212.01000000", "0.00100000"], ["x", "1"]]
    rnd = random.Random(5)
    snapshot = ([[f"{60000 + i}.00000000", "1"] for i in range(300)],
                [[f"{61000 + i}.00000000", "1"] for i in range(300)])

    def work(rounds) -> int:
        b, errors = OrderBook("BTCUSDT"), 0
        b.apply_snapshot(1, *snapshot)
        for i in range(rounds):
            m = parse_depth_frame(BASE)["data"]
            b.apply_diff(m["b"], m["a"], i)
            b.apply_diff([[f"{60000 + rnd.randrange(300)}.00000000", rnd.choice(["0", "2"])]], [], i)
            b.metrics(10), b.top(5), b.levels(), b.best_bid(), repr(b)
            errors += parse_depth_frame(BASE[:-3]) is None
            for call in (lambda: b.apply_diff(bad_levels, [], i), lambda: b.apply_snapshot(i, bad_levels, [])):
                try:
                    call()
                except ValueError:
                    errors += 1
            b.apply_snapshot(1, *snapshot)
        return errors

    work(200)  # warm up: scratch buffers, free lists
    tracemalloc.start()
    try:
        assert work(1000) == 3000
        first = tracemalloc.get_traced_memory()[0]
        assert work(5000) == 15000
        grown = tracemalloc.get_traced_memory()[0] - first
    finally:
        tracemalloc.stop()
    assert grown < 16 * 1024, f"{grown} bytes more after 5000 more rounds"
