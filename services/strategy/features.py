"""Pure order-book and trade-flow features (issue #13 part 1): one core, O(1) per event.

Who calls what: the strategy shell (or a backtest) feeds every `book.{SYMBOL}` message to
`Features.on_book(book, now_ns)` and every `trade.{SYMBOL}` message to `Features.on_trade(trade,
now_ns)`, in receive order, with `now_ns` the time it sees the event (wall clock live, the event's
recorded time in a replay); `Features.vector(symbol)` then reads the features as of the latest
event. No I/O, no clock: time is always an argument. `now_ns` must not go backwards; an earlier
time is taken as the latest time seen (the clock is clamped, never rewound). `advance(now_ns)`
moves a symbol's clock without an event (windows expire, the realised-variance sum decays).

Definitions, exactly as implemented. Notation: a book event n arrives at time t_n (its `now_ns`);
its top-N levels (N = `FeatureParams.levels`) are Pb^(m), qb^(m) (bids) and Pa^(m), qa^(m) (asks),
m = 1..N, best first. L1 is m = 1. mid_n = (Pb^(1) + Pa^(1)) / 2 from the levels (not `book.mid`);
spread_bps_n = (Pa^(1) - Pb^(1)) / mid_n * 1e4. A window w holds the events with t in (now - w, now].

* OFI per level (Cont, Kukanov & Stoikov 2014, e_n applied level by level), book n vs book n-1:
      e^(m)_n = 1{Pb_n >= Pb_n-1} qb_n - 1{Pb_n <= Pb_n-1} qb_n-1
              - 1{Pa_n <= Pa_n-1} qa_n + 1{Pa_n >= Pa_n-1} qa_n-1        (all at level m)
  A level missing from one of the two books counts as qty 0 at the other book's price (no price
  move: it contributes +q_n if it appeared, -q_n-1 if it vanished). The first book of a symbol has
  e = 0 at every level (nothing to compare with), but it is an event of its windows.
* ofi_l1[w]    = sum of e^(1)_n over the book events in window w.
* ofi_multi[w] = (sum over m = 1..N of sum of e^(m)_n over window w) / D_w, where
  D_w = mean over the window's book events of the average top-N depth
  d_n = sum over m of (qb^(m)_n + qa^(m)_n) / (2N)   (missing levels count 0):
  multi-level OFI summed over levels, normalised by the window's average level depth
  (in the style of Xu, Gould & Howison 2018, who normalise each level's OFI by average depth).
  0.0 when the window is empty or its depth is 0.
* depth_imbalance = (sum qb^(m) - sum qa^(m)) / (sum qb^(m) + sum qa^(m)) over the current book's
  top N (0.0 when both are 0).
* microprice = (Pb^(1) qa^(1) + Pa^(1) qb^(1)) / (qa^(1) + qb^(1)) (mid when both qtys are 0);
  microprice_dev_bps = (microprice - mid) / mid * 1e4, computed in the algebraically equal and
  cancellation-free form (Pa - Pb)(qb - qa) / (2 (qa + qb)) / mid * 1e4.
* trade_flow[w] = (buy volume - sell volume) / (buy volume + sell volume) over the trades in
  window w (volume = float(trade.qty)); the aggressor is the buyer when `buyer_is_maker` is
  False; 0.0 with no volume.
* vol (per book event): r_n = ln(mid_n / mid_n-1); alpha_n = 1 - exp(-(t_n - t_n-1) / tau) with
  tau = `vol_tau_s`; var_n = (1 - alpha_n) var_n-1 + alpha_n r_n^2 (var = 0 before the 2nd book);
  vol = sqrt(var): the std of one book-to-book log mid return, time-weighted (a book arriving at
  the same instant as the previous one has weight 0). Its horizon is one book event.
* vol_1s: S_n = exp(-(t_n - t_n-1) / tau) S_n-1 + r_n^2, i.e. S = sum_i exp(-(t - t_i)/tau) r_i^2
  (exponentially-weighted realised variance, every return counted), decayed to now;
  vol_1s = sqrt(S / tau): the std of the log mid change over ONE SECOND (per-second variance
  = realised variance over the last ~tau seconds / tau).
* momentum[h] = ln(mid_now / mid_a), mid_a the mid of the latest book with t <= now - h, for each
  horizon h in `horizons_s`; 0.0 until the history reaches back h.
* spread_ratio = spread_bps_now / E_n, E the time-decayed EWMA of spread_bps:
  E_1 = spread_bps_1; E_n = (1 - a_n) E_n-1 + a_n spread_bps_n, a_n = 1 - exp(-(t_n - t_n-1)/tau_s),
  tau_s = `spread_tau_s`. 0.0 before any book or when E is 0.
* ready: the symbol's first book is at least max(max window, max horizon, vol_tau_s, spread_tau_s)
  old, i.e. every window, horizon and EWMA has history behind it.

Before any data every feature is 0.0 (never None). Books with an empty side are not used (counted
in `skipped`); so are trades with a non-positive qty.

Cost: O(1) per event (amortised; a constant times the number of windows and horizons). Window sums
are exact: quantities are integers of 1e-8 (Binance's finest step, the order book's units: `round(q
* 1e8)`, exact for the book's and the exchange's quantities), summed as integers, so a running sum
never drifts and the reported value is the correctly rounded ratio of exact sums. A book with a bad
level among its top N (a price that is not finite and positive, a quantity that is negative, not
finite or >= 2**62 units) is not used, like a book with an empty side (both counted in `skipped`);
so is a trade whose quantity is not a positive number of units. Event times and mids live in
preallocated rings, as do the exact per-event terms; a ring that fills up (more events in the
longest window than `capacity`) drops its oldest event and counts it in `dropped`; it never grows.

`SymbolFeatures` is the C implementation (services/strategy/_cfeatures.c, built when the project
is installed): inside the strategy process a book meets cold caches, where the interpreted core
cost several times its tight-loop time. `PySymbolFeatures` below is the same contract in Python,
the reference the C type is held to bit for bit (tests/services/strategy/test_cfeatures.py), and
the slow reference of the tests holds both to the definitions above.
"""
from __future__ import annotations

