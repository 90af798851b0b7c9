"""BookSync: Binance's local-book procedure, on synthetic streams and the real captures."""

import pytest

from services.marketdata.book import parse_units, units_to_str
from services.marketdata.sync import BadEventError, BookSync, Gap, Market, SyncResult

R = SyncResult


def ev(U, u, bids=(), asks=(), pu=None):
    """A depthUpdate "data" dict; levels as (price_str, qty_str)."""
    e = {"e": "depthUpdate", "E": 1, "s": "BTCUSDT", "U": U, "u": u,
         "b": [list(x) for x in bids], "a": [list(x) for x in asks]}
    if pu is not None:
        e["pu"] = pu
    return e


def snap(last, bids=(("100", "1"),), asks=(("101", "1"),)):
    return {"lastUpdateId": last, "bids": [list(x) for x in bids], "asks": [list(x) for x in asks]}


def replay(records, market, on_applied=None):
    """Feed a capture's depth events and snapshots to a BookSync; return it."""
    s = BookSync("BTCUSDT", market)
    for rec in records:
        if rec["k"] == "snapshot":
            s.on_snapshot(rec["m"])
        elif "@depth" in rec["m"]["stream"]:
            if s.on_depth(rec["m"]["data"]) is R.APPLIED and on_applied:
                on_applied(s)
    return s


def snapshot_of(s: BookSync) -> dict:
    """A REST-style snapshot of a synced book, for resync tests."""
    bids, asks = s.book.top(10**9)
    return {"lastUpdateId": s.book.update_id,
            "bids": [[units_to_str(p), units_to_str(q)] for p, q in bids],
            "asks": [[units_to_str(p), units_to_str(q)] for p, q in asks]}


# -- spot rules --------------------------------------------------------------------------

def test_buffers_until_snapshot_then_applies_straddling_event():
    s = BookSync("btcusdt")
    assert s.book.symbol == "BTCUSDT" and s.needs_snapshot and not s.synced
    assert s.on_depth(ev(1, 5, [("99", "1")])) is R.BUFFERED
    assert s.on_depth(ev(6, 9, [("98", "1")])) is R.BUFFERED
    assert s.on_depth(ev(10, 12, [("100", "0")])) is R.BUFFERED
    assert s.buffered == 3 and s.buffered_range() == (1, 12)
    assert s.on_snapshot(snap(7)) is R.SNAPSHOT_APPLIED
    # (1, 5) dropped: u <= 7; (6, 9) straddles 8; (10, 12) follows.
    assert s.synced and not s.needs_snapshot and s.events_applied == 2
    assert s.book.update_id == 12
    assert s.book.best_bid() == (parse_units("98"), parse_units("1"))
    assert s.on_depth(ev(13, 13)) is R.APPLIED and s.book.update_id == 13
    assert s.buffered == 0


def test_snapshot_too_old_is_refused_and_buffer_kept():
    s = BookSync("BTCUSDT")
    s.on_depth(ev(10, 12))
    assert s.on_snapshot(snap(5)) is R.SNAPSHOT_TOO_OLD
    assert s.needs_snapshot and not s.synced and s.buffered == 1
    assert s.book.depth() == (0, 0)
    # lastUpdateId 9 is exactly the state before U=10: it lines up.
    assert s.on_snapshot(snap(9)) is R.SNAPSHOT_APPLIED
    assert s.synced and s.book.update_id == 12


def test_snapshot_newer_than_buffer_waits_for_straddling_event():
    s = BookSync("BTCUSDT")
    s.on_depth(ev(1, 5))
    assert s.on_snapshot(snap(20)) is R.SNAPSHOT_APPLIED
    assert s.synced and s.book.update_id == 20 and s.events_applied == 0
    assert s.on_depth(ev(6, 19)) is R.DROPPED_OLD
    assert s.on_depth(ev(15, 25, [("100", "7")])) is R.APPLIED
    assert s.book.best_bid() == (parse_units("100"), parse_units("7"))


def test_first_event_after_snapshot_must_straddle():
    s = BookSync("BTCUSDT")
    s.on_snapshot(snap(20))
    assert s.on_depth(ev(23, 25)) is R.GAP
    assert not s.synced and s.needs_snapshot and s.gaps == 1 and s.buffered == 1
    assert s.last_gap == Gap(20, 23, 25, None)
    assert s.book.depth() == (0, 0)


