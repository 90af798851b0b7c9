"""services/strategy/features.py against a slow, plainly written reference over the real capture,
plus no look-ahead (hypothesis), O(1) time per event and bounded memory."""
from __future__ import annotations

import dataclasses
import math
import time
import tracemalloc
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.broker.replay import market_events
from services.strategy.features import FeatureParams, FeatureVector, Features, PySymbolFeatures, SymbolFeatures
from shared.messages import Book, Trade

CAPTURE = Path(__file__).resolve().parents[2] / "data" / "binance-spot-btcusdt-20240808.jsonl.gz"
SYMBOL = "BTCUSDT"


@pytest.fixture(scope="module")
def events() -> list:
    return list(market_events(CAPTURE, SYMBOL))


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


# -- the slow reference: every feature recomputed from the whole history at each event ---------

def level(side: list, m: int):
    """(price, qty) of level m, or None when the book has no such level."""
    return (side[m][0], side[m][1]) if m < len(side) else None


def ofi_level(prev: Book, cur: Book, m: int) -> Fraction:
    """Cont et al.'s e_n at level m, exact (Fractions of the float qtys)."""
    e = Fraction(0)
    for side, sign in ((0, 1), (1, -1)):  # bids, asks
        old = level(prev.bids if side == 0 else prev.asks, m)
        new = level(cur.bids if side == 0 else cur.asks, m)
        if old is None and new is None:
            continue
        if old is None:
            old = (new[0], 0.0)  # missing: qty 0 at the other book's price
        if new is None:
            new = (old[0], 0.0)
        p0, q0, p1, q1 = old[0], Fraction(old[1]), new[0], Fraction(new[1])
        if sign == 1:
            e += (q1 if p1 >= p0 else 0) - (q0 if p1 <= p0 else 0)
        else:
            e += -(q1 if p1 <= p0 else 0) + (q0 if p1 >= p0 else 0)
    return e


def mid_of(b: Book) -> float:
    return (b.bids[0][0] + b.asks[0][0]) * 0.5


def book_depth(b: Book, n: int) -> Fraction:
    """The mean quantity over the first n levels of both sides (a missing level: 0), exact."""
    return sum((Fraction(b.bids[m][1]) if m < len(b.bids) else 0) + (Fraction(b.asks[m][1]) if m < len(b.asks) else 0)
               for m in range(n)) / (2 * n)