import math
from array import array
from dataclasses import dataclass
from typing import Iterable

from shared.messages import Book, Trade

UNITS = 100_000_000  # integer units per 1.0 of quantity
_UNITS_F = 1e8
_MAX_UNITS = 2.0 ** 62  # a quantity at or above this many units is nonsense
_INF = math.inf
_NS = 1_000_000_000


def _units(q: float) -> int | None:
    """A book level's quantity in units (None when negative, not finite or too large)."""
    x = q * _UNITS_F
    return round(x) if 0.0 <= x < _MAX_UNITS else None


@dataclass(frozen=True, slots=True)
class FeatureParams:
    """Windows and horizons of the features (see the module docstring)."""
    levels: int = 5  # N: top-N levels for multi-level OFI and depth imbalance
    windows_ms: tuple[int, ...] = (1000, 5000)  # OFI and trade-flow windows
    vol_tau_s: float = 30.0  # EWMA time constant of both volatilities
    horizons_s: tuple[float, ...] = (1.0, 10.0, 60.0)  # momentum horizons
    spread_tau_s: float = 60.0  # EWMA time constant of the spread baseline
    capacity: int = 65536  # events per ring (book ring, trade ring)

    def __post_init__(self) -> None:
        if self.levels < 1:
            raise ValueError("levels must be >= 1")
        if not self.windows_ms or any(w <= 0 for w in self.windows_ms):
            raise ValueError("windows_ms must be positive")
        if not self.horizons_s or any(h <= 0 for h in self.horizons_s):
            raise ValueError("horizons_s must be positive")
        if self.vol_tau_s <= 0 or self.spread_tau_s <= 0:
            raise ValueError("time constants must be positive")
        if not 1 <= self.levels <= 100:
            raise ValueError("levels must be 1..100")
        if len(self.windows_ms) > 16 or len(self.horizons_s) > 16:
            raise ValueError("at most 16 windows and 16 horizons")
        if not 2 <= self.capacity <= 1 << 22:
            raise ValueError("capacity must be 2..2**22")

    @property
    def warmup_ns(self) -> int:
        """How old the first book must be for `ready`."""
        return max(max(self.windows_ms) * 1_000_000, int(max(self.horizons_s) * _NS),
                   int(self.vol_tau_s * _NS), int(self.spread_tau_s * _NS))