def test_gap_discards_book_and_resyncs():
    s = BookSync("BTCUSDT")
    s.on_snapshot(snap(10))
    assert s.on_depth(ev(11, 12)) is R.APPLIED
    assert s.on_depth(ev(11, 12)) is R.DROPPED_OLD  # a duplicate changes nothing
    assert s.on_depth(ev(14, 15)) is R.GAP  # 13 is missing
    assert "after update id 12 came U=14 u=15" in str(s.last_gap)
    assert s.on_depth(ev(16, 18, [("50", "2")])) is R.BUFFERED
    assert s.on_snapshot(snap(16, bids=[("60", "1")])) is R.SNAPSHOT_APPLIED
    assert s.resyncs == 1 and s.gaps == 1 and s.book.update_id == 18
    assert s.book.best_bid() == (parse_units("60"), parse_units("1"))


def test_break_inside_buffer_restarts_buffer():
    s = BookSync("BTCUSDT")
    s.on_depth(ev(1, 5))
    assert s.on_depth(ev(3, 4)) is R.DROPPED_OLD
    assert s.on_depth(ev(4, 7)) is R.BUFFERED  # overlaps 5: harmless, levels are absolute
    assert s.on_depth(ev(9, 9)) is R.GAP
    assert s.buffered_range() == (9, 9) and s.needs_snapshot and s.gaps == 1


def test_snapshot_when_synced_is_ignored():
    s = BookSync("BTCUSDT")
    s.on_snapshot(snap(10))
    assert s.on_snapshot(snap(50, bids=[("1", "1")])) is R.SNAPSHOT_IGNORED
    assert s.book.update_id == 10 and s.book.best_bid()[0] == parse_units("100")


def test_buffer_is_bounded():
    s = BookSync("BTCUSDT", max_buffer=3)
    for i in range(10):
        s.on_depth(ev(i * 2 + 1, i * 2 + 2))
    assert s.buffered == 3 and s.buffered_range() == (15, 20)
    assert s.on_snapshot(snap(3)) is R.SNAPSHOT_TOO_OLD
    with pytest.raises(ValueError):
        BookSync("BTCUSDT", max_buffer=0)


@pytest.mark.parametrize("bad", [
    {"u": 5, "b": [], "a": []}, ev("1", 5), ev(6, 5), "not a dict",
])
def test_malformed_event_raises(bad):
    s = BookSync("BTCUSDT")
    with pytest.raises(BadEventError):
        s.on_depth(bad)


def test_malformed_levels_drop_sync():
    s = BookSync("BTCUSDT")
    s.on_snapshot(snap(10))
    with pytest.raises(BadEventError, match="U=11 u=12"):
        s.on_depth(ev(11, 12, [("1e3", "1")]))
    assert not s.synced and s.needs_snapshot and s.book.depth() == (0, 0)
    with pytest.raises(BadEventError):
        s.on_snapshot({"bids": [], "asks": []})
    with pytest.raises(BadEventError):
        s.on_snapshot(snap(20, bids=[("x", "1")]))
    assert s.needs_snapshot


# -- USD-M rules ------------------------------------------------------------------------

def test_usdm_first_event_and_pu_chain():
    s = BookSync("BTCUSDT", "usdm")
    assert s.market is Market.USDM
    s.on_depth(ev(100, 110, pu=90))
    s.on_depth(ev(115, 130, pu=110))
    s.on_depth(ev(131, 140, pu=130))
    # Futures: drop u < lastUpdateId; the first applied has U <= lastUpdateId <= u.
    assert s.on_snapshot(snap(120)) is R.SNAPSHOT_APPLIED
    assert s.events_applied == 2 and s.book.update_id == 140
    assert s.on_depth(ev(150, 160, pu=140)) is R.APPLIED
    assert s.on_depth(ev(170, 180, pu=165)) is R.GAP
    assert s.last_gap == Gap(160, 170, 180, 165)
    with pytest.raises(BadEventError):
        s.on_depth(ev(181, 190))  # USD-M events must carry pu


def test_usdm_snapshot_alignment():
    s = BookSync("BTCUSDT", Market.USDM)
    s.on_depth(ev(100, 110, pu=90))
    assert s.on_snapshot(snap(95)) is R.SNAPSHOT_TOO_OLD
    s.on_depth(ev(120, 130, pu=110))
    # Between two events' ranges: cannot prove it lines up, so fetch another.
    assert s.on_snapshot(snap(115)) is R.SNAPSHOT_TOO_OLD
    # Exactly at the end of an event: the next event's pu matches.
    assert s.on_snapshot(snap(130)) is R.SNAPSHOT_APPLIED
    assert s.on_depth(ev(135, 140, pu=130)) is R.APPLIED


# -- real captures ------------------------------------------------------------------------

def _ticker_check(records, market):
    """Compare each bookTicker to the rebuilt book right after the depth event with its u."""
    best = {}

    def note(s):
        best[s.book.update_id] = (s.book.best_bid(), s.book.best_ask())

    s = replay(records, market, note)
    matches = mismatches = 0
    for rec in records:
        if rec["k"] == "ws" and rec["m"]["stream"].endswith("@bookTicker"):
            t = rec["m"]["data"]
            if t["u"] in best:
                want = ((parse_units(t["b"]), parse_units(t["B"])),
                        (parse_units(t["a"]), parse_units(t["A"])))
                if best[t["u"]] == want:
                    matches += 1
                else:
                    mismatches += 1
    return s, matches, mismatches


