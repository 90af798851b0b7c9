"""The pure core of `qf parity` (services/backtest/parity.py reads the databases and prints): two
runs' orders in (`Run` of `Item`s), the pairs and the orders only one run made out, with what differs
and why where the rows say (`compare`). No I/O; times are the rows' own.

Matching (the client order ids differ between the runs, and a free-running replay stamps books with
the wall clock, not the capture's): a fill carries `exch_ts`, the exchange time of the book or trade
it was matched on, which both runs share. So
1. orders with fills pair by symbol and side, first fills' `exch_ts` within the tolerance, nearest
   first (an equal qty before an unequal one);
2. the clocks are aligned by those pairs' `created_ts` (`ClockMap`: a slope, 1/speed for a faster
   replay, and a local median offset);
3. the rest (no fills: rejected by the broker, still open, or denied by risk before the broker —
   `risk_events` DENIED rows, which have no side) pair by symbol, side where both have one, and
   aligned `created_ts` within the tolerance, nearest first.
Every order and every denial of either run is in the report exactly once: in a pair, or alone.
"""
from __future__ import annotations

import statistics
import time
from bisect import bisect_left
from dataclasses import dataclass, field
from decimal import Decimal, localcontext
from typing import Mapping

from shared.money import MONEY, ZERO, text, to_decimal

SAME_MS = 0.001  # latencies closer than this are the same
NEAREST_S = 3600  # an order alone names its nearest counterpart up to this far away
# causes that explain a difference by themselves (the replay's pace is not named beside them)
EXPLAINED = frozenset({"risk_denied", "risk_gave_up", "broker_rejected", "before_capture", "after_capture",
                       "session_started_after", "session_stopped_before", "backtest_gap", "no_clock"})

# -- the runs' rows ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class FillView:
    """One fill as `fills` stores it."""
    price: Decimal
    qty: Decimal
    fee: Decimal
    fee_asset: str
    liquidity: str
    exch_ts: int  # ms, the exchange time of the book or trade it was matched on
    ts: int


@dataclass(slots=True)
class Item:
    """One order of a run as `orders` stores it (kind "order"), or one risk denied before the
    broker saw it (kind "denied", a `risk_events` DENIED row: no side, qty or fills).
    `ts` is `created_ts` (when the broker took it) or the denial's time."""
    kind: str
    client_order_id: str
    symbol: str
    ts: int
    order_id: str = ""
    side: str = ""
    qty: Decimal | None = None
    status: str = ""
    reason: str = ""  # the broker's reason (orders), risk's code (denied)
    text: str = ""  # risk's text (denied)
    arrival_ts: int | None = None
    filled_qty: Decimal | None = None
    avg_price: Decimal | None = None
    decision_mid: Decimal | None = None
    arrival_mid: Decimal | None = None
    fills: tuple[FillView, ...] = ()
    denial: str = ""  # risk also denied this order after sending it (BROKER_UNAVAILABLE, BROKER_ERROR)

    @property
    def first_exch(self) -> int | None:
        return self.fills[0].exch_ts if self.fills else None

    @property
    def latency_ms(self) -> float | None:
        """arrival_ts - created_ts: the entry latency (+ feed lag) the broker applied."""
        if self.kind != "order" or self.arrival_ts is None:
            return None
        return round((self.arrival_ts - self.ts) / 1e6, 3)

    def as_dict(self) -> dict:
        d = {"kind": self.kind, "client_order_id": self.client_order_id, "symbol": self.symbol, "ts": self.ts}
        if self.kind == "denied":
            return {**d, "code": self.reason, "text": self.text}
        return {**d, "order_id": self.order_id, "side": self.side, "qty": _t(self.qty), "status": self.status,
                "reason": self.reason, "arrival_ts": self.arrival_ts, "latency_ms": self.latency_ms,
                "filled_qty": _t(self.filled_qty), "avg_price": _t(self.avg_price),
                "decision_mid": _t(self.decision_mid), "arrival_mid": _t(self.arrival_mid),
                "fills": len(self.fills), "first_exch_ts": self.first_exch,
                **({"risk_denial": self.denial} if self.denial else {})}


@dataclass(slots=True)
class Run:
    """A run's orders and denials, and the span of its own clock it covers (ns): for the paper
    session its first and last rows; for the backtest the capture's first and last records."""
    items: list[Item]
    first_ts: int | None = None
    last_ts: int | None = None
    gaps: list[dict] = field(default_factory=list)  # backtest: unrepaired gaps (symbol, ts, after_update_id)