@dataclass(frozen=True, slots=True)
class FeatureVector:
    """One symbol's features as of `ts` (ns); tuples follow FeatureParams' windows / horizons."""
    ts: int
    books: int
    trades: int
    mid: float
    spread_bps: float
    ofi_l1: tuple[float, ...]
    ofi_multi: tuple[float, ...]
    depth_imbalance: float
    microprice: float
    microprice_dev_bps: float
    trade_flow: tuple[float, ...]
    vol: float
    vol_1s: float
    momentum: tuple[float, ...]
    spread_ratio: float
    ready: bool
    dropped: int
    skipped: int


class _Window:
    """Running exact sums over one time window of a ring: a tail pointer (absolute sequence number)."""
    __slots__ = ("ns", "tail", "s1", "s2", "s3", "n")

    def __init__(self, ns: int) -> None:
        self.ns = ns
        self.tail = 0
        self.s1 = self.s2 = self.s3 = 0
        self.n = 0


class PySymbolFeatures:
    """The features of one symbol (see the module docstring for the definitions), in Python: the
    reference of the C `SymbolFeatures`."""

    def __init__(self, params: FeatureParams | None = None) -> None:
        p = self.params = params or FeatureParams()
        cap = self._cap = p.capacity
        n = self._levels = p.levels
        self._now = 0
        self.books = 0
        self.trades = 0
        self.dropped = 0
        self.skipped = 0
        # book ring: time, mid, exact e^(1), exact sum_m e^(m), exact depth sum (bid+ask over N)
        self._bt = array("q", bytes(8 * cap))
        self._bmid = array("d", bytes(8 * cap))
        self._be1 = [0] * cap
        self._bem = [0] * cap
        self._bd = [0] * cap
        self._bstart = 0  # oldest retained sequence number
        self._bend = 0  # next sequence number
        self._bwin = [_Window(w * 1_000_000) for w in p.windows_ms]
        self._hor_ns = [int(h * _NS) for h in p.horizons_s]
        self._anchor = [0] * len(self._hor_ns)  # sequence number of the momentum anchor candidate
        self._wmax = p.windows_ms.index(max(p.windows_ms))
        self._hmax = self._hor_ns.index(max(self._hor_ns))
        # trade ring: time, exact signed volume (+buy, -sell)
        self._tt = array("q", bytes(8 * cap))
        self._tv = [0] * cap
        self._tstart = 0
        self._tend = 0
        self._twin = [_Window(w * 1_000_000) for w in p.windows_ms]
        # previous book (L1..N prices and exact qtys); missing levels: price None
        self._pbp = [None] * n
        self._pbq = [0] * n
        self._pap = [None] * n
        self._paq = [0] * n
        self._cbp = [None] * n
        self._cbq = [0] * n
        self._cap_ = [None] * n
        self._caq = [0] * n
        self._first_ns = 0
        self._last_book_ns = 0
        self._mid = 0.0
        self._spread_bps = 0.0
        self._micro = 0.0
        self._micro_dev = 0.0
        self._depth_imb = 0.0
        self._var = 0.0
        self._rv = 0.0  # S at _last_book_ns
        self._spread_ewma = 0.0
        self._inv_vol_tau_ns = 1.0 / (p.vol_tau_s * _NS)
        self._inv_spread_tau_ns = 1.0 / (p.spread_tau_s * _NS)
        self._warmup_ns = p.warmup_ns

    # -- clock ---------------------------------------------------------------------

    def advance(self, now_ns: int) -> None:
        """Move the clock to `now_ns` (never back): expire window events with t <= now - w."""
        if now_ns > self._now:
            self._now = now_ns
        now = self._now
        bt, cap, end = self._bt, self._cap, self._bend
        for win in self._bwin:
            cut = now - win.ns
            tail = win.tail
            if tail < end and bt[tail % cap] <= cut:
                s1, s2, s3, n = win.s1, win.s2, win.s3, win.n
                e1, em, d = self._be1, self._bem, self._bd
                while tail < end and bt[tail % cap] <= cut:
                    i = tail % cap
                    s1 -= e1[i]
                    s2 -= em[i]
                    s3 -= d[i]
                    n -= 1
                    tail += 1
                win.s1, win.s2, win.s3, win.n, win.tail = s1, s2, s3, n, tail
        anchors = self._anchor
        k = 0
        for h in self._hor_ns:
            cut = now - h
            a = anchors[k]
            if a + 1 < end and bt[(a + 1) % cap] <= cut:
                a += 1
                while a + 1 < end and bt[(a + 1) % cap] <= cut:
                    a += 1
                anchors[k] = a
            k += 1
        tt, end = self._tt, self._tend
        for win in self._twin:
            cut = now - win.ns
            tail = win.tail
            if tail < end and tt[tail % cap] <= cut:
                tv = self._tv
                while tail < end and tt[tail % cap] <= cut:
                    v = tv[tail % cap]
                    win.s1 -= v
                    win.s2 -= v if v >= 0 else -v
                    win.n -= 1
                    tail += 1
                win.tail = tail
        self._release()

    def _release(self) -> None:
        """Reset the ring slots no window or anchor needs any more (keeps memory bounded). The
        longest window has the oldest tail and the longest horizon the oldest anchor."""
        cap = self._cap
        keep = self._bwin[self._wmax].tail
        a = self._anchor[self._hmax]
        if a < keep:
            keep = a
        s = self._bstart
        if s < keep:
            e1, em, d = self._be1, self._bem, self._bd
            while s < keep:
                i = s % cap
                e1[i] = em[i] = d[i] = 0
                s += 1
            self._bstart = s
        keep = self._twin[self._wmax].tail
        s = self._tstart
        if s < keep:
            tv = self._tv
            while s < keep:
                tv[s % cap] = 0
                s += 1
            self._tstart = s

    # -- events --------------------------------------------------------------------

    def on_book(self, book: Book, now_ns: int) -> bool:
        """Feed one `book` message seen at `now_ns`; False when it is not used (an empty side or a
        bad level among the top N: counted in `skipped`)."""
        bids, asks = book.bids, book.asks
        if not bids or not asks:
            self.skipped += 1
            return False
        n = self._levels
        cbp, cbq, cap_, caq = self._cbp, self._cbq, self._cap_, self._caq
        sb = sa = 0
        nb, na = len(bids), len(asks)
        for m in range(n):
            if m < nb:
                px, q = bids[m]
                u = _units(q)
                if u is None or not 0.0 < px < _INF:
                    self.skipped += 1
                    return False
                cbp[m] = px
                cbq[m] = u
                sb += u
            else:
                cbp[m], cbq[m] = None, 0
            if m < na:
                px, q = asks[m]
                u = _units(q)
                if u is None or not 0.0 < px < _INF:
                    self.skipped += 1
                    return False
                cap_[m] = px
                caq[m] = u
                sa += u
            else:
                cap_[m], caq[m] = None, 0
        self.advance(now_ns)
        now = self._now
        # OFI per level against the previous book
        e1 = em = 0
        if self.books:
            pbp, pbq, pap, paq = self._pbp, self._pbq, self._pap, self._paq
            for m in range(n):
                e = 0
                b0, b1 = pbp[m], cbp[m]
                if b0 is None:
                    e += cbq[m]
                elif b1 is None:
                    e -= pbq[m]
                else:
                    if b1 >= b0:
                        e += cbq[m]
                    if b1 <= b0:
                        e -= pbq[m]
                a0, a1 = pap[m], cap_[m]
                if a0 is None:
                    e -= caq[m]
                elif a1 is None:
                    e += paq[m]
                else:
                    if a1 <= a0:
                        e -= caq[m]
                    if a1 >= a0:
                        e += paq[m]
                if m == 0:
                    e1 = e
                em += e
        # swap current -> previous (no allocation)
        self._pbp, self._cbp = cbp, self._pbp
        self._pbq, self._cbq = cbq, self._pbq
        self._pap, self._cap_ = cap_, self._pap
        self._paq, self._caq = caq, self._paq
        # L1 metrics
        pb, qb = bids[0][0], bids[0][1]
        pa, qa = asks[0][0], asks[0][1]
        mid = (pb + pa) * 0.5
        spread = pa - pb
        spread_bps = spread / mid * 1e4 if mid else 0.0
        tq = qa + qb
        if tq > 0:
            self._micro = (pb * qa + pa * qb) / tq
            self._micro_dev = spread * (qb - qa) / (2.0 * tq) / mid * 1e4 if mid else 0.0
        else:
            self._micro, self._micro_dev = mid, 0.0
        tot = sb + sa
        self._depth_imb = (sb - sa) / tot if tot else 0.0
        # volatilities and spread EWMA
        if self.books:
            dt = now - self._last_book_ns
            decay = math.exp(-dt * self._inv_vol_tau_ns)
            prev = self._mid
            r = math.log(mid / prev) if mid > 0 and prev > 0 else 0.0
            r2 = r * r
            self._var = decay * self._var + (-math.expm1(-dt * self._inv_vol_tau_ns)) * r2
            self._rv = decay * self._rv + r2
            x = -dt * self._inv_spread_tau_ns
            self._spread_ewma = math.exp(x) * self._spread_ewma - math.expm1(x) * spread_bps
        else:
            self._first_ns = now
            self._spread_ewma = spread_bps
        self._mid, self._spread_bps = mid, spread_bps
        self._last_book_ns = now
        self.books += 1
        # ring append (drop the oldest when full)
        cap = self._cap
        if self._bend - self._bstart >= cap:
            self._drop_book()
        seq = self._bend
        i = seq % cap
        self._bt[i] = now
        self._bmid[i] = mid
        self._be1[i] = e1
        self._bem[i] = em
        d = sb + sa
        self._bd[i] = d
        self._bend = seq + 1
        for win in self._bwin:
            win.s1 += e1
            win.s2 += em
            win.s3 += d
            win.n += 1
        return True

    def _drop_book(self) -> None:
        """The book ring is full: forget its oldest event everywhere, count it."""
        cap, s = self._cap, self._bstart
        i = s % cap
        for win in self._bwin:
            if win.tail == s:
                win.s1 -= self._be1[i]
                win.s2 -= self._bem[i]
                win.s3 -= self._bd[i]
                win.n -= 1
                win.tail = s + 1
        for k, a in enumerate(self._anchor):
            if a == s:
                self._anchor[k] = s + 1  # the anchor is now younger than its horizon: approximate
        self._be1[i] = self._bem[i] = self._bd[i] = 0
        self._bstart = s + 1
        self.dropped += 1

    def on_trade(self, trade: Trade, now_ns: int) -> bool:
        """Feed one `trade` message seen at `now_ns`; False when its qty is not a positive number
        of units (counted in `skipped`)."""
        try:
            x = float(trade.qty) * _UNITS_F
        except (TypeError, ValueError):  # no number at all (a signalling NaN)
            x = -1.0
        q = round(x) if 0.0 < x < _MAX_UNITS else 0
        if q <= 0:
            self.skipped += 1
            return False
        self.advance(now_ns)
        v = -q if trade.buyer_is_maker else q
        cap = self._cap
        if self._tend - self._tstart >= cap:
            s = self._tstart
            old = self._tv[s % cap]
            for win in self._twin:
                if win.tail == s:
                    win.s1 -= old
                    win.s2 -= old if old >= 0 else -old
                    win.n -= 1
                    win.tail = s + 1
            self._tv[s % cap] = 0
            self._tstart = s + 1
            self.dropped += 1
        seq = self._tend
        i = seq % cap
        self._tt[i] = self._now
        self._tv[i] = v
        self._tend = seq + 1
        for win in self._twin:
            win.s1 += v
            win.s2 += q
            win.n += 1
        self.trades += 1
        return True

    # -- read ----------------------------------------------------------------------

    def head(self) -> tuple[float, float, float, float, float, float, float, float, float, bool]:
        """What a per-book decision reads, equal to `vector()`'s values without building it (a
        third of its cost): (mid, ofi_l1[0], ofi_multi[0], trade_flow[0], depth_imbalance,
        microprice_dev_bps, spread_bps, vol_1s, spread_ratio, ready), the first window's sums."""
        w, t = self._bwin[0], self._twin[0]
        ofi_l1 = w.s1 / UNITS
        ofi_multi = (w.s2 * 2 * self._levels * w.n) / w.s3 if w.s3 else 0.0
        flow = t.s1 / t.s2 if t.s2 else 0.0
        if self.books:
            now = self._now
            vol_1s = math.sqrt(self._rv * math.exp(-(now - self._last_book_ns) * self._inv_vol_tau_ns)
                               / self.params.vol_tau_s)
            ratio = self._spread_bps / self._spread_ewma if self._spread_ewma else 0.0
            ready = now - self._first_ns >= self._warmup_ns
        else:
            vol_1s = ratio = 0.0
            ready = False
        return (self._mid if self.books else 0.0, ofi_l1, ofi_multi, flow, self._depth_imb, self._micro_dev,
                self._spread_bps, vol_1s, ratio, ready)

    def vector(self) -> FeatureVector:
        """The features as of the latest event (or `advance`); reads only, changes nothing."""
        now = self._now
        two_n = 2 * self._levels
        ofi_l1 = tuple(w.s1 / UNITS for w in self._bwin)
        ofi_multi = tuple((w.s2 * two_n * w.n) / w.s3 if w.s3 else 0.0 for w in self._bwin)
        flow = tuple(w.s1 / w.s2 if w.s2 else 0.0 for w in self._twin)
        if self.books:
            mid = self._mid
            cap, bt, bmid = self._cap, self._bt, self._bmid
            mom = []
            for k, h in enumerate(self._hor_ns):
                i = self._anchor[k] % cap
                then = bmid[i]
                mom.append(math.log(mid / then) if bt[i] <= now - h and mid > 0 and then > 0 else 0.0)
            momentum = tuple(mom)
            rv = self._rv * math.exp(-(now - self._last_book_ns) * self._inv_vol_tau_ns)
            vol_1s = math.sqrt(rv / self.params.vol_tau_s)
            ratio = self._spread_bps / self._spread_ewma if self._spread_ewma else 0.0
            ready = now - self._first_ns >= self._warmup_ns
        else:
            mid = 0.0
            momentum = (0.0,) * len(self._hor_ns)
            vol_1s = ratio = 0.0
            ready = False
        return FeatureVector(ts=now, books=self.books, trades=self.trades, mid=mid,
                             spread_bps=self._spread_bps, ofi_l1=ofi_l1, ofi_multi=ofi_multi,
                             depth_imbalance=self._depth_imb, microprice=self._micro,
                             microprice_dev_bps=self._micro_dev, trade_flow=flow,
                             vol=math.sqrt(self._var), vol_1s=vol_1s, momentum=momentum,
                             spread_ratio=ratio, ready=ready, dropped=self.dropped, skipped=self.skipped)


