"""Pure pieces of the feeds: backoff, keys and streams, weight accounting, replay of captures."""
import gzip
import random

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.marketdata.binance import WeightGate, depth_weight, snapshot_limit
from services.marketdata.feeds import (Backoff, CaptureSpec, ReplayFeed, decode_frame, detect_market,
                                       is_server_shutdown, parse_raw, parse_replay)
from services.marketdata.records import Disconnected, RouteOpened, SnapshotRecord, WsMessage
from services.marketdata.symbols import Route, key_of, markets_of, split_key, streams_for
from services.marketdata.sync import Market


def write(path, records):
    data = b"".join(orjson.dumps(r) + b"\n" for r in records)
    path.write_bytes(gzip.compress(data) if str(path).endswith(".gz") else data)
    return str(path)


# -- backoff -------------------------------------------------------------------------

def test_backoff_is_exponential_with_full_jitter_and_bounded():
    b = Backoff(base_s=0.5, cap_s=4.0, rng=random.Random(7))
    ceilings = [0.5, 1, 2, 4, 4, 4, 4]
    for ceiling in ceilings:
        assert 0 <= b.next_delay() <= ceiling
    # full jitter: over many draws the delays cover the whole [0, cap] range
    draws = [Backoff(cap_s=4.0, rng=random.Random(i)) for i in range(300)]
    for d in draws:
        d.attempt = 10
    values = [d.next_delay() for d in draws]
    assert max(values) <= 4.0 and min(values) < 0.4 and max(values) > 3.6


def test_backoff_survives_huge_attempt_counts():
    b = Backoff(cap_s=30, rng=random.Random(1))
    b.attempt = 10_000
    assert 0 <= b.next_delay() <= 30


def test_backoff_resets_only_after_a_healthy_connection():
    b = Backoff(healthy_s=60, rng=random.Random(3))
    for _ in range(5):
        b.next_delay()
    b.connected_for(59.9)
    assert b.attempt == 5
    b.connected_for(60)
    assert b.attempt == 0


# -- keys, streams, routes -------------------------------------------------------------

def test_keys_carry_the_market_before_the_symbol():
    assert split_key("BTCUSDT") == (Market.SPOT, "BTCUSDT")
    assert split_key("USDM:btcusdt") == (Market.USDM, "BTCUSDT")
    assert key_of(Market.USDM, "btcusdt") == "USDM:BTCUSDT" and key_of(Market.SPOT, "btcusdt") == "BTCUSDT"
    # ZeroMQ filters by prefix: the spot topic must not be a prefix of the futures one
    assert not f"book.{key_of(Market.USDM, 'btcusdt')}".startswith("book.BTCUSDT")
    for bad in ("COINM:BTCUSD", "USDM:", ""):
        with pytest.raises(ValueError):
            split_key(bad)
    assert markets_of(["USDM:BTCUSDT", "ETHUSDT"]) == [Market.SPOT, Market.USDM]


def test_streams_and_routes():
    assert streams_for(["BTCUSDT", "ethusdt"]) == ["btcusdt@depth@100ms", "btcusdt@aggTrade",
                                                  "ethusdt@depth@100ms", "ethusdt@aggTrade"]
    assert streams_for(["BTCUSDT"], book_ticker=True)[-1] == "btcusdt@bookTicker"
    r = Route(Market.USDM, ["BTCUSDT", "USDM:BTCUSDT", "USDM:ETHUSDT"], gen=3)
    assert r.keys == {"btcusdt": "USDM:BTCUSDT", "ethusdt": "USDM:ETHUSDT"}
    assert r.syncs["btcusdt"].market is Market.USDM and r.names() == ["BTCUSDT", "ETHUSDT"]
    first = r.syncs["btcusdt"]
    r.reset()
    assert r.syncs["btcusdt"] is not first and not r.syncs["btcusdt"].synced


# -- frames ----------------------------------------------------------------------------

def test_frame_decoding():
    assert parse_raw(b'{"stream":"a@b","data":{"x":1}}') == {"stream": "a@b", "data": {"x": 1}}
    with pytest.raises(ValueError, match="malformed JSON"):
        decode_frame(b"{nope")
    for bad in (b"[1]", b'{"stream":1,"data":{}}', b'{"stream":"a","data":[]}'):
        with pytest.raises(ValueError, match="not a combined-stream"):
            parse_raw(bad)