def test_spot_capture_matches_every_book_ticker(spot_records):
    # The ticker is real time, the diff stream 100 ms batches: tickers usually
    # arrive before the depth event carrying their u, so match by u, not by arrival.
    s, matches, mismatches = _ticker_check(spot_records, Market.SPOT)
    assert (matches, mismatches) == (1072, 0)
    assert s.synced and s.gaps == 0 and s.resyncs == 0
    assert s.events_applied == 6493 and s.book.update_id == 50093696318
    s.book.check()


def test_usdm_capture_matches_every_book_ticker(usdm_records):
    s, matches, mismatches = _ticker_check(usdm_records, Market.USDM)
    assert (matches, mismatches) == (625, 0)
    assert s.synced and s.gaps == 0 and s.events_applied == 9017
    s.book.check()


def test_dropped_event_is_a_gap_and_resync_recovers(spot_records):
    depth = [r["m"]["data"] for r in spot_records if r["k"] == "ws" and "@depth" in r["m"]["stream"]]
    ref = BookSync("BTCUSDT")
    s = BookSync("BTCUSDT")
    snapshot = next(r["m"] for r in spot_records if r["k"] == "snapshot")
    for x in (ref, s):
        for e in depth[:3]:
            x.on_depth(e)
        assert x.on_snapshot(snapshot) is R.SNAPSHOT_APPLIED
    drop, resync_at = 1000, 1010
    results = []
    for i, e in enumerate(depth[3:], 3):
        assert ref.on_depth(e) is R.APPLIED
        if i == drop:
            continue
        results.append(s.on_depth(e))
        if i == drop + 1:
            assert results[-1] is R.GAP and s.needs_snapshot and not s.synced
            assert s.last_gap.prev_u == depth[drop - 1]["u"] and s.last_gap.first_u == depth[drop + 1]["U"]
        if i == resync_at:
            # The shell's REST snapshot arrives now, taken a few events back.
            assert s.on_snapshot(ref_snapshot) is R.SNAPSHOT_APPLIED
            assert s.synced and s.book.update_id == e["u"]
        if i == resync_at - 4:
            ref_snapshot = snapshot_of(ref)
    assert results.count(R.GAP) == 1 and s.gaps == 1 and s.resyncs == 1
    assert s.book.update_id == ref.book.update_id
    assert s.book.levels() == ref.book.levels()


# -- a stream that lies (issue #11): one resync, never a book stuck for good ------------------

BIG = 10 ** 9  # a corrupted digit high up: beyond MAX_ID_JUMP of either market


def synced_at_12(market=Market.SPOT):
    s = BookSync("BTCUSDT", market)
    s.on_snapshot(snap(10))
    assert s.on_depth(ev(11, 12, pu=10 if market is Market.USDM else None)) is R.APPLIED
    return s


def test_an_inflated_u_is_refused_and_the_next_true_event_shows_the_lost_one():
    s = synced_at_12()
    assert s.on_depth(ev(13, 14 + BIG, [("100", "9")])) is R.SUSPECT  # the true (13, 14), garbled
    assert s.synced and s.book.update_id == 12 and s.suspects == 1
    assert s.book.best_bid() == (parse_units("100"), parse_units("1"))  # not applied
    assert s.on_depth(ev(15, 16)) is R.GAP  # 13-14 never arrived: resync
    assert not s.synced and s.needs_snapshot and s.buffered_range() == (15, 16)


def test_an_inflated_event_sent_in_addition_costs_nothing():
    s = synced_at_12()
    assert s.on_depth(ev(13 + BIG, 14 + BIG)) is R.SUSPECT
    assert s.on_depth(ev(13, 14)) is R.APPLIED and s.synced and s.gaps == 0


def test_a_book_that_took_a_small_lie_is_discarded_once_the_stream_is_behind_it():
    s = synced_at_12()
    assert s.on_depth(ev(13, 5000)) is R.APPLIED  # within MAX_ID_JUMP: indistinguishable yet
    assert s.on_depth(ev(15, 16)) is R.DROPPED_OLD  # one: a stray repeat, perhaps
    assert s.on_depth(ev(17, 18)) is R.GAP  # two in a row: the book is the liar
    assert not s.synced and s.needs_snapshot and s.buffered_range() == (17, 18)
    assert s.last_gap == Gap(5000, 17, 18, None) and s.last_gap.last_u < s.last_gap.prev_u
    assert s.on_depth(ev(19, 20)) is R.BUFFERED
    assert s.on_snapshot(snap(18)) is R.SNAPSHOT_APPLIED and s.book.update_id == 20


