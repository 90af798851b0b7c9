"""Read capture files (JSON lines, optionally gzip) and rebuild a book from one."""

from __future__ import annotations

import gzip
import os
import zlib
from typing import Iterator

import orjson

from services.marketdata.book import units_to_str
from services.marketdata.sync import BadEventError, BookSync, Market, SyncResult


class CaptureError(ValueError):
    """A capture file is unreadable or cannot give what was asked (no snapshot, lost
    sync); it names the file and the line or update ids. The CLI reports it and exits."""


def _iter_lines(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield (line number, record) for each non-blank line; raise CaptureError on bad data."""
    name = os.fspath(path)
    opener = gzip.open if name.endswith(".gz") else open
    loads, decode_error = orjson.loads, orjson.JSONDecodeError
    lineno = 0
    try:
        with opener(name, "rb") as fh:
            # Line iteration over a gzip file is buffered in C: ~500k lines/s with orjson.
            for lineno, line in enumerate(fh, 1):
                try:
                    rec = loads(line)
                except decode_error as e:
                    if not line.strip():
                        continue  # blank lines carry nothing; tolerate them
                    raise CaptureError(f"{name}:{lineno}: not JSON: {e}") from None
                if type(rec) is not dict or "k" not in rec or "m" not in rec or "t" not in rec:
                    raise CaptureError(f"{name}:{lineno}: not a capture record "
                                       f'(need an object with "t", "k", "m"): {line[:80]!r}')
                yield lineno, rec
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        # Typically a recorder killed mid-write: the gzip stream ends early.
        raise CaptureError(f"{name}: damaged or truncated after line {lineno}: {e}") from None


def iter_capture_lines(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield (line number, record) for each record of a capture (see iter_capture): the line
    lets a reader name where a record it cannot use is ("FILE:LINE")."""
    return _iter_lines(path)


CHECK_RECORDS = 1_000  # records check_capture reads to judge a capture's receive times


def check_capture(path: str | os.PathLike) -> None:
    """Refuse, before anything is replayed, a path that cannot be a capture: raises CaptureError
    with one line naming it — missing, a directory, not a regular file, unreadable, empty or not
    starting with a record with an integer receive time "t", or receive times that go backwards
    in most steps of its first CHECK_RECORDS records (a capture is written in the order it was
    received; later steps back are counted by the replay, not refused here)."""
    name = os.fspath(path)
    if not os.path.exists(name):
        raise CaptureError(f"{name}: no such file")
    if os.path.isdir(name):
        raise CaptureError(f"{name}: is a directory, not a capture file")
    if not os.path.isfile(name):
        raise CaptureError(f"{name}: not a regular file")
    prev = prev_line = first_line = None
    steps = back = 0
    try:
        for lineno, rec in _iter_lines(name):
            t = rec["t"]
            if prev is None:
                if type(t) is not int:
                    break
                prev, first_line = t, lineno
                continue
            if type(t) is int:
                steps += 1
                back += t < prev
                prev, prev_line = t, lineno
            if steps >= CHECK_RECORDS:
                break
    except CaptureError as exc:
        if prev is None:  # not even a first record: not a capture at all
            raise CaptureError(f"{exc} — not a capture") from None
    except OSError as exc:
        raise CaptureError(f"{name}: {exc.strerror or exc}") from None
    if prev is None:
        raise CaptureError(f"{name}: not a capture (no record with an integer receive time \"t\")")
    if back and back * 2 > steps:
        raise CaptureError(f"{name}:{first_line}-{prev_line}: receive times (\"t\") go backwards in {back} of "
                           f"{steps} steps: not a capture in our format (records are written in the order "
                           f"they were received)")


def iter_capture(path: str | os.PathLike) -> Iterator[dict]:
    """Yield each record of a .jsonl or .jsonl.gz capture as a dict ({"t","k","m"[,"s"]}).

    Blank lines are skipped. Raises CaptureError naming the file and line for a
    line that is not a JSON object with "t", "k" and "m", or for a damaged gzip;
    OSError if the file cannot be opened.
    """
    for _, rec in _iter_lines(path):
        yield rec


def _depth_data(rec: dict, stream_name: str, sym: str) -> dict | None:
    """Return the diff-depth event of `sym` carried by a "ws" record, else None."""
    m = rec["m"]
    if type(m) is not dict:
        return None
    stream = m.get("stream")
    if stream is None:
        # A raw (non-combined) stream: the message is the event itself.
        return m if m.get("e") == "depthUpdate" and m.get("s") == sym and "U" in m else None
    # "btcusdt@depth", "btcusdt@depth@100ms", "btcusdt@depth@0ms"; not the
    # partial-book streams "btcusdt@depth20@100ms", which are not diffs.
    if type(stream) is not str or stream.split("@", 2)[:2] != stream_name:
        return None
    data = m.get("data")
    return data if type(data) is dict else None


def build_book(path: str | os.PathLike, symbol: str, market: Market | str | None = None,
               depth: int | None = None) -> dict:
    """Rebuild one symbol's order book from a capture with BookSync.

    Takes the capture path, the symbol ("BTCUSDT", any case), the market
    (None: USD-M if depth events carry "pu", else spot) and how many levels
    per side to return (None: all). Returns {"symbol", "update_id", "bids",
    "asks", "events", "market", "gaps", "resyncs"}, with bids/asks as
    [price_str, qty_str] canonical decimal strings, best first, and events the
    number of depth events applied. Raises CaptureError if the file is bad,
    has no depth events or no snapshot for the symbol, or ends unsynced
    (after a gap or with only unusable snapshots), naming the update ids.
    """
    name = os.fspath(path)
    sym = symbol.upper()
    stream_name = [sym.lower(), "depth"]
    sync: BookSync | None = None
    early_snapshots: list[tuple[int, dict]] = []  # snapshots seen before any event
    snapshots: list[tuple[int, int, SyncResult]] = []  # (line, lastUpdateId, result)
    n_depth = 0
    first_ids: tuple[int, int] | None = None

    def feed_snapshot(lineno: int, snap: dict) -> None:
        try:
            res = sync.on_snapshot(snap)
        except BadEventError as e:
            raise CaptureError(f"{name}:{lineno}: {e}") from None
        snapshots.append((lineno, snap.get("lastUpdateId"), res))

    for lineno, rec in _iter_lines(name):
        kind = rec["k"]
        if kind == "ws":
            data = _depth_data(rec, stream_name, sym)
            if data is None:
                continue
            if sync is None:
                mk = market if market is not None else (Market.USDM if "pu" in data else Market.SPOT)
                sync = BookSync(sym, Market(mk))
                for ln, snap in early_snapshots:
                    feed_snapshot(ln, snap)
            n_depth += 1
            if first_ids is None:
                first_ids = (data.get("U"), data.get("u"))
            try:
                sync.on_depth(data)
            except BadEventError as e:
                raise CaptureError(f"{name}:{lineno}: {e}") from None
        elif kind == "snapshot" and str(rec.get("s", "")).upper() == sym:
            if type(rec["m"]) is not dict:
                raise CaptureError(f"{name}:{lineno}: snapshot record without a snapshot object")
            if sync is None:
                early_snapshots.append((lineno, rec["m"]))
            else:
                feed_snapshot(lineno, rec["m"])

    if sync is None:
        raise CaptureError(f"{name}: no depth events for {sym}"
                           + (f" ({len(early_snapshots)} snapshots)" if early_snapshots else ""))
    if not sync.synced:
        raise CaptureError(_unsynced_reason(name, sym, sync, snapshots, n_depth, first_ids))

    n = None if depth is None else max(depth, 0)
    bids, asks = sync.book.top(n if n is not None else max(sync.book.depth()))
    return {
        "symbol": sym,
        "update_id": sync.book.update_id,
        "bids": [[units_to_str(p), units_to_str(q)] for p, q in bids],
        "asks": [[units_to_str(p), units_to_str(q)] for p, q in asks],
        "events": sync.events_applied,
        "market": sync.market.value,
        "gaps": sync.gaps,
        "resyncs": sync.resyncs,
    }


def _unsynced_reason(name: str, sym: str, sync: BookSync, snapshots: list,
                     n_depth: int, first_ids: tuple | None) -> str:
    """Explain, with update ids, why a capture ended without a synced book."""
    buffered = sync.buffered_range()
    waiting = (f"{sync.buffered} events U={buffered[0]}..u={buffered[1]} wait for a snapshot"
               if buffered else "no events buffered")
    if not snapshots:
        return (f"{name}: no snapshot for {sym}: {n_depth} depth events from "
                f"U={first_ids[0]} u={first_ids[1]}; {waiting}")
    tried = ", ".join(f"lastUpdateId={last} (line {ln}: {res.value})" for ln, last, res in snapshots)
    gap = f"last update-id gap: {sync.last_gap}; " if sync.last_gap is not None else ""
    return f"{name}: {sym} ends unsynced: {gap}snapshots {tried}; {waiting}"
