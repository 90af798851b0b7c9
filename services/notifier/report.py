"""The daily report: the last 24 hours' trading from the database (read-only), as text and a chart.

`due_slot`/`first_slot` schedule it (pure), `summarize` and `report_text` make the text
(pure, exact decimals), `read_window` reads the broker's tables without ever writing or
creating anything, and `equity_png` draws the equity curve with matplotlib's Agg canvas
(no display, no pyplot state, so it can run in a worker thread). `build_report` is the
whole of it for the shell: one `Outgoing` with the PNG, or a text saying what could not be
read. The window is the 24 h before the report time, whatever QF_NOTIFIER_REPORT_AT says,
so a report at 00:05 still covers a day."""
from __future__ import annotations

import io
import os
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from urllib.parse import quote as urlquote

import peewee as pw

from services.notifier import text
from services.notifier.core import Outgoing
from shared.config import mask_secrets
from shared.errors import ConfigError
from shared.db import EquitySnapshot, FillRow, open_url
from shared.money import MONEY

NS = 1_000_000_000
DAY_NS = 86_400 * NS
CATCH_UP_NS = 6 * 3600 * NS  # a report missed (the notifier was down) is still sent this late


class ReportUnavailable(Exception):
    """The database cannot be read for the report (missing, no tables yet, unreadable).
    Handled by `build_report`: the report says so in one line instead."""


# -- when -----------------------------------------------------------------------------

def slot_before(now_ns: int, hhmm: str) -> int:
    """The latest report time (ns) at or before `now_ns`; `hhmm` is `HH:MM` UTC."""
    hh, mm = (int(x) for x in hhmm.split(":"))
    offset = (hh * 3600 + mm * 60) * NS
    day = (now_ns - offset) // DAY_NS
    return day * DAY_NS + offset


def first_slot(now_ns: int, hhmm: str) -> int:
    """What a notifier that never sent a report remembers as its last: the latest slot, so it
    does not send one the moment it is first started."""
    return slot_before(now_ns, hhmm)


def due_slot(now_ns: int, hhmm: str, last_slot: int) -> int | None:
    """The slot whose report is due now (after `last_slot`, at most CATCH_UP_NS late), or None."""
    slot = slot_before(now_ns, hhmm)
    if slot > last_slot and now_ns - slot <= CATCH_UP_NS:
        return slot
    return None


def next_slot(now_ns: int, hhmm: str) -> int:
    return slot_before(now_ns, hhmm) + DAY_NS


# -- what -----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class FillFact:
    ts: int
    order_id: str
    symbol: str
    side: str
    price: Decimal
    qty: Decimal
    fee: Decimal
    fee_asset: str


@dataclass(slots=True)
class Window:
    """What the database holds for [start_ns, end_ns): fills, the equity curve, and the last
    equity before it (the start)."""
    start_ns: int
    end_ns: int
    fills: list[FillFact] = field(default_factory=list)
    equity: list[tuple[int, Decimal]] = field(default_factory=list)
    equity_before: Decimal | None = None


@dataclass(slots=True)
class Summary:
    start_ns: int
    end_ns: int
    fills: int = 0
    trades: int = 0  # orders with a fill in the window
    volume: Decimal = Decimal(0)  # quote notional, sum of price x qty
    fees: dict[str, Decimal] = field(default_factory=dict)
    symbols: dict[str, dict] = field(default_factory=dict)  # symbol -> trades, fills, bought, sold
    equity_start: Decimal | None = None
    equity_end: Decimal | None = None
    peak: Decimal | None = None
    drawdown: Decimal = Decimal(0)  # the deepest fall from the window's running peak, a fraction
    drawdown_abs: Decimal = Decimal(0)

    @property
    def pnl(self) -> Decimal | None:
        if self.equity_start is None or self.equity_end is None:
            return None
        return self.equity_end - self.equity_start


