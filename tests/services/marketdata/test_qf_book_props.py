"""BookSync + OrderBook against brute force, with hypothesis: random streams, snapshots and gaps."""


from hypothesis import given, settings
from hypothesis import strategies as st

from services.marketdata.book import UNITS, units_to_str
from services.marketdata.sync import BookSync, Market, SyncResult
from tests.services.marketdata.test_book import region

R = SyncResult
TICK = 1_000_000  # 0.01 in units, like BTCUSDT
MID = 60_000  # in ticks; bids below, asks above: a stream that never crosses


# A side's changes: (distance from MID in ticks, qty in 0.001 units; 0 removes).
changes = st.lists(st.tuples(st.integers(1, 60), st.integers(0, 3)), max_size=12)


def as_levels(side: int, ch) -> list[list[str]]:
    """Binance strings, 8 decimals as spot sends them, or short forms now and then."""
    out = []
    for dist, q in ch:
        price = (MID - dist if side == 0 else MID + dist) * TICK
        qty = q * 100_000
        fmt = (lambda u: f"{u // UNITS}.{u % UNITS:08d}") if dist % 3 else units_to_str
        out.append([fmt(price), fmt(qty)])
    return out


def brute(state: tuple[dict, dict], event: tuple) -> tuple[dict, dict]:
    """Apply one event's changes to a copy of {price units: qty units} per side."""
    new = (dict(state[0]), dict(state[1]))
    for side in (0, 1):
        for dist, q in event[side]:
            price = (MID - dist if side == 0 else MID + dist) * TICK
            if q:
                new[side][price] = q * 100_000
            else:
                new[side].pop(price, None)
    return new


@st.composite
def streams(draw, usdm: bool = False):
    """A gap-free stream: the states after each event, its events and their id ranges."""
    n = draw(st.integers(1, 25))
    state = brute(({}, {}), (draw(changes), draw(changes)))
    states, events = [state], []
    u = draw(st.integers(100, 10**6))
    first_u = u
    for _ in range(n):
        bids, asks = draw(changes), draw(changes)
        span = draw(st.integers(0, 3))
        # USD-M ids jump (pu chains them); spot ids are contiguous.
        start = u + (draw(st.integers(1, 5)) if usdm else 1)
        ev = {"e": "depthUpdate", "E": 1, "s": "BTCUSDT", "U": start, "u": start + span,
              "b": as_levels(0, bids), "a": as_levels(1, asks)}
        if usdm:
            ev["pu"] = u
        u = start + span
        events.append(ev)
        state = brute(state, (bids, asks))
        states.append(state)
    return first_u, states, events


def snapshot(last: int, state) -> dict:
    return {"lastUpdateId": last,
            "bids": [[units_to_str(p), units_to_str(q)] for p, q in state[0].items()],
            "asks": [[units_to_str(p), units_to_str(q)] for p, q in state[1].items()]}


def assert_book(sync: BookSync, state, n: int = 5) -> None:
    """The book equals the brute-force state: levels, order, top n, no zero level, not crossed."""
    book = sync.book
    book.check()
    assert book.levels() == state
    bids, asks = book.top(n)
    assert bids == sorted(state[0].items(), reverse=True)[:n]
    assert asks == sorted(state[1].items())[:n]
    assert all(q > 0 for _, q in bids + asks)
    if bids and asks:
        assert bids[0][0] < asks[0][0]


@settings(max_examples=120, deadline=None)
@given(data=st.data(), usdm=st.booleans(), small=st.booleans())
def test_snapshot_plus_diffs_equals_brute_force(data, usdm, small):
    """Events buffered, a snapshot taken at any point of the stream, then the rest: exact."""
    first_u, states, events = data.draw(streams(usdm))
    n = len(events)
    at = data.draw(st.integers(0, n))  # the snapshot's state: after `at` events
    arrive = data.draw(st.integers(1, n))  # events received before the snapshot arrives
    last = events[at - 1]["u"] if at else first_u
    sync = BookSync("btcusdt", Market.USDM if usdm else Market.SPOT)
    with region(*((2, 4) if small else (64, 512))):
        for ev in events[:arrive]:
            assert sync.on_depth(ev) is R.BUFFERED
        # Every buffered event is newer than the snapshot or lines up with it.
        assert sync.on_snapshot(snapshot(last, states[at])) is R.SNAPSHOT_APPLIED
        assert sync.synced and sync.book.update_id == max(last, events[arrive - 1]["u"])
        # Spot drops u <= lastUpdateId; USD-M drops only u < lastUpdateId and re-applies
        # the event ending at it (levels are absolute, so that changes nothing).
        first = at - 1 if usdm and at else at
        assert_book(sync, states[max(arrive, at)])
        for i, ev in enumerate(events[arrive:], arrive):
            assert sync.on_depth(ev) is (R.APPLIED if i >= first else R.DROPPED_OLD)
            assert_book(sync, states[max(i + 1, at)])
        assert_book(sync, states[-1])
        assert sync.events_applied == n - first and sync.gaps == 0


@settings(max_examples=120, deadline=None)
@given(data=st.data(), usdm=st.booleans())
def test_lost_event_is_a_gap_and_a_later_snapshot_repairs(data, usdm):
    first_u, states, events = data.draw(streams(usdm))
    n = len(events)
    if n < 3:
        return
    sync = BookSync("BTCUSDT", Market.USDM if usdm else Market.SPOT)
    sync.on_snapshot(snapshot(first_u, states[0]))
    lost = data.draw(st.integers(0, n - 2))
    for i, ev in enumerate(events):
        if i == lost:
            continue
        res = sync.on_depth(ev)
        if i < lost:
            assert res is R.APPLIED
            assert_book(sync, states[i + 1])
        elif i == lost + 1:
            assert res is R.GAP and not sync.synced and sync.book.depth() == (0, 0)
            assert sync.last_gap.prev_u == (events[lost - 1]["u"] if lost else first_u)
        else:
            assert res is R.BUFFERED and not sync.synced
    # The REST snapshot, taken at any event still in the buffer, brings the book back exactly.
    at = data.draw(st.integers(lost + 1, n))
    assert sync.on_snapshot(snapshot(events[at - 1]["u"], states[at])) is R.SNAPSHOT_APPLIED
    assert_book(sync, states[-1])
    assert sync.gaps == 1 and sync.resyncs == 1


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_metrics_of_an_uncrossed_stream(data):
    """After every applied event of a consistent stream: never crossed, metrics in range."""
    first_u, states, events = data.draw(streams())
    sync = BookSync("BTCUSDT")
    sync.on_snapshot(snapshot(first_u, states[0]))
    for i, ev in enumerate(events):
        assert sync.on_depth(ev) is R.APPLIED
        bb, ba = sync.book.best_bid(), sync.book.best_ask()
        if bb is None or ba is None:
            continue
        m = sync.book.metrics(5)
        assert bb[0] < ba[0] and m.spread > 0 and -1 <= m.imbalance <= 1
        assert m.bids[0][0] <= m.microprice <= m.asks[0][0]
        assert m.bids[0] == [bb[0] / UNITS, bb[1] / UNITS] and m.asks[0] == [ba[0] / UNITS, ba[1] / UNITS]
        assert_book(sync, states[i + 1])