def test_a_stray_old_event_is_dropped_and_the_book_kept():
    s = synced_at_12()
    assert s.on_depth(ev(5, 8)) is R.DROPPED_OLD
    assert s.on_depth(ev(13, 14)) is R.APPLIED
    assert s.on_depth(ev(11, 12)) is R.DROPPED_OLD
    assert s.on_depth(ev(15, 15)) is R.APPLIED and s.synced and s.gaps == 0


def test_after_its_first_event_a_synced_spot_book_takes_only_u_plus_one():
    # Binance: "each new event's U should be equal to the previous event's u+1". An overlap
    # can only be a replayed event with a changed u, whose older levels would be applied.
    s = synced_at_12()
    assert s.on_depth(ev(9, 15, [("100", "5")])) is R.GAP
    assert not s.synced and s.book.depth() == (0, 0)


def test_while_buffering_an_inflated_event_is_refused_or_pushed_out():
    s = BookSync("BTCUSDT")
    s.on_depth(ev(1, 5))
    assert s.on_depth(ev(6, 9 + BIG)) is R.SUSPECT
    assert s.on_depth(ev(6, 9)) is R.BUFFERED and s.buffered_range() == (1, 9)
    assert s.on_depth(ev(10, 5000)) is R.BUFFERED  # a small lie: taken for now
    assert s.on_depth(ev(12, 14)) is R.DROPPED_OLD
    assert s.on_depth(ev(15, 16)) is R.GAP  # the stream went on below it: start from the stream
    assert s.buffered_range() == (15, 16)
    assert s.on_snapshot(snap(14)) is R.SNAPSHOT_APPLIED and s.book.update_id == 16


def test_while_buffering_an_overlap_starts_the_buffer_over():
    s = BookSync("BTCUSDT")
    s.on_depth(ev(1, 5))
    assert s.on_depth(ev(4, 7)) is R.BUFFERED and s.buffered_range() == (4, 7)
    assert s.on_snapshot(snap(3)) is R.SNAPSHOT_APPLIED and s.book.update_id == 7


def test_a_snapshot_far_older_than_the_stream_is_a_gap_at_once():
    s = BookSync("BTCUSDT")
    assert s.on_snapshot(snap(5)) is R.SNAPSHOT_APPLIED  # nothing buffered to tell it is stale
    assert s.on_depth(ev(BIG, BIG + 5)) is R.GAP  # does not straddle it: a gap, whoever is wrong
    assert s.needs_snapshot and s.buffered_range() == (BIG, BIG + 5)


@pytest.mark.parametrize("market", [Market.SPOT, Market.USDM])
def test_a_first_event_that_straddles_the_snapshot_but_jumps_far_is_refused(market):
    s = BookSync("BTCUSDT", market)
    usdm = market is Market.USDM
    assert s.on_snapshot(snap(10)) is R.SNAPSHOT_APPLIED
    lie = ev(11 + BIG * 100, 12 + BIG * 100, pu=10) if usdm else ev(11, 12 + BIG)
    assert s.on_depth(lie) is R.SUSPECT and s.synced and s.book.update_id == 10
    assert s.on_depth(ev(13, 14, pu=12 if usdm else None)) is R.GAP  # the true first one was lost


def test_two_events_in_a_row_far_ahead_of_the_book_mean_the_book_is_wrong():
    s = synced_at_12()
    assert s.on_depth(ev(BIG, BIG + 5)) is R.SUSPECT
    assert s.on_depth(ev(BIG + 6, BIG + 8)) is R.GAP
    assert s.needs_snapshot and s.buffered_range() == (BIG + 6, BIG + 8)


@pytest.mark.parametrize("fields", ["u", "U+u"])
def test_usdm_an_inflated_event_is_refused_and_the_pu_chain_shows_the_lost_one(fields):
    s = synced_at_12(Market.USDM)
    bad = ev(13 + (BIG * 100 if fields == "U+u" else 0), 14 + BIG * 100, pu=12)
    assert s.on_depth(bad) is R.SUSPECT and s.synced and s.book.update_id == 12
    assert s.on_depth(ev(20, 30, pu=14)) is R.GAP
    assert s.last_gap == Gap(12, 20, 30, 14)


def test_usdm_a_book_that_took_a_small_lie_is_discarded_once_the_stream_is_behind_it():
    s = synced_at_12(Market.USDM)
    assert s.on_depth(ev(13, 90_000, pu=12)) is R.APPLIED  # the true u is 14
    assert s.on_depth(ev(20, 30, pu=14)) is R.DROPPED_OLD
    assert s.on_depth(ev(40, 50, pu=30)) is R.GAP
    assert s.buffered_range() == (40, 50) and s.needs_snapshot