def summarize(w: Window) -> Summary:
    """The window's figures, exact. Net P&L is the change of equity (marked to mid, fees paid)."""
    s = Summary(w.start_ns, w.end_ns, fills=len(w.fills))
    orders = set()
    fees: dict[str, Decimal] = defaultdict(Decimal)
    per: dict[str, dict] = {}
    for f in w.fills:
        orders.add(f.order_id)
        fees[f.fee_asset] += f.fee
        s.volume += f.price * f.qty
        p = per.setdefault(f.symbol, {"orders": set(), "fills": 0, "bought": Decimal(0), "sold": Decimal(0)})
        p["orders"].add(f.order_id)
        p["fills"] += 1
        p["bought" if f.side == "BUY" else "sold"] += f.qty
    s.trades, s.fees = len(orders), dict(fees)
    s.symbols = {sym: {"trades": len(p["orders"]), "fills": p["fills"], "bought": p["bought"], "sold": p["sold"]}
                 for sym, p in sorted(per.items())}
    curve = [e for _, e in w.equity]
    s.equity_start = w.equity_before if w.equity_before is not None else (curve[0] if curve else None)
    s.equity_end = curve[-1] if curve else w.equity_before
    peak = s.equity_start
    for e in curve:
        if peak is None or e > peak:
            peak = e
        elif peak > 0 and (peak - e) / peak > s.drawdown:
            s.drawdown, s.drawdown_abs = ((peak - e) / peak).quantize(Decimal("1e-8"), context=MONEY), peak - e
    s.peak = peak
    return s


def report_text(s: Summary, quote: str = "") -> str:
    """The report's caption (at most 1024 characters):

    📊 Daily report · 24 h to Tue 8 Dec 21:00 UTC
    Net P&L +12.34 USDT (+0.12%)
    …"""
    q = f" {quote}" if quote else ""
    end = datetime.fromtimestamp(s.end_ns / 1e9, timezone.utc)
    lines = [f"{text.ICON['report']} Daily report · 24 h to {end:%a %-d %b %H:%M} UTC"]
    if s.pnl is not None:
        pct = f" ({'+' if s.pnl >= 0 else '-'}{text.percent(abs(s.pnl) / s.equity_start)})" if s.equity_start else ""
        lines.append(f"Net P&L {text.signed(s.pnl)}{q}{pct}")
        lines.append(f"Equity {text.money(s.equity_end)}{q} (from {text.money(s.equity_start)})")
        lines.append(f"Max drawdown {text.percent(s.drawdown)}"
                     + (f" ({text.signed(-s.drawdown_abs)}{q})" if s.drawdown_abs else ""))
    else:
        lines.append("No equity recorded yet (has the broker run?)")
    if s.fills:
        lines.append(f"Trades {s.trades} · fills {s.fills} · volume {text.money(s.volume)}{q}")
        lines.append("Fees " + " + ".join(f"{text.number(v)} {a}" for a, v in sorted(s.fees.items())))
        for sym, p in list(s.symbols.items())[:8]:
            lines.append(f"{sym}: {p['trades']} trades, bought {text.number(p['bought'])}, "
                         f"sold {text.number(p['sold'])}")
    else:
        lines.append("No trades in these 24 h")
    return text.clip("\n".join(lines), text.MAX_CAPTION)


# -- reading ----------------------------------------------------------------------------

def _open_read_only(target: str) -> pw.Database:
    if "://" not in target or target.startswith("sqlite:///"):
        path = os.path.abspath(target.removeprefix("sqlite:///") if "://" in target else target)
        if not os.path.isfile(path):
            raise ReportUnavailable(f"no database at {path} yet")
        # mode=ro: never creates the file or a table; WAL readers do not block the broker
        return pw.SqliteDatabase(f"file:{urlquote(path)}?mode=ro", uri=True, pragmas={"busy_timeout": 5000})
    # a server: the same opener as every service (percent-escaped passwords decoded, a connect
    # timeout), in the API's read-only session
    from services.control.dbreader import server_read_params
    try:
        return open_url(target, **server_read_params(target))
    except ConfigError as exc:  # a URL that cannot be used: its text never holds the password
        raise ReportUnavailable(str(exc)) from None