def reference(history: list, p: FeatureParams, memo: dict | None = None) -> dict:
    """The features after the last of `history` [(now_ns, Book | Trade)], from scratch.
    `memo` (one dict per history, which keeps its books alive) holds each book pair's e and
    each book's depth once computed: pure functions of those books, so the result is the same,
    only not recomputed over the whole history at every check."""
    memo = {} if memo is None else memo
    now = max(t for t, _ in history)
    books = [(t, e) for t, e in history if isinstance(e, Book)]
    trades = [(t, e) for t, e in history if isinstance(e, Trade)]
    n = p.levels
    out: dict = {}
    # OFI: e per book (the first book: 0), window sums

    def e_of(prev: Book, cur: Book) -> list:
        key = ("e", id(prev), id(cur), n)
        if key not in memo:
            memo[key] = [ofi_level(prev, cur, m) for m in range(n)]
        return memo[key]

    def depth_of(b: Book) -> Fraction:
        key = ("depth", id(b), n)
        if key not in memo:
            memo[key] = book_depth(b, n)
        return memo[key]

    es = [[Fraction(0)] * n] + [e_of(books[i - 1][1], books[i][1]) for i in range(1, len(books))]
    depth = [depth_of(b) for _, b in books]
    ofi_l1, ofi_multi = [], []
    for w in p.windows_ms:
        inside = [i for i, (t, _) in enumerate(books) if now - w * 1_000_000 < t <= now]
        ofi_l1.append(float(sum((es[i][0] for i in inside), Fraction(0))))
        total = sum((sum(es[i]) for i in inside), Fraction(0))
        mean_depth = sum((depth[i] for i in inside), Fraction(0)) / len(inside) if inside else 0
        ofi_multi.append(float(total / mean_depth) if mean_depth else 0.0)
    out["ofi_l1"], out["ofi_multi"] = ofi_l1, ofi_multi
    flows = []
    for w in p.windows_ms:
        inside = [tr for t, tr in trades if now - w * 1_000_000 < t <= now]
        buy = sum((Fraction(tr.qty) for tr in inside if not tr.buyer_is_maker), Fraction(0))
        sell = sum((Fraction(tr.qty) for tr in inside if tr.buyer_is_maker), Fraction(0))
        flows.append(float((buy - sell) / (buy + sell)) if buy + sell else 0.0)
    out["trade_flow"] = flows
    if not books:
        return out
    t_last, b = books[-1]
    pb, qb, pa, qa = b.bids[0][0], b.bids[0][1], b.asks[0][0], b.asks[0][1]
    mid = Fraction(pb) / 2 + Fraction(pa) / 2
    out["mid"] = float(mid)
    out["spread_bps"] = float((Fraction(pa) - Fraction(pb)) / mid * 10_000)
    micro = (Fraction(pb) * Fraction(qa) + Fraction(pa) * Fraction(qb)) / (Fraction(qa) + Fraction(qb))
    out["microprice"] = float(micro)
    out["microprice_dev_bps"] = float((micro - mid) / mid * 10_000)
    sb = sum(Fraction(q) for _, q in b.bids[:n])
    sa = sum(Fraction(q) for _, q in b.asks[:n])
    out["depth_imbalance"] = float((sb - sa) / (sb + sa))
    # vol: var_n = sum_i alpha_i prod_{j>i} (1 - alpha_j) r_i^2 ; S = sum_i exp(-(now - t_i)/tau) r_i^2
    tau_ns = p.vol_tau_s * 1e9
    var, rv, keep = 0.0, 0.0, 1.0
    for i in range(len(books) - 1, 0, -1):
        dt = books[i][0] - books[i - 1][0]
        r = math.log(mid_of(books[i][1]) / mid_of(books[i - 1][1]))
        var += keep * -math.expm1(-dt / tau_ns) * r * r
        keep *= math.exp(-dt / tau_ns)
        rv += math.exp(-(now - books[i][0]) / tau_ns) * r * r
    out["vol"] = math.sqrt(var)
    out["vol_1s"] = math.sqrt(rv / p.vol_tau_s)
    # momentum: the latest book at or before now - h
    mom = []
    for h in p.horizons_s:
        then = [bk for t, bk in books if t <= now - int(h * 1e9)]
        mom.append(math.log(mid_of(b) / mid_of(then[-1])) if then else 0.0)
    out["momentum"] = mom
    # spread EWMA: E = prod(1 - a_j) s_1 + sum_{i>=2} a_i prod_{j>i} (1 - a_j) s_i
    stau = p.spread_tau_s * 1e9
    spreads = [(t, (bk.asks[0][0] - bk.bids[0][0]) / mid_of(bk) * 1e4) for t, bk in books]
    ewma, keep = 0.0, 1.0
    for i in range(len(books) - 1, 0, -1):
        dt = spreads[i][0] - spreads[i - 1][0]
        ewma += keep * -math.expm1(-dt / stau) * spreads[i][1]
        keep *= math.exp(-dt / stau)
    ewma += keep * spreads[0][1]
    out["spread_ratio"] = spreads[-1][1] / ewma
    out["ready"] = now - books[0][0] >= max(max(p.windows_ms) * 1_000_000, max(p.horizons_s) * 1e9,
                                           p.vol_tau_s * 1e9, p.spread_tau_s * 1e9)
    return out


def compare(v: FeatureVector, ref: dict, where: str) -> None:
    for name, want in ref.items():
        got = getattr(v, name)
        if name == "ready":
            assert got == want, where
        elif isinstance(want, list):
            assert len(got) == len(want)
            for i, (g, w) in enumerate(zip(got, want)):
                assert close(g, w), f"{where}: {name}[{i}] {g!r} != {w!r}"
        else:
            assert close(got, want), f"{where}: {name} {got!r} != {want!r}"


# -- against the reference --------------------------------------------------------------

def test_every_feature_matches_the_slow_reference_over_the_real_capture(events):
    """The first 3,000 events; the reference (O(n) per event, exact Fractions for the window
    sums) at every 7th event and at every one of the first 200."""
    p = FeatureParams()
    core = SymbolFeatures(p)
    history, memo = [], {}
    checked = ready_seen = 0
    for k, ev in enumerate(events[:3000]):
        now = ev.ts
        (core.on_book if isinstance(ev, Book) else core.on_trade)(ev, now)
        history.append((now, ev))
        if k < 200 or k % 7 == 0 or k == 2999:
            v = core.vector()
            compare(v, reference(history, p, memo), f"event {k}")
            checked += 1
            ready_seen += v.ready
    assert checked > 500 and ready_seen > 100  # the 60 s horizon and the EWMAs were reached
    v = core.vector()
    assert v.ready and v.dropped == 0 and v.books + v.trades == 3000
    assert v.momentum[-1] != 0.0 and v.vol > 0 and v.vol_1s > 0, v  # real values, not the 0.0 defaults