try:
    from services.strategy._cfeatures import SymbolFeatures, bind as _bind
except ImportError as exc:  # pragma: no cover - a broken install, not a runtime condition
    raise ImportError(
        f"the C features core (services/strategy/_cfeatures.c) is not built: {exc}. Install the project "
        "with `make venv` (or `pip install -e .`), which needs gcc and Python's headers.") from exc
_bind(FeatureVector)


class Features:
    """Symbol -> SymbolFeatures; a symbol's core is made on its first event."""

    def __init__(self, params: FeatureParams | None = None, symbols: Iterable[str] = ()) -> None:
        self.params = params or FeatureParams()
        self._by_symbol: dict[str, SymbolFeatures] = {s.upper(): SymbolFeatures(self.params) for s in symbols}

    def symbol(self, symbol: str) -> SymbolFeatures:
        """The core of `symbol` (made if new)."""
        core = self._by_symbol.get(symbol)
        if core is None:
            core = self._by_symbol[symbol] = SymbolFeatures(self.params)
        return core

    def on_book(self, book: Book, now_ns: int) -> bool:
        """Feed one `book` message seen at `now_ns` (False: not used, see SymbolFeatures)."""
        return self.symbol(book.symbol).on_book(book, now_ns)

    def on_trade(self, trade: Trade, now_ns: int) -> bool:
        """Feed one `trade` message seen at `now_ns` (False: not used)."""
        return self.symbol(trade.symbol).on_trade(trade, now_ns)

    def vector(self, symbol: str) -> FeatureVector:
        """`symbol`'s features (all 0.0, not ready, for a symbol never seen)."""
        return self.symbol(symbol).vector()

    def __contains__(self, symbol: str) -> bool:
        return symbol in self._by_symbol