def test_server_shutdown_is_recognised_in_every_wrapping():
    ev = {"e": "serverShutdown", "E": 1}
    assert is_server_shutdown(ev) and is_server_shutdown({"event": ev})
    assert is_server_shutdown({"stream": "x", "data": ev})
    assert not is_server_shutdown({"e": "depthUpdate"}) and not is_server_shutdown([ev])


# -- REST weight -------------------------------------------------------------------------

def test_depth_weights_and_limits_follow_binance_tables():
    assert [depth_weight(Market.SPOT, n) for n in (5, 100, 101, 500, 1000, 5000)] == [5, 5, 25, 25, 50, 250]
    assert [depth_weight(Market.USDM, n) for n in (5, 50, 100, 500, 1000)] == [2, 2, 5, 10, 20]
    assert snapshot_limit(Market.SPOT, 5000) == 5000
    assert [snapshot_limit(Market.USDM, n) for n in (5000, 1000, 700, 7)] == [1000, 1000, 500, 5]


def test_weight_gate_waits_for_the_next_minute_only_when_full():
    g = WeightGate(limit=100)
    t = 600.0  # the start of a minute
    assert g.delay(50, t) == 0
    g.spent(50, t)
    g.spent(50, t + 1)
    assert g.used == 100 and g.delay(50, t + 10) == pytest.approx(50.0)
    g.spent(50, t + 20, server_used=20)  # Binance's own figure wins
    assert g.used == 20 and g.delay(50, t + 21) == 0
    g.spent(50, t + 30, server_used=90)
    assert g.delay(50, t + 61) == 0  # a new minute starts from zero


# -- replay ------------------------------------------------------------------------------

def test_replay_spec_parsing():
    specs = parse_replay("/a.gz,usdm:/b1.gz+/b2.gz,spot:/c.jsonl")
    assert specs == [CaptureSpec(("/a.gz",), None), CaptureSpec(("/b1.gz", "/b2.gz"), Market.USDM),
                     CaptureSpec(("/c.jsonl",), Market.SPOT)]
    with pytest.raises(ValueError):
        parse_replay("usdm:")


def test_market_is_detected_from_the_depth_events(spot_path, usdm_path, tmp_path):
    assert detect_market(str(spot_path)) is Market.SPOT
    assert detect_market(str(usdm_path)) is Market.USDM
    assert detect_market(str(tmp_path / "missing.gz")) is Market.SPOT


def _depth(stream, U, u, t, pu=None):
    data = {"e": "depthUpdate", "E": 1, "s": "BTCUSDT", "U": U, "u": u, "b": [], "a": []}
    if pu is not None:
        data["pu"] = pu
    return {"t": t, "k": "ws", "m": {"stream": stream, "data": data}}


def test_two_captures_play_side_by_side_on_their_own_routes(tmp_path):
    # different days: each capture is timed from its own first record
    a = write(tmp_path / "a.jsonl", [_depth("btcusdt@depth@100ms", 1, 2, 1_000_000_000 + i * 10) for i in range(3)])
    b = write(tmp_path / "b.jsonl.gz", [_depth("btcusdt@depth@0ms", 5, 9, 7_000_000_000 + i * 10 + 5, pu=4)
                                        for i in range(3)]
              + [{"t": 7_000_000_100, "k": "snapshot", "s": "btcusdt", "m": {"lastUpdateId": 3}}])
    recs = list(ReplayFeed(f"{a},{b}", ("BTCUSDT", "USDM:BTCUSDT"), speed=0).records())
    kinds = [(type(r), r.route.market.value) for r in recs]
    assert kinds[:2] == [(RouteOpened, "spot"), (WsMessage, "spot")]
    assert kinds[2:4] == [(RouteOpened, "usdm"), (WsMessage, "usdm")]  # interleaved by relative time
    assert [k for k, _ in kinds[4:]] == [WsMessage] * 4 + [SnapshotRecord]
    snap = recs[-1]
    assert snap.name == "BTCUSDT" and snap.snap == {"lastUpdateId": 3}
    assert snap.route.keys == {"btcusdt": "USDM:BTCUSDT"}
    assert all(type(r.recv_ns) is int for r in recs)  # stamped with the local time when handed out
    assert not {r.recv_ns for r in recs} & {1_000_000_000, 7_000_000_005}  # not with the recorded one