def _t(x: Decimal | None) -> str | None:
    return None if x is None else text(x)


def _dec(v) -> Decimal | None:
    """A money column's text (DecimalText) → Decimal; a float is refused (money never passes one)."""
    return None if v is None or v == "" else to_decimal(v, "money column")


# -- reading a database (read-only) ---------------------------------------------------------------

def _pairs(left: list[Item], right: list[Item], key, pos_l, pos_r, rank, tol: float) -> list[tuple[Item, Item]]:
    """Pairs of a `left` and a `right` item of the same `key` whose positions (`pos_l`, `pos_r`)
    are within `tol` and whose `rank(l, r)` is not None; the best first (rank, distance, then
    time), each item in at most one pair."""
    groups: dict = {}
    for r in right:
        groups.setdefault(key(r), []).append((pos_r(r), r.ts, r))
    index = {}
    for k, g in groups.items():
        g.sort(key=lambda x: (x[0], x[1]))
        index[k] = ([x[0] for x in g], [x[2] for x in g])
    cands = []
    for i, l in enumerate(left):
        found = index.get(key(l))
        if found is None:
            continue
        positions, items = found
        p = pos_l(l)
        j = bisect_left(positions, p - tol)
        while j < len(items) and positions[j] <= p + tol:
            r = items[j]
            ranked = rank(l, r)
            if ranked is not None:
                cands.append((ranked, abs(positions[j] - p), l.ts, r.ts, i, j, l, r))
            j += 1
    cands.sort(key=lambda c: c[:6])
    used_l, used_r, out = set(), set(), []
    for *_, l, r in cands:
        if id(l) in used_l or id(r) in used_r:
            continue
        used_l.add(id(l))
        used_r.add(id(r))
        out.append((l, r))
    return out


def _same_qty(a: Item, b: Item) -> int:
    return 0 if a.qty == b.qty else 1


def _rest_rank(a: Item, b: Item) -> int | None:
    if a.side and b.side:  # two orders: same side only, an equal qty first
        return None if a.side != b.side else _same_qty(a, b)
    return 2  # a denial (no side): after any order-with-order pair


