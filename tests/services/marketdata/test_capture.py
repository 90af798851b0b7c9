"""Capture reading and build_book, on the real captures and on damaged copies of them."""

import gzip

import orjson
import pytest

from services.marketdata.book import parse_units, units_to_str
from services.marketdata.capture import CaptureError, build_book, iter_capture
from services.marketdata.sync import BookSync, SyncResult


def write(path, records, gz=False):
    """Write records as capture lines (gzip if gz); return the path."""
    data = b"".join(orjson.dumps(r) + b"\n" for r in records)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def is_depth(rec):
    return rec["k"] == "ws" and "@depth" in rec["m"]["stream"]


def test_iter_capture_reads_gzip(spot_records, usdm_records):
    assert len(spot_records) == 99574 and len(usdm_records) == 71984
    assert sum(r["k"] == "snapshot" for r in spot_records) == 1
    assert sum(is_depth(r) for r in spot_records) == 6495
    first = spot_records[0]
    assert first["m"]["stream"] == "btcusdt@depth@100ms" and first["m"]["data"]["U"] == 50093239189


def test_iter_capture_plain_and_gzip_agree(tmp_path, spot_records):
    recs = spot_records[:500]
    assert list(iter_capture(write(tmp_path / "a.jsonl", recs))) == recs
    assert list(iter_capture(write(tmp_path / "a.jsonl.gz", recs, gz=True))) == recs
    assert list(iter_capture(str(tmp_path / "a.jsonl"))) == recs  # str paths too


def test_blank_lines_are_skipped(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_bytes(b'{"t":1,"k":"ws","m":{}}\n\n  \n{"t":2,"k":"ws","m":{}}\n')
    assert [r["t"] for r in iter_capture(p)] == [1, 2]


@pytest.mark.parametrize("bad", [b"{not json", b"[1, 2]", b'{"t": 1, "m": {}}', b'"text"'])
def test_malformed_line_names_file_and_line(tmp_path, bad):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"t":1,"k":"ws","m":{}}\n{"t":2,"k":"ws","m":{}}\n' + bad + b"\n")
    with pytest.raises(CaptureError, match=r"bad\.jsonl:3: "):
        list(iter_capture(p))


def test_truncated_gzip_is_a_capture_error(tmp_path, spot_records):
    whole = gzip.compress(b"".join(orjson.dumps(r) + b"\n" for r in spot_records[:2000]))
    p = tmp_path / "cut.jsonl.gz"
    p.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(CaptureError, match=r"cut\.jsonl\.gz: damaged or truncated"):
        list(iter_capture(p))


def test_build_book_spot(spot_path, spot_records):
    got = build_book(spot_path, "btcusdt", depth=5)
    assert got["symbol"] == "BTCUSDT" and got["market"] == "spot"
    assert got["update_id"] == 50093696318 and got["events"] == 6493
    assert got["gaps"] == 0 and got["resyncs"] == 0
    assert got["bids"][0] == ["61602.01", "1.67177"] and got["asks"][0] == ["61602.02", "2.66795"]
    assert len(got["bids"]) == len(got["asks"]) == 5
    bid_px = [parse_units(p) for p, _ in got["bids"]]
    ask_px = [parse_units(p) for p, _ in got["asks"]]
    assert bid_px == sorted(bid_px, reverse=True) and ask_px == sorted(ask_px)
    # The full book equals a direct BookSync replay.
    full = build_book(spot_path, "BTCUSDT")
    s = BookSync("BTCUSDT")
    for r in spot_records:
        if r["k"] == "snapshot":
            s.on_snapshot(r["m"])
        elif is_depth(r):
            s.on_depth(r["m"]["data"])
    bids, asks = s.book.levels()
    assert {parse_units(p): parse_units(q) for p, q in full["bids"]} == bids
    assert {parse_units(p): parse_units(q) for p, q in full["asks"]} == asks
    assert len(full["bids"]) == len(bids) and build_book(spot_path, "BTCUSDT", depth=0)["bids"] == []