def test_recorded_market_tags_win_over_detection(tmp_path):
    recs = [_depth("btcusdt@depth@100ms", 1, 2, 1), {**_depth("btcusdt@depth@0ms", 5, 9, 2, pu=4), "x": "usdm"}]
    out = list(ReplayFeed(write(tmp_path / "mixed.jsonl", recs), ("BTCUSDT", "USDM:BTCUSDT"), 0).records())
    assert [r.route.market for r in out if type(r) is WsMessage] == [Market.SPOT, Market.USDM]


def test_segments_play_one_after_another_and_loop_restarts(tmp_path):
    s1 = write(tmp_path / "s1.jsonl", [_depth("btcusdt@depth@100ms", 1, 2, 100)])
    s2 = write(tmp_path / "s2.jsonl", [_depth("btcusdt@depth@100ms", 3, 4, 200)])
    feed = ReplayFeed(f"{s1}+{s2}", ("BTCUSDT",), speed=0, loop=True)
    out = []
    for rec in feed.records():
        out.append(rec)
        if len(out) == 8:
            break
    assert [type(r) for r in out] == [RouteOpened, WsMessage, WsMessage, Disconnected, WsMessage, WsMessage,
                                      Disconnected, WsMessage]
    assert [r.msg["data"]["u"] for r in out if type(r) is WsMessage] == [2, 4, 2, 4, 2]
    assert out[3].why == "replay restarted" and out[3].route is out[0].route