@dataclass(frozen=True, slots=True)
class ClockMap:
    """The paper session's clock against the capture's, from the filled pairs' (capture ts, paper ts):
    paper = slope × capture + a local intercept (the median over the WINDOW pairs nearest in capture
    time). The slope is 1 for a live session or a replay at speed 1, 1/speed for a faster replay;
    the local median follows drift and shrugs off a pair whose hops were slow. Times are kept
    relative to the first pair (`c0`, `w0`), so the floats stay exact to the nanosecond."""
    c0: int
    w0: int
    captures: tuple[int, ...]  # sorted, relative to c0
    intercepts: tuple[float, ...]  # (paper − w0) − slope × capture, in the same order
    slope: float

    WINDOW = 9

    @classmethod
    def fit(cls, points: list[tuple[int, int]]) -> "ClockMap":
        """From (capture ts, paper ts) points (at least one). The slope is the median of the
        slopes between each point and the one half the list later (robust, O(n)); 1 when the
        points cannot say (one point, or no positive slope)."""
        points = sorted(points)
        c0, w0 = points[0]
        rel = [(c - c0, w - w0) for c, w in points]
        half = len(rel) // 2
        slopes = [(rel[i + half][1] - rel[i][1]) / (rel[i + half][0] - rel[i][0])
                  for i in range(len(rel) - half) if half and rel[i + half][0] > rel[i][0]]
        slope = statistics.median(slopes) if slopes else 1.0
        if not slope > 0:
            slope = 1.0
        return cls(c0, w0, tuple(c for c, _ in rel), tuple(w - slope * c for c, w in rel), slope)

    @classmethod
    def identity(cls) -> "ClockMap":
        """One clock (a live session beside its recorder), for runs without a filled pair."""
        return cls(0, 0, (), (), 1.0)

    def _local(self, c: float, skip: int | None = None) -> float:
        if not self.captures:
            return 0.0
        i = bisect_left(self.captures, c)
        lo = max(0, min(i - self.WINDOW // 2, len(self.captures) - self.WINDOW))
        near = [self.intercepts[j] for j in range(lo, min(len(self.captures), lo + self.WINDOW)) if j != skip]
        return statistics.median(near) if near else statistics.median(self.intercepts)

    def to_paper(self, c: int) -> int:
        rc = c - self.c0
        return self.w0 + round(self.slope * rc + self._local(rc))

    def to_capture(self, w: int) -> int:
        rw = w - self.w0
        c = (rw - (statistics.median(self.intercepts) if self.intercepts else 0.0)) / self.slope
        for _ in range(2):  # the local intercept depends on where w lands
            c = (rw - self._local(c)) / self.slope
        return self.c0 + round(c)

    def residual_ns(self, c: int, w: int) -> int:
        """How much later than its neighbours say a paper order at `w` reached the broker, for a
        pair at capture time `c` (its own point left out of the median)."""
        rc = c - self.c0
        i = bisect_left(self.captures, rc)
        skip = i if i < len(self.captures) and self.captures[i] == rc else None
        return round(w - self.w0 - self.slope * rc - self._local(rc, skip))

    def describe(self) -> dict:
        return {"pairs": len(self.captures), "slope": self.slope, "offset_ns": self.to_paper(self.c0) - self.c0}


def match(paper: list[Item], backtest: list[Item], tolerance_ns: int) -> tuple[list, list, list, ClockMap | None]:
    """(pairs [(paper, backtest, "fill" | "time")], paper alone, backtest alone, clock): the rules of
    the module's docstring. Without a filled pair the clock is the identity when the runs' times
    overlap (a live session beside its recorder), else None (then only orders with fills pair)."""
    by_fill = _pairs([i for i in paper if i.fills], [i for i in backtest if i.fills], lambda i: (i.symbol, i.side),
                     lambda i: i.first_exch, lambda i: i.first_exch, _same_qty, tolerance_ns / 1e6)
    clock = None
    if by_fill:
        clock = ClockMap.fit([(b.ts, p.ts) for p, b in by_fill])
    elif paper and backtest and min(i.ts for i in paper) <= max(i.ts for i in backtest) \
            and min(i.ts for i in backtest) <= max(i.ts for i in paper):
        clock = ClockMap.identity()
    paired = {id(x) for pair in by_fill for x in pair}
    by_time: list = []
    if clock is not None:
        by_time = _pairs([i for i in paper if id(i) not in paired], [i for i in backtest if id(i) not in paired],
                         lambda i: i.symbol, lambda i: clock.to_capture(i.ts), lambda i: i.ts, _rest_rank,
                         tolerance_ns)
    paired |= {id(x) for pair in by_time for x in pair}
    pairs = sorted([(p, b, "fill") for p, b in by_fill] + [(p, b, "time") for p, b in by_time],
                   key=lambda x: (x[1].ts, x[0].ts))
    return pairs, [i for i in paper if id(i) not in paired], [i for i in backtest if id(i) not in paired], clock


def _fills(i: Item) -> dict:
    """What an order's fills add up to: count, qty, VWAP, fees, liquidity."""
    if not i.fills:
        return {"count": 0, "qty": "0", "avg_price": None, "fee": "0", "fee_asset": None, "liquidity": ""}
    with localcontext(MONEY):
        qty = sum((f.qty for f in i.fills), ZERO)
        avg = sum((f.price * f.qty for f in i.fills), ZERO) / qty
        fee = sum((f.fee for f in i.fills), ZERO)
    return {"count": len(i.fills), "qty": text(qty), "avg_price": text(avg.quantize(Decimal("1e-8"))),
            "fee": text(fee), "fee_asset": i.fills[0].fee_asset,
            "liquidity": "+".join(sorted({f.liquidity for f in i.fills}))}


def _ticks(diff: Decimal, tick: Decimal) -> str:
    with localcontext(MONEY):
        return text((diff / tick).quantize(Decimal("1e-4")))


def _ms(ns: int) -> float:
    return round(ns / 1e6, 3)


def _pair(p: Item, b: Item, how: str, clock: ClockMap | None, tick: Decimal) -> dict:
    """One pair: both items, their fills side by side, what differs and the known causes."""
    fp, fb = _fills(p), _fills(b)
    out = {"matched_by": how, "paper": p.as_dict(), "backtest": b.as_dict(),
           "latency_ms": {"paper": p.latency_ms, "backtest": b.latency_ms},
           "residual_ms": None if clock is None else _ms(clock.residual_ns(b.ts, p.ts)),
           "fills": {"paper": fp, "backtest": fb, "price_diff_ticks": None, "paper_cost_ticks": None}}
    diffs = []
    if p.kind != b.kind:
        diffs.append("kind")
    elif p.kind == "denied":
        if p.reason != b.reason:
            diffs.append("code")
    else:
        for name, a, c in (("qty", p.qty, b.qty), ("status", p.status, b.status), ("filled_qty", fp["qty"], fb["qty"]),
                           ("fills", fp["count"], fb["count"]), ("price", fp["avg_price"], fb["avg_price"]),
                           ("fee", fp["fee"], fb["fee"]), ("liquidity", fp["liquidity"], fb["liquidity"]),
                           ("book", p.first_exch, b.first_exch)):
            if a != c:
                diffs.append(name)
        if fp["avg_price"] is not None and fb["avg_price"] is not None:
            diff = Decimal(fp["avg_price"]) - Decimal(fb["avg_price"])
            out["fills"]["price_diff_ticks"] = _ticks(diff, tick)
            out["fills"]["paper_cost_ticks"] = _ticks(diff if p.side == "BUY" else -diff, tick)
    out["differences"] = diffs
    out["causes"] = _pair_causes(p, b, out["residual_ms"]) if diffs else []
    return out


def _pair_causes(p: Item, b: Item, residual_ms: float | None) -> list[dict]:
    causes = []
    for run, i in (("paper", p), ("backtest", b)):
        if i.kind == "denied":
            causes.append({"code": "risk_denied", "run": run, "risk_code": i.reason,
                           "text": f"risk denied it in the {run} run only: {i.reason} ({i.text[:120]})"
                           if p.kind != b.kind else f"risk denied it in the {run} run: {i.reason}"})
        if i.denial:
            causes.append({"code": "risk_gave_up", "run": run, "risk_code": i.denial,
                           "text": f"risk answered REJECTED {i.denial} in the {run} run after sending it on"})
        if i.status == "REJECTED":
            causes.append({"code": "broker_rejected", "run": run, "reason": i.reason,
                           "text": f"the broker rejected it in the {run} run: {i.reason or 'no reason'}"})
    if p.kind == b.kind == "order":
        lp, lb = p.latency_ms, b.latency_ms
        if lp is not None and lb is not None and abs(lp - lb) >= SAME_MS:
            causes.append({"code": "latency", "paper_ms": lp, "backtest_ms": lb,
                           "text": f"entry latency: {lp} ms in the paper session, {lb} ms modelled in the backtest"})
        if residual_ms is not None and abs(residual_ms) >= 1.0:
            causes.append({"code": "decision_delay", "ms": residual_ms,
                           "text": f"the paper order reached the broker {abs(residual_ms)} ms "
                                   f"{'later' if residual_ms > 0 else 'earlier'} than the pairs around it say "
                                   f"(the hops strategy → risk → broker, or the replay's pace)"})
        if p.decision_mid is not None and b.decision_mid is not None and p.decision_mid != b.decision_mid:
            causes.append({"code": "decision_book", "paper_mid": text(p.decision_mid),
                           "backtest_mid": text(b.decision_mid),
                           "text": f"a different book when the broker took it: mid {text(p.decision_mid)} "
                                   f"(paper) vs {text(b.decision_mid)} (backtest)"})
        if p.arrival_mid is not None and b.arrival_mid is not None and p.arrival_mid != b.arrival_mid:
            causes.append({"code": "arrival_book", "paper_mid": text(p.arrival_mid),
                           "backtest_mid": text(b.arrival_mid),
                           "text": f"a different book at arrival: mid {text(p.arrival_mid)} (paper) vs "
                                   f"{text(b.arrival_mid)} (backtest)"})
        if p.first_exch is not None and b.first_exch is not None and p.first_exch != b.first_exch:
            d = p.first_exch - b.first_exch
            causes.append({"code": "fill_book", "paper_exch_ts": p.first_exch, "backtest_exch_ts": b.first_exch,
                           "text": f"filled on market data {abs(d)} ms {'later' if d > 0 else 'earlier'} in "
                                   f"exchange time in the paper session"})
    return causes


class _Nearby:
    """The other run's items by symbol, in capture time, for naming an order's nearest counterpart."""

    def __init__(self, items: list[Item], to_capture) -> None:
        self.by: dict[str, tuple[list[int], list[Item]]] = {}
        rows: dict[str, list] = {}
        for o in items:
            rows.setdefault(o.symbol, []).append((to_capture(o.ts), o.client_order_id, o))
        for symbol, r in rows.items():
            r.sort(key=lambda x: (x[0], x[1]))
            self.by[symbol] = ([x[0] for x in r], [x[2] for x in r])

    def nearest(self, c: int, item: Item) -> dict | None:
        """The item of `item`'s symbol (and side, where both have one) nearest to capture time `c`,
        within NEAREST_S: {client_order_id, delta_ms (its time − c)}, or None."""
        found = self.by.get(item.symbol)
        if found is None:
            return None
        times, items = found
        hi = bisect_left(times, c)
        lo, best = hi - 1, None
        limit = NEAREST_S * 1_000_000_000
        while lo >= 0 or hi < len(times):  # outwards from c, the nearer side first
            down = c - times[lo] if lo >= 0 else None
            up = times[hi] - c if hi < len(times) else None
            if up is None or (down is not None and down <= up):
                j, d, lo = lo, down, lo - 1
            else:
                j, d, hi = hi, up, hi + 1
            if d > limit:
                break
            o = items[j]
            if not (o.side and item.side and o.side != item.side):
                best = (times[j] - c, o)
                break
        if best is None:
            return None
        return {"client_order_id": best[1].client_order_id, "delta_ms": _ms(best[0])}


def _alone(i: Item, run: str, c: int | None, paper: Run, backtest: Run, clock: ClockMap | None,
           others: _Nearby | None) -> dict:
    """An order (or denial) only one run has, at capture time `c` (None: the clocks are not aligned)."""
    causes = []
    if i.kind == "denied":
        causes.append({"code": "risk_denied", "run": run, "risk_code": i.reason,
                       "text": f"risk denied it in the {run} run: {i.reason} ({i.text[:120]})"})
    if i.denial:
        causes.append({"code": "risk_gave_up", "run": run, "risk_code": i.denial,
                       "text": f"risk answered REJECTED {i.denial} after sending it on"})
    if c is None:
        causes.append({"code": "no_clock", "text": "no pair of filled orders aligns the clocks: only orders with "
                                                   "fills could pair"})
    elif run == "paper":
        if backtest.first_ts is not None and c < backtest.first_ts:
            causes.append({"code": "before_capture", "s": round((backtest.first_ts - c) / 1e9, 3),
                           "text": f"the paper session made it {(backtest.first_ts - c) / 1e9:.3f} s before the "
                                   f"capture's first record"})
        elif backtest.last_ts is not None and c > backtest.last_ts:
            causes.append({"code": "after_capture", "s": round((c - backtest.last_ts) / 1e9, 3),
                           "text": f"the paper session made it {(c - backtest.last_ts) / 1e9:.3f} s after the "
                                   f"capture's end (it ran on, or its replay looped)"})
        for g in backtest.gaps:
            if g.get("symbol") == i.symbol and c >= g.get("ts", 0):
                causes.append({"code": "backtest_gap", "text": f"the backtest's {i.symbol} book broke at a gap "
                                                               f"never repaired (after update id "
                                                               f"{g.get('after_update_id')}): its trading ended there"})
    else:
        w = clock.to_paper(c)
        if paper.first_ts is not None and w < paper.first_ts:
            causes.append({"code": "session_started_after", "s": round((paper.first_ts - w) / 1e9, 3),
                           "text": f"the paper session's first row is {(paper.first_ts - w) / 1e9:.3f} s after "
                                   f"this point of the capture: it started later"})
        elif paper.last_ts is not None and w > paper.last_ts:
            causes.append({"code": "session_stopped_before", "s": round((w - paper.last_ts) / 1e9, 3),
                           "text": f"the paper session's last row is {(w - paper.last_ts) / 1e9:.3f} s before "
                                   f"this point of the capture: it stopped before the capture's end"})
    if i.kind == "order" and i.status == "REJECTED":
        causes.append({"code": "broker_rejected", "run": run, "reason": i.reason,
                       "text": f"the broker rejected it: {i.reason or 'no reason'}"})
    out = {run: i.as_dict(), "capture_ts": c, "latency_ms": i.latency_ms, "fills": _fills(i), "causes": causes}
    if others is not None and c is not None:
        out["nearest"] = others.nearest(c, i)
    return out


def compare(paper: Run, backtest: Run, ticks: Mapping[str, Decimal], tolerance_ns: int,
            default_tick: Decimal = Decimal("0.01"), replay_speed: float | None = None) -> dict:
    """The report (JSON-ready) of `paper` against `backtest`: counts, the clocks, every pair with
    its fills compared (price differences in ticks of `ticks[symbol]`, else `default_tick`) and
    causes, every order alone with its causes. `replay_speed`: the paper session's, when it
    replayed a capture (not 1: its wall-clock timers spanned other stretches of capture time).
    Pure: rows in, report out."""
    pairs, p_alone, b_alone, clock = match(paper.items, backtest.items, tolerance_ns)
    report_pairs = [_pair(p, b, how, clock, ticks.get(b.symbol, default_tick)) for p, b, how in pairs]
    near_b = _Nearby(backtest.items, lambda t: t) if clock is not None and p_alone else None
    near_p = _Nearby(paper.items, clock.to_capture) if clock is not None and b_alone else None
    paper_only = [_alone(i, "paper", None if clock is None else clock.to_capture(i.ts), paper, backtest, clock,
                         near_b) for i in p_alone]
    backtest_only = [_alone(i, "backtest", None if clock is None else i.ts, paper, backtest, clock, near_p)
                     for i in b_alone]
    # a difference changes what follows (position, cooldown, limits): name the earliest before each
    marks = sorted([pr["backtest"]["ts"] for pr in report_pairs if pr["differences"]]
                   + [a["capture_ts"] for a in paper_only + backtest_only if a["capture_ts"] is not None])
    for entry in report_pairs + paper_only + backtest_only:
        c = entry["capture_ts"] if "capture_ts" in entry else entry["backtest"]["ts"]
        if "differences" in entry and not entry["differences"]:
            continue
        specific = [x for x in entry["causes"] if x["code"] not in ("latency", "decision_delay")]
        if replay_speed is not None and replay_speed != 1 and not any(x["code"] in EXPLAINED for x in specific):
            pace = "as fast as it could" if replay_speed == 0 else f"at speed {replay_speed:g}"
            entry["causes"].append({"code": "replay_speed", "speed": replay_speed,
                                    "text": f"the paper session replayed the capture {pace}: its wall-clock timers "
                                            f"(the strategy's cooldown, risk's rate limits and stale-book check) "
                                            f"spanned other stretches of capture time than in the backtest"})
        if not specific:
            if marks and c is not None and marks[0] < c:
                entry["causes"].append({"code": "earlier_difference", "ts": marks[0],
                                        "text": f"follows the first difference at {_clock(marks[0])} UTC "
                                                f"(position, cooldown and limits depend on earlier orders)"})
            elif not entry["causes"]:
                entry["causes"].append({"code": "unknown", "text": "no cause known"})
    count = {k: sum(1 for i in run.items if i.kind == kind) for k, run, kind in (
        ("paper_orders", paper, "order"), ("paper_denied", paper, "denied"),
        ("backtest_orders", backtest, "order"), ("backtest_denied", backtest, "denied"))}
    count.update(matched=len(pairs), matched_by_fill=sum(1 for x in pairs if x[2] == "fill"),
                 matched_by_time=sum(1 for x in pairs if x[2] == "time"),
                 alike=sum(1 for pr in report_pairs if not pr["differences"]),
                 differ=sum(1 for pr in report_pairs if pr["differences"]),
                 paper_only=len(paper_only), backtest_only=len(backtest_only))
    return {"counts": count, "clock": None if clock is None else clock.describe(),
            "tolerance_ms": tolerance_ns / 1e6, "first_difference_ts": marks[0] if marks else None,
            "paper_span": [paper.first_ts, paper.last_ts], "capture_span": [backtest.first_ts, backtest.last_ts],
            "pairs": report_pairs, "paper_only": paper_only, "backtest_only": backtest_only}


# -- the report for a person ----------------------------------------------------------------------


def _clock(ns: int | None, date: bool = False) -> str:
    if ns is None:
        return "?"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S" if date else "%H:%M:%S", time.gmtime(ns // 1_000_000_000))
    return f"{stamp}.{ns // 1_000_000 % 1000:03d}"