def read_window(target: str, start_ns: int, end_ns: int) -> Window:
    """The fills and equity of [start_ns, end_ns) in the database `target` (QF_DB), read-only.
    Raises ReportUnavailable."""
    db = _open_read_only(target)
    w = Window(start_ns, end_ns)
    try:
        with db.bind_ctx([FillRow, EquitySnapshot]), db.connection_context():
            rows = (FillRow.select(FillRow.ts, FillRow.order_id, FillRow.symbol, FillRow.side, FillRow.price,
                                   FillRow.qty, FillRow.fee, FillRow.fee_asset)
                    .where((FillRow.ts >= start_ns) & (FillRow.ts < end_ns)).order_by(FillRow.ts).tuples())
            w.fills = [FillFact(r[0], r[1], r[2], r[3], Decimal(str(r[4])), Decimal(str(r[5])), Decimal(str(r[6])),
                                r[7]) for r in rows]
            before = (EquitySnapshot.select(EquitySnapshot.equity).where(EquitySnapshot.ts < start_ns)
                      .order_by(EquitySnapshot.ts.desc()).limit(1).tuples().first())
            w.equity_before = Decimal(str(before[0])) if before else None
            w.equity = [(r[0], Decimal(str(r[1]))) for r in
                        EquitySnapshot.select(EquitySnapshot.ts, EquitySnapshot.equity)
                        .where((EquitySnapshot.ts >= start_ns) & (EquitySnapshot.ts < end_ns))
                        .order_by(EquitySnapshot.ts).tuples()]
    except pw.DatabaseError as exc:  # no tables yet (the broker never ran), locked, damaged
        raise ReportUnavailable(f"the database cannot be read: {exc}") from None
    finally:
        if not db.is_closed():
            db.close()
    return w


# -- the chart --------------------------------------------------------------------------

def equity_png(w: Window, s: Summary, quote: str = "") -> bytes | None:
    """The window's equity curve as a PNG (None without two points to draw): the curve, the
    start equity dashed, the fall below the running peak shaded red."""
    points = ([(w.start_ns, s.equity_start)] if w.equity_before is not None else []) + w.equity
    if len(points) < 2:
        return None
    from matplotlib import dates as mdates, ticker  # here: matplotlib loads only for a report
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    times = [datetime.fromtimestamp(t / 1e9, timezone.utc) for t, _ in points]
    values = [float(e) for _, e in points]  # floats for drawing only; the text's figures are exact
    peaks, top = [], values[0]
    for v in values:
        top = max(top, v)
        peaks.append(top)
    fig = Figure(figsize=(8, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    up = s.pnl is None or s.pnl >= 0
    ax.plot(times, values, color="#1a7f37" if up else "#cf222e", linewidth=1.8, label="equity")
    ax.fill_between(times, values, peaks, where=[v < p for v, p in zip(values, peaks)], color="#cf222e",
                    alpha=0.18, linewidth=0, interpolate=True, label="below the peak")
    if s.equity_start is not None:
        ax.axhline(float(s.equity_start), color="#6e7781", linestyle="--", linewidth=1, label="start")
    end = datetime.fromtimestamp(w.end_ns / 1e9, timezone.utc)
    figures = [f"net {text.signed(s.pnl)}{' ' + quote if quote else ''}"] if s.pnl is not None else []
    figures += [f"max drawdown {text.percent(s.drawdown)}"] if s.drawdown else []
    ax.set_title(f"Equity, 24 h to {end:%a %-d %b %H:%M} UTC" + ("\n" + " · ".join(figures) if figures else ""),
                 fontsize=11, loc="left")
    ax.set_xlim(datetime.fromtimestamp(w.start_ns / 1e9, timezone.utc), end)
    ax.xaxis.set_major_locator(mdates.HourLocator(byhour=range(0, 24, 3), tz=timezone.utc))
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M", tz=timezone.utc))
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:,.2f}"))
    ax.set_ylabel(f"equity{' (' + quote + ')' if quote else ''}")
    ax.grid(True, color="#d0d7de", linewidth=0.6)
    ax.legend(loc="upper left", fontsize=9, frameon=False)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def build_report(target: str, slot_ns: int, quote: str = "") -> Outgoing:
    """The report for the 24 h to `slot_ns`: text and chart, or a line saying why not (I/O:
    reads the database, draws; run it off the service's loop)."""
    try:
        w = read_window(target, slot_ns - DAY_NS, slot_ns)
    except ReportUnavailable as exc:
        end = datetime.fromtimestamp(slot_ns / 1e9, timezone.utc)
        return Outgoing("report", f"{text.ICON['report']} Daily report · 24 h to {end:%a %-d %b %H:%M} UTC\n"
                                  f"Not available: {mask_secrets(str(exc))}")
    s = summarize(w)
    return Outgoing("report", report_text(s, quote), equity_png(w, s, quote))