def test_a_damaged_capture_ends_its_replay_not_the_feed(tmp_path):
    good = write(tmp_path / "good.jsonl", [_depth("btcusdt@depth@100ms", 1, 2, i) for i in range(5)])
    whole = gzip.compress(b"".join(orjson.dumps(_depth("btcusdt@depth@100ms", 1, 2, i)) + b"\n" for i in range(3000)))
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(whole[: len(whole) // 2])  # a recorder killed mid-write
    feed = ReplayFeed(f"{cut},{good}", ("BTCUSDT",), speed=0)
    out = list(feed.records())
    assert sum(type(r) is WsMessage and r.route.gen == 1 for r in out) == 5  # the good one plays to its end
    assert 0 < sum(type(r) is WsMessage and r.route.gen == 0 for r in out) < 3000
    assert feed.captures[0].failed and not feed.captures[1].failed
    assert "cut.jsonl.gz" in feed.captures[0].error and feed.captures[1].error == ""


def test_replay_paces_by_recorded_time(tmp_path):
    import time
    recs = [_depth("btcusdt@depth@100ms", 1, 2, i * 100_000_000) for i in range(5)]  # 0.4 s recorded
    path = write(tmp_path / "p.jsonl", recs)
    start = time.monotonic()
    n = sum(1 for r in ReplayFeed(path, ("BTCUSDT",), speed=2).records() if type(r) is WsMessage)
    elapsed = time.monotonic() - start
    assert n == 5 and 0.19 <= elapsed < 5  # 0.2 s at speed 2 (generous upper bound on a shared machine)


def test_recorded_stamps_are_the_capture_times_and_merge_captures_by_them(tmp_path):
    # the same two captures as side by side above: recorded, the earlier one plays first
    a = write(tmp_path / "a.jsonl", [_depth("btcusdt@depth@100ms", 1, 2, 1_000_000_000 + i * 10) for i in range(3)])
    b = write(tmp_path / "b.jsonl.gz", [_depth("btcusdt@depth@0ms", 5, 9, 500_000_000 + i * 10 + 5, pu=4)
                                        for i in range(3)]
              + [{"t": 2_000_000_000, "k": "snapshot", "s": "btcusdt", "m": {"lastUpdateId": 3}}])
    feed = ReplayFeed(f"{a},{b}", ("BTCUSDT", "USDM:BTCUSDT"), speed=0, stamp="recorded")
    recs = list(feed.records())
    assert [(type(r), r.route.market.value, r.recv_ns) for r in recs] == [
        (RouteOpened, "usdm", 500_000_005), (WsMessage, "usdm", 500_000_005), (WsMessage, "usdm", 500_000_015),
        (WsMessage, "usdm", 500_000_025), (RouteOpened, "spot", 1_000_000_000), (WsMessage, "spot", 1_000_000_000),
        (WsMessage, "spot", 1_000_000_010), (WsMessage, "spot", 1_000_000_020), (SnapshotRecord, "usdm", 2_000_000_000)]
    assert [(type(r), r.recv_ns) for r in feed.records()] == [(type(r), r.recv_ns) for r in recs]  # every time


def test_recorded_stamps_go_on_increasing_when_a_capture_loops(tmp_path):
    t0 = 1_723_161_253_937_085_768
    path = write(tmp_path / "loop.jsonl", [_depth("btcusdt@depth@100ms", i, i, t0 + i * 1000) for i in (0, 1)]
                 + [{"t": "?", "k": "ws", "m": {"stream": "btcusdt@depth@100ms", "data": {}}}])
    out = []
    for rec in ReplayFeed(path, ("BTCUSDT",), speed=0, loop=True, stamp="recorded").records():
        out.append(rec)
        if len(out) == 9:
            break
    assert [type(r) for r in out] == [RouteOpened] + [WsMessage] * 3 + [Disconnected] + [WsMessage] * 3 + [Disconnected]
    # the first pass at its recorded times (a record without one: the one before's), the next
    # pass right after it
    assert [r.recv_ns - t0 for r in out] == [0, 0, 1000, 1000, 1_001_000, 1_001_000, 1_002_000, 1_002_000, 2_002_000]


def test_recorded_stamps_pace_from_the_first_record_not_the_epoch(tmp_path):
    import time
    t0 = 1_723_161_253_937_085_768  # ns since the epoch: pacing by it would wait 55 years
    path = write(tmp_path / "p.jsonl", [_depth("btcusdt@depth@100ms", 1, 2, t0 + i * 100_000_000) for i in range(5)])
    start = time.monotonic()
    recs = [r for r in ReplayFeed(path, ("BTCUSDT",), speed=2, stamp="recorded").records() if type(r) is WsMessage]
    elapsed = time.monotonic() - start
    assert [r.recv_ns for r in recs] == [t0 + i * 100_000_000 for i in range(5)]
    assert 0.19 <= elapsed < 5  # 0.4 s recorded, at speed 2


def test_an_unknown_stamp_is_refused():
    with pytest.raises(ValueError, match="stamp"):
        ReplayFeed("a.gz", ("BTCUSDT",), speed=0, stamp="local")


# -- properties ----------------------------------------------------------------------------


@given(base=st.floats(0.01, 5), cap=st.floats(0.1, 3600), attempts=st.integers(0, 200), seed=st.integers())
@settings(max_examples=200, deadline=None)
def test_backoff_never_exceeds_its_ceiling_or_the_cap(base, cap, attempts, seed):
    b = Backoff(base_s=base, cap_s=cap, rng=random.Random(seed))
    for n in range(attempts):
        assert 0 <= b.next_delay() <= min(cap, base * 2 ** n)


@given(limit=st.integers(50, 6000), steps=st.lists(st.tuples(st.floats(0, 30), st.sampled_from([2, 5, 20, 50])),
                                                    max_size=60))
@settings(max_examples=200, deadline=None)
def test_weight_gate_never_lets_a_minute_go_over_the_limit(limit, steps):
    g, now, spent = WeightGate(limit), 0.0, {}
    for dt, weight in steps:
        now += dt
        now += g.delay(weight, now)  # wait as told
        assert g.delay(weight, now) == 0
        g.spent(weight, now)
        minute = int(now // 60)
        spent[minute] = spent.get(minute, 0) + weight
        assert spent[minute] <= max(limit, weight)


@given(name=st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", min_size=1, max_size=12),
       market=st.sampled_from([Market.SPOT, Market.USDM]))
def test_keys_round_trip_and_never_collide_across_markets(name, market):
    assert split_key(key_of(market, name)) == (market, name)
    assert key_of(Market.SPOT, name) != key_of(Market.USDM, name)
