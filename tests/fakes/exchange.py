"""The fake exchange's engine side: a capture as one live timeline, with the exchange's own books."""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from decimal import Decimal
from functools import lru_cache

from services.marketdata.capture import iter_capture

TOP_N = 10


@dataclass(frozen=True, slots=True)
class Msg:
    """One stream message of the timeline: `kind` is depth, trade or bookTicker."""

    t_ns: int  # relative to the start of the timeline
    symbol: str
    kind: str
    data: dict


@lru_cache(maxsize=4)
def _load(path: str) -> tuple[dict, tuple[tuple[int, str, dict], ...]]:
    """(first snapshot, ((t, kind, data), …)) of a capture, read once per test session."""
    snap, msgs = None, []
    for rec in iter_capture(path):
        if rec["k"] == "snapshot" and snap is None:
            snap = rec["m"]
        elif rec["k"] == "ws":
            kind = rec["m"]["stream"].split("@")[1]
            kind = "depth" if kind == "depth" else kind
            msgs.append((rec["t"], kind, rec["m"]["data"]))
    return snap, tuple(msgs)


class TruthBook:
    """One symbol's book as the exchange holds it: exact Decimal keys, the original strings kept
    for snapshots. Written independently of services.marketdata.book on purpose."""

    def __init__(self, snap: dict) -> None:
        self.u = snap["lastUpdateId"]
        self.bids = {Decimal(p): (p, q) for p, q in snap["bids"] if Decimal(q)}
        self.asks = {Decimal(p): (p, q) for p, q in snap["asks"] if Decimal(q)}

    def apply(self, ev: dict) -> None:
        for side, levels in ((self.bids, ev["b"]), (self.asks, ev["a"])):
            for p, q in levels:
                if Decimal(q):
                    side[Decimal(p)] = (p, q)
                else:
                    side.pop(Decimal(p), None)
        self.u = ev["u"]

    def snapshot(self, limit: int) -> dict:
        bids = [list(self.bids[k]) for k in heapq.nlargest(limit, self.bids)]
        asks = [list(self.asks[k]) for k in heapq.nsmallest(limit, self.asks)]
        return {"lastUpdateId": self.u, "bids": bids, "asks": asks}

    def top(self, n: int = TOP_N) -> tuple[list[list[float]], list[list[float]]]:
        """Top n levels per side as the floats a `book.*` message carries, best first."""
        bids = [[float(self.bids[k][0]), float(self.bids[k][1])] for k in heapq.nlargest(n, self.bids)]
        asks = [[float(self.asks[k][0]), float(self.asks[k][1])] for k in heapq.nsmallest(n, self.asks)]
        return bids, asks


def _straddles(ev: dict, last: int, usdm: bool) -> bool:
    if usdm:
        return ev["U"] <= last <= ev["u"] or ev.get("pu") == last
    return ev["U"] <= last + 1 <= ev["u"]


def timeline(captures: dict[str, str], usdm: bool) -> tuple[dict[str, TruthBook], list[Msg]]:
    """Merge captures ({SYMBOL: path}; one capture may serve several symbols) into one timeline
    that starts at each symbol's snapshot; return the truth books at that point and the
    messages after it, each symbol relabelled (`s`) to its name here."""
    books, merged = {}, []
    for symbol, path in captures.items():
        snap, msgs = _load(path)
        books[symbol] = TruthBook(snap)
        started, first_t = False, None
        for t, kind, data in msgs:
            if kind == "depth" and not started:
                if data["u"] < snap["lastUpdateId"] + (0 if usdm else 1):
                    continue
                if not _straddles(data, snap["lastUpdateId"], usdm):
                    raise ValueError(f"{path}: no event straddles the snapshot")
                started = True
            if not started:
                continue
            first_t = t if first_t is None else first_t
            merged.append(Msg(t - first_t, symbol, kind, {**data, "s": symbol}))
    merged.sort(key=lambda m: m.t_ns)  # stable: each symbol keeps its own order
    return books, merged