def test_build_book_usdm_detects_market(usdm_path):
    got = build_book(usdm_path, "BTCUSDT", depth=3)
    assert got["market"] == "usdm" and got["events"] == 9017
    assert got["update_id"] == 4984057064916
    assert got["bids"][0] == ["63867.4", "0.002"] and got["asks"][0] == ["63867.5", "5.045"]


def test_build_book_without_snapshot_names_update_ids(tmp_path, spot_records):
    p = write(tmp_path / "nosnap.jsonl", [r for r in spot_records[:3000] if r["k"] != "snapshot"])
    with pytest.raises(CaptureError, match=r"no snapshot for BTCUSDT.*U=50093239189 u=50093239202"):
        build_book(p, "BTCUSDT")


def test_build_book_ending_after_gap_names_update_ids(tmp_path, spot_records):
    recs = spot_records[:3000]
    depth_idx = [i for i, r in enumerate(recs) if is_depth(r)]
    gone = recs[depth_idx[100]]["m"]["data"]
    prev = recs[depth_idx[99]]["m"]["data"]
    p = write(tmp_path / "gap.jsonl", recs[:depth_idx[100]] + recs[depth_idx[100] + 1:])
    with pytest.raises(CaptureError, match=rf"gap: after update id {prev['u']} came U={gone['u'] + 1}"):
        build_book(p, "BTCUSDT")


def test_build_book_with_only_stale_snapshot(tmp_path, spot_records):
    recs = [r for r in spot_records[:3000] if r["k"] != "snapshot"]
    stale = {"t": 1, "k": "snapshot", "s": "BTCUSDT",
             "m": {"lastUpdateId": 5, "bids": [["1", "1"]], "asks": [["2", "1"]]}}
    p = write(tmp_path / "stale.jsonl", recs[:10] + [stale] + recs[10:])
    with pytest.raises(CaptureError,
                       match=r"ends unsynced: snapshots lastUpdateId=5 \(line 11: snapshot_too_old"):
        build_book(p, "BTCUSDT")
    # Before any event it is applied, but the first event does not follow it.
    p = write(tmp_path / "early.jsonl", [stale] + recs)
    with pytest.raises(CaptureError,
                       match=r"gap: after update id 5 came U=50093239189 .*line 1: snapshot_applied"):
        build_book(p, "BTCUSDT")


def test_build_book_other_symbol_or_partial_stream(tmp_path, spot_path, spot_records):
    with pytest.raises(CaptureError, match="no depth events for ETHUSDT"):
        build_book(spot_path, "ETHUSDT")
    # Partial-book streams (depth20) are not diffs and must not be applied.
    recs = spot_records[:3000]
    partial = {"t": 1, "k": "ws", "m": {"stream": "btcusdt@depth20@100ms",
                                         "data": {"lastUpdateId": 1, "bids": [], "asks": []}}}
    p = write(tmp_path / "partial.jsonl", recs[:5] + [partial] + recs[5:])
    assert build_book(p, "BTCUSDT")["update_id"] == build_book(
        write(tmp_path / "plain.jsonl", recs), "BTCUSDT")["update_id"]


# -- final books are exact: an independent brute-force rebuild ----------------------------

def brute_force_book(path, usdm: bool):
    """Rebuild with nothing of ours: stdlib json, Decimal, dicts, Binance's rules written out.

    Returns (bids, asks, update_id, events applied) with {Decimal price: Decimal qty} sides.
    """
    import json
    from decimal import Decimal

    snap, events = None, []
    with gzip.open(path, "rt") as fh:
        for line in fh:
            rec = json.loads(line)
            if rec["k"] == "snapshot":
                assert snap is None, "these captures hold one snapshot"
                snap = rec["m"]
            elif rec["m"]["stream"].endswith("@depth@100ms") or rec["m"]["stream"].endswith("@depth@0ms"):
                events.append(rec["m"]["data"])
    last = snap["lastUpdateId"]
    sides = [{Decimal(p): Decimal(q) for p, q in snap[k] if Decimal(q) != 0} for k in ("bids", "asks")]
    uid, applied = last, 0
    for e in events:
        if (e["u"] < last) if usdm else (e["u"] <= last):
            continue
        if applied == 0:  # the first event after the snapshot straddles it
            assert (e["U"] <= last <= e["u"] or e["pu"] == last) if usdm else (e["U"] <= last + 1 <= e["u"])
        else:  # then each event follows the previous one
            assert e["pu"] == uid if usdm else e["U"] == uid + 1
        for side, key in zip(sides, ("b", "a")):
            for p, q in e[key]:
                if Decimal(q) == 0:
                    side.pop(Decimal(p), None)
                else:
                    side[Decimal(p)] = Decimal(q)
        uid, applied = e["u"], applied + 1
    return sides[0], sides[1], uid, applied