def test_other_params_and_missing_levels_match_the_reference(events):
    """levels=12 (deeper than the published 10: missing levels on both sides), short windows,
    and books with levels removed (a level appearing / vanishing)."""
    p = FeatureParams(levels=12, windows_ms=(250, 2000, 7000), horizons_s=(0.5, 3.0), vol_tau_s=2.0,
                      spread_tau_s=5.0)
    core = SymbolFeatures(p)
    history, memo = [], {}
    for k, ev in enumerate(events[:800]):
        if isinstance(ev, Book) and k % 4 == 1:
            ev = dataclasses.replace(ev, bids=ev.bids[:1 + k % 7], asks=ev.asks[:1 + (k // 4) % 9])
        (core.on_book if isinstance(ev, Book) else core.on_trade)(ev, ev.ts)
        history.append((ev.ts, ev))
        if k % 5 == 0:
            compare(core.vector(), reference(history, p, memo), f"event {k}")
    assert core.vector().ready


@pytest.mark.parametrize("impl", [SymbolFeatures, PySymbolFeatures])
def test_a_full_ring_drops_the_oldest_and_counts_it(events, impl):
    """capacity 16 with a 60 s window: the sums cover the last 16 books / trades exactly."""
    p = FeatureParams(windows_ms=(60_000,), horizons_s=(1.0,), capacity=16)
    core = impl(p)
    books, trades = [], []
    for ev in events[:500]:
        if isinstance(ev, Book):
            core.on_book(ev, ev.ts)
            books.append(ev)
        else:
            core.on_trade(ev, ev.ts)
            trades.append(ev)
    v = core.vector()
    assert v.dropped == (len(books) - 16) + (len(trades) - 16)
    e1 = [ofi_level(books[i - 1], books[i], 0) for i in range(len(books) - 16, len(books))]
    assert close(v.ofi_l1[0], float(sum(e1)))
    buy = sum(Fraction(t.qty) for t in trades[-16:] if not t.buyer_is_maker)
    sell = sum(Fraction(t.qty) for t in trades[-16:] if t.buyer_is_maker)
    assert close(v.trade_flow[0], float((buy - sell) / (buy + sell)))
    if impl is SymbolFeatures:
        assert core.capacity == 16
    else:
        assert len(core._be1) == 16 and len(core._bt) == 16 and len(core._tv) == 16  # never reallocated


def test_before_data_everything_is_zero_and_not_ready():
    f = Features()
    v = f.vector(SYMBOL)
    assert v.ofi_l1 == (0.0, 0.0) and v.ofi_multi == (0.0, 0.0) and v.trade_flow == (0.0, 0.0)
    assert v.momentum == (0.0, 0.0, 0.0)
    assert (v.mid, v.vol, v.vol_1s, v.spread_ratio, v.microprice, v.depth_imbalance) == (0.0,) * 6
    assert v.ready is False
    for x in dataclasses.astuple(v):
        assert x is not None


def test_features_routes_by_symbol_and_skips_one_sided_books(events):
    f = Features(symbols=["ethusdt"])
    book = next(e for e in events if isinstance(e, Book))
    f.on_book(book, book.ts)
    f.on_book(dataclasses.replace(book, symbol="ETHUSDT", bids=[]), book.ts)
    f.on_trade(Trade(ts=book.ts, symbol=SYMBOL, exch_ts=0, trade_id=1, price=Decimal("1"), qty=Decimal("0.5"),
                     buyer_is_maker=False), book.ts + 1)
    assert SYMBOL in f and "ETHUSDT" in f
    assert f.vector(SYMBOL).books == 1 and f.vector(SYMBOL).trade_flow == (1.0, 1.0)
    assert f.vector("ETHUSDT").books == 0 and f.vector("ETHUSDT").skipped == 1


def test_vector_is_a_pure_read_and_the_clock_never_goes_back(events):
    core = SymbolFeatures()
    for ev in events[:200]:
        (core.on_book if isinstance(ev, Book) else core.on_trade)(ev, ev.ts)
    assert core.vector() == core.vector()
    last = events[199].ts
    before = core.vector()
    core.advance(last - 10**9)  # earlier: clamped
    assert core.vector() == before
    core.advance(last + 10 * 10**9)  # 10 s without events: the windows empty
    later = core.vector()
    assert later.ofi_l1 == (0.0, 0.0) and later.trade_flow == (0.0, 0.0) and later.vol_1s < before.vol_1s


# -- no look-ahead ----------------------------------------------------------------------

def _feed(core: SymbolFeatures, ev, now: int) -> None:
    (core.on_book if isinstance(ev, Book) else core.on_trade)(ev, now)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_feature_at_event_k_never_depends_on_later_events(events, data):
    """For a random k, replace the events after k by a perturbed tail (other prices, qtys, sides,
    level counts, later times): vector() after event k is identical."""
    prefix = events[:1500]
    k = data.draw(st.integers(0, len(prefix) - 2), label="k")
    p = FeatureParams(windows_ms=(200, 1000), horizons_s=(0.3, 2.0), vol_tau_s=1.0, spread_tau_s=2.0)
    base = SymbolFeatures(p)
    for i, ev in enumerate(prefix):
        _feed(base, ev, ev.ts)
        if i == k:
            at_k = base.vector()
    tail_len = data.draw(st.integers(1, 40), label="tail_len")
    t = prefix[k].ts
    tail = []
    for j in range(tail_len):
        t += data.draw(st.integers(0, 3 * 10**9))
        src = prefix[min(k + 1 + j, len(prefix) - 1)]
        f = data.draw(st.floats(0.99, 1.01))
        if data.draw(st.booleans()):
            q = data.draw(st.integers(1, 10**6))
            tail.append(Trade(ts=t, symbol=SYMBOL, exch_ts=0, trade_id=j, price=Decimal("60000"),
                              qty=Decimal(q) / 10**5, buyer_is_maker=data.draw(st.booleans())))
        else:
            book = src if isinstance(src, Book) else prefix[0]
            nb, na = data.draw(st.integers(1, 10)), data.draw(st.integers(1, 10))
            qf = data.draw(st.floats(0.01, 100.0))
            tail.append(dataclasses.replace(book, ts=t, bids=[[px * f, q * qf] for px, q in book.bids[:nb]],
                                            asks=[[px * f, q * qf] for px, q in book.asks[:na]]))
    other = SymbolFeatures(p)
    for i, ev in enumerate(prefix[:k + 1]):
        _feed(other, ev, ev.ts)
    assert other.vector() == at_k
    for ev in tail:
        _feed(other, ev, ev.ts)
    assert at_k.ts == prefix[k].ts


# -- O(1) time and bounded memory --------------------------------------------------------

def _stream(events, count: int) -> list:
    """`count` events: the capture, repeated with its times shifted so they keep increasing."""
    out, shift = [], 0
    span = events[-1].ts - events[0].ts + 1_000_000
    while len(out) < count:
        for ev in events:
            out.append(dataclasses.replace(ev, ts=ev.ts + shift) if shift else ev)
            if len(out) == count:
                break
        shift += span
    return out


def test_time_per_event_does_not_grow_with_history(events):
    stream = _stream(events, 20_000)
    tenth = len(stream) // 10
    best_first = {Book: math.inf, Trade: math.inf}
    best_last = {Book: math.inf, Trade: math.inf}
    for _ in range(3):
        core = SymbolFeatures()
        spent = {("first", Book): [0, 0], ("first", Trade): [0, 0], ("last", Book): [0, 0], ("last", Trade): [0, 0]}
        clock = time.perf_counter_ns
        for i, ev in enumerate(stream):
            is_book = isinstance(ev, Book)
            t0 = clock()
            if is_book:
                core.on_book(ev, ev.ts)
            else:
                core.on_trade(ev, ev.ts)
            dt = clock() - t0
            part = "first" if i < tenth else "last" if i >= len(stream) - tenth else None
            if part:
                acc = spent[(part, Book if is_book else Trade)]
                acc[0] += dt
                acc[1] += 1
        for kind in (Book, Trade):
            a, b = spent[("first", kind)], spent[("last", kind)]
            best_first[kind] = min(best_first[kind], a[0] / a[1])
            best_last[kind] = min(best_last[kind], b[0] / b[1])
    print(f"\nfeatures: {best_first[Book] / 1e3:.2f} us per book event (first 10%), "
          f"{best_last[Book] / 1e3:.2f} us (last 10%); trade {best_first[Trade] / 1e3:.2f} / "
          f"{best_last[Trade] / 1e3:.2f} us; vector() below")
    for kind in (Book, Trade):
        assert best_last[kind] <= 2 * best_first[kind], (kind.__name__, best_first, best_last)
    t0 = time.perf_counter_ns()
    for _ in range(1000):
        core.vector()
    print(f"features: vector() {(time.perf_counter_ns() - t0) / 1000 / 1e3:.2f} us")


def test_memory_does_not_grow_with_history(events):
    stream = _stream(events, 20_000)
    core = SymbolFeatures()
    tracemalloc.start()
    try:
        for ev in stream[:2_000]:
            _feed(core, ev, ev.ts)
        early, _ = tracemalloc.get_traced_memory()
        for ev in stream[2_000:]:
            _feed(core, ev, ev.ts)
        late, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"\nfeatures: traced {early} bytes after 2k events, {late} after 20k")
    # what is held is what the windows hold (a few hundred exact sums), never the history
    assert late - early < 64 * 1024, (early, late)