@pytest.mark.parametrize("capture, usdm", [("spot_path", False), ("usdm_path", True)])
def test_final_book_equals_brute_force_rebuild(capture, usdm, request):
    from decimal import Decimal

    path = request.getfixturevalue(capture)
    bids, asks, uid, applied = brute_force_book(path, usdm)
    got = build_book(path, "BTCUSDT")
    assert got["market"] == ("usdm" if usdm else "spot")
    assert (got["update_id"], got["events"], got["gaps"]) == (uid, applied, 0)
    # Every level, exactly: same prices, same quantities, nothing more, nothing less.
    assert {Decimal(p): Decimal(q) for p, q in got["bids"]} == bids and len(got["bids"]) == len(bids)
    assert {Decimal(p): Decimal(q) for p, q in got["asks"]} == asks and len(got["asks"]) == len(asks)
    assert [Decimal(p) for p, _ in got["bids"]] == sorted(bids, reverse=True)
    assert [Decimal(p) for p, _ in got["asks"]] == sorted(asks)
    assert Decimal(got["bids"][0][0]) < Decimal(got["asks"][0][0])


def test_gap_repaired_by_a_later_snapshot(tmp_path, spot_path, spot_records):
    """A lost event, then the REST snapshot the shell fetched: the final book is exact again."""
    depth_idx = [i for i, r in enumerate(spot_records) if is_depth(r)]
    lost, fetched = depth_idx[100], depth_idx[110]
    ref = BookSync("BTCUSDT")  # the exchange's view, for the snapshot taken at `fetched`
    for r in spot_records[:fetched + 1]:
        if r["k"] == "snapshot":
            ref.on_snapshot(r["m"])
        elif is_depth(r):
            ref.on_depth(r["m"]["data"])
    bids, asks = ref.book.top(10**6)
    later_snapshot = {"t": 1, "k": "snapshot", "s": "BTCUSDT", "m": {
        "lastUpdateId": ref.book.update_id,
        "bids": [[units_to_str(p), units_to_str(q)] for p, q in bids],
        "asks": [[units_to_str(p), units_to_str(q)] for p, q in asks]}}
    recs = spot_records[:lost] + spot_records[lost + 1:fetched + 1] + [later_snapshot] + spot_records[fetched + 1:]
    got = build_book(write(tmp_path / "repaired.jsonl.gz", recs, gz=True), "BTCUSDT")
    want = build_book(spot_path, "BTCUSDT")
    assert got["gaps"] == 1 and got["resyncs"] == 1
    assert got["events"] == want["events"] - (110 - 100) - 1  # the lost one and those the snapshot covers
    assert (got["update_id"], got["bids"], got["asks"]) == (want["update_id"], want["bids"], want["asks"])


@pytest.mark.parametrize("records", ["spot_records", "usdm_records"])
def test_real_books_never_cross_nor_hold_zero_levels(records, request):
    s = None
    for rec in request.getfixturevalue(records):
        if rec["k"] == "snapshot":
            s.on_snapshot(rec["m"])
        elif is_depth(rec):
            data = rec["m"]["data"]
            if s is None:
                s = BookSync("BTCUSDT", "usdm" if "pu" in data else "spot")
            if s.on_depth(data) is SyncResult.APPLIED:
                (bid, bq), (ask, aq) = s.book.best_bid(), s.book.best_ask()
                assert bid < ask and bq > 0 and aq > 0, s.book.update_id
    bids, asks = s.book.levels()
    assert min(bids.values()) > 0 and min(asks.values()) > 0 and max(bids) < min(asks)
    s.book.check()
