"""The report's four charts as PNG bytes (matplotlib's Agg canvas: no display, no pyplot state).

Each is 800 px wide, the width a README shows, with its units and UTC on the axes. The same
Report gives the same bytes: the font is fixed (DejaVu Sans, shipped with matplotlib), the PNG
carries no Software or date metadata, and nothing depends on the clock. Curves of more points
than pixels are thinned to each pixel column's first, last, lowest and highest point, so a
million snapshots draw in milliseconds and look the same.
"""
from __future__ import annotations

import io
import math
from contextlib import contextmanager
from datetime import datetime, timezone

import numpy as np

from services.report.core import WEEKDAYS, Report

WIDTH_IN, DPI = 8.0, 100  # 800 px
HEIGHT_IN = 4.2
COLUMNS = 1600  # thinning: buckets across the plot (two per pixel)
STYLE = {
    "font.family": "DejaVu Sans", "font.size": 10, "axes.titlesize": 11.5, "axes.titleweight": "bold",
    "axes.titlelocation": "left", "axes.labelsize": 10, "xtick.labelsize": 9, "ytick.labelsize": 9,
    "legend.fontsize": 9, "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True,
    "grid.color": "#d0d7de", "grid.linewidth": 0.6, "axes.edgecolor": "#57606a", "axes.labelcolor": "#24292f",
    "xtick.color": "#57606a", "ytick.color": "#57606a", "text.color": "#24292f", "figure.dpi": DPI,
    "savefig.dpi": DPI, "axes.formatter.useoffset": False, "axes.formatter.limits": (-9, 12),
    "svg.hashsalt": "quantumflow", "path.simplify": True,
}
BLUE, GREEN, RED, GREY, PURPLE, ORANGE = "#0969da", "#1a7f37", "#cf222e", "#6e7781", "#8250df", "#bf8700"
STATE_STYLE = {"HALTED": (RED, "halted"), "REDUCING": (ORANGE, "reducing only"),
               "PAUSED_SHABBAT": (PURPLE, "Shabbat / Yom Tov pause")}


@contextmanager
def _figure(height: float = HEIGHT_IN):
    """A Figure on an Agg canvas under the report's style."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(WIDTH_IN, height), dpi=DPI)
        FigureCanvasAgg(fig)
        yield fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def when(ns: int) -> str:
    """`2024-07-01 00:00 UTC`."""
    return datetime.fromtimestamp(ns / 1e9, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def duration(ns: int) -> str:
    """`3 d 4 h`, `5 h 12 min`, `42 s` (the summary's wording, and the charts')."""
    s = max(ns, 0) // 1_000_000_000
    d, h, m = s // 86_400, s % 86_400 // 3600, s % 3600 // 60
    if d:
        return f"{d} d {h} h"
    if h:
        return f"{h} h {m} min"
    return f"{m} min {s % 60} s" if m else f"{s} s"


def _unit(r: Report) -> str:
    return r.quote or "quote asset"


def thin(ts: np.ndarray, value: np.ndarray, columns: int = COLUMNS) -> tuple[np.ndarray, np.ndarray]:
    """At most ~4 points per column of time (ts sorted): each column's first, last, lowest and
    highest, in time order; as they are when there are few enough."""
    n = len(ts)
    if n <= 4 * columns:
        return ts, value
    span = int(ts[-1] - ts[0]) + 1
    col = ((ts - ts[0]).astype(np.float64) * columns / span).astype(np.int64)
    start = np.flatnonzero(np.concatenate(([True], col[1:] != col[:-1])))
    end = np.concatenate((start[1:] - 1, [n - 1]))
    count = end - start + 1
    keep = np.zeros(n, dtype=bool)
    keep[start] = keep[end] = True
    for extreme in (np.minimum, np.maximum):
        hit = np.flatnonzero(value == np.repeat(extreme.reduceat(value, start), count))
        first = np.concatenate(([True], col[hit][1:] != col[hit][:-1]))
        keep[hit[first]] = True
    return ts[keep], value[keep]


# Time ticks by what they mostly fall on (years, months, days, hours, minutes, seconds): a date
# reads `Jul 05`, a time of day always `HH:MM`, with `:SS` when it falls inside a minute; the
# offset under the axis carries what the ticks leave out.
TIME_FORMATS = ["%Y", "%b", "%b %d", "%H:%M", "%H:%M", "%H:%M:%S"]
TIME_ZERO_FORMATS = ["", "%Y", "%b %d", "%b %d", "%H:%M", "%H:%M"]
TIME_OFFSET_FORMATS = ["", "%Y", "%Y", "%Y-%b-%d", "%Y-%b-%d", "%Y-%b-%d"]
LEAST_SPAN_NS = 10 * 10**9  # a narrower time axis is widened to this (ticks a second or more apart)


def _time_axis(ax, lo: int, hi: int) -> None:
    from matplotlib import dates as mdates

    if hi <= lo:
        hi = lo + 60 * 10**9
    hi = max(hi, lo + LEAST_SPAN_NS)
    ax.set_xlim(np.datetime64(lo, "ns"), np.datetime64(hi, "ns"))
    locator = mdates.AutoDateLocator(tz=timezone.utc, minticks=5, maxticks=9)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(
        locator, tz=timezone.utc, formats=TIME_FORMATS, zero_formats=TIME_ZERO_FORMATS,
        offset_formats=TIME_OFFSET_FORMATS, show_offset=True))
    ax.set_xlabel("time (UTC)")


def _decimals(step: float) -> int:
    """Decimals that show a tick spacing of `step` whole: 0.025 → 3, 0.5 → 1, 10 → 0 (at most 8)."""
    if not step > 0 or not math.isfinite(step):
        return 0
    for d in range(9):
        if abs(round(step, d) - step) <= step * 1e-6:
            return d
    return 8


def _number_axis(axis, span: float, suffix: str = "") -> None:
    """Tick labels with thousands separators and as many decimals as the drawn ticks' spacing needs
    (`span / 6` until they are known), never `-0`."""
    from matplotlib import ticker

    class Amounts(ticker.Formatter):
        decimals = _decimals(10 ** math.floor(math.log10(span / 6))) if span > 0 else 0

        def set_locs(self, locs):
            super().set_locs(locs)
            steps = np.diff(np.sort(np.asarray(locs, dtype=np.float64)))
            steps = steps[steps > 0]
            if len(steps):
                self.decimals = _decimals(float(steps.min()))

        def __call__(self, v, pos=None):
            v = round(float(v), self.decimals) + 0.0  # -0.0 + 0.0 is 0.0
            return f"{v:,.{self.decimals}f}{suffix}"

    axis.set_major_formatter(Amounts())


def _count_axis(axis) -> None:
    """Whole-number ticks for a count: 0, 1, 2 (never 0.5), with thousands separators."""
    from matplotlib import ticker

    axis.set_major_locator(ticker.MaxNLocator(integer=True, steps=[1, 2, 5, 10], min_n_ticks=1))
    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{round(v):,d}"))


def money(value: float, unit: str, signed: bool = False) -> str:
    """A float amount for a chart's legend: `+1,234.56 USDT` (the table has the exact figures)."""
    digits = 2 if abs(value) >= 1 or value == 0 else max(2, -math.floor(math.log10(abs(value))) + 2)
    text = f"{value:+,.{digits}f}" if signed else f"{value:,.{digits}f}"
    return f"{text} {unit}"


def percent(fraction: float, signed: bool = False) -> str:
    """`-0.46%`; a change under 0.01% with two significant digits (`-0.0023%`), never `-0.00%`."""
    size = abs(fraction) * 100
    digits = 2 if size == 0 or size >= 0.01 else min(8, 1 - math.floor(math.log10(size)))
    return f"{fraction * 100:+.{digits}f}%" if signed else f"{fraction * 100:.{digits}f}%"


def placeholder(title: str, message: str, detail: str = "") -> bytes:
    """A chart with nothing to draw: its title and a clear message in its place."""
    with _figure() as fig:
        ax = fig.add_subplot()
        ax.set_axis_off()
        ax.set_title(title)
        ax.text(0.5, 0.56, message, ha="center", va="center", fontsize=20, color=GREY, transform=ax.transAxes)
        if detail:
            ax.text(0.5, 0.40, detail, ha="center", va="center", fontsize=10, color=GREY, transform=ax.transAxes)
        fig.subplots_adjust(left=0.06, right=0.97, top=0.9, bottom=0.08)
        return _png(fig)


def period(r: Report) -> str:
    """`2024-07-01 00:00 UTC to 2024-07-31 00:00 UTC`, or what there is of it."""
    if r.start is None:
        return "no data yet"
    return f"{when(r.start)} to {when(r.end)}"


def _empty_detail(r: Report) -> str:
    return period(r) if r.start is not None else "the charts appear once the broker has stored fills"


def equity_png(r: Report) -> bytes:
    """The equity curve (or net P&L from the fills), the starting balance, risk's pauses shaded."""
    c = r.curve
    derived_pnl = c is not None and c.derived and c.start is None
    title = "Net P&L from the fills" if derived_pnl else "Equity"
    if c is None:
        return placeholder(title, "No trades yet" if not r.fills else "Not enough equity points yet",
                           _empty_detail(r))
    unit = _unit(r)
    with _figure() as fig:
        ax = fig.add_subplot()
        ts, value = thin(c.ts, c.value)
        x = ts.astype("datetime64[ns]")
        ax.plot(x, value, color=BLUE, linewidth=1.3, label="net P&L (marked at the last fill price)" if derived_pnl
                else "equity" + (" (from the fills, marked at the last fill price)" if c.derived else ""), zorder=3)
        base = float(c.start) if c.start is not None else 0.0
        ax.axhline(base, color=GREY, linestyle="--", linewidth=1,
                   label="zero" if derived_pnl else f"starting balance {money(base, unit)}", zorder=2)
        shown = set()
        least = (r.end - r.start) // 300  # a span narrower than ~2 px is drawn that wide, to be seen
        for span in r.spans:
            color, label = STATE_STYLE.get(span.state, (GREY, span.state.lower()))
            ax.axvspan(np.datetime64(span.start, "ns"), np.datetime64(max(span.end, span.start + least), "ns"),
                       color=color, alpha=0.2, linewidth=0, label=None if span.state in shown else label, zorder=1)
            shown.add(span.state)
        _time_axis(ax, r.start, r.end)
        lo, hi = float(min(value.min(), base)), float(max(value.max(), base))
        pad = (hi - lo) * 0.08 or max(abs(hi) * 1e-4, 1.0)
        ax.set_ylim(lo - pad, hi + pad)
        _number_axis(ax.yaxis, hi - lo)
        ax.set_ylabel(f"{'net P&L' if derived_pnl else 'equity'} ({unit})")
        end = float(c.value[-1])
        change = end - base
        pct = f" ({percent(change / base, signed=True)})" if base > 0 else ""
        ax.set_title(f"{title}: {money(end, unit)}, {money(change, unit, signed=True)}{pct} from the start"
                     if not derived_pnl else f"{title}: {money(end, unit, signed=True)}", pad=24)
        ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=4, frameon=False, borderaxespad=0.2,
                  handlelength=1.6, columnspacing=1.2)
        if r.states_from is not None:
            ax.text(1.0, -0.2, f"risk states known from {when(r.states_from)}", transform=ax.transAxes,
                    ha="right", va="top", fontsize=8, color=GREY)
        fig.subplots_adjust(left=0.13, right=0.95, top=0.84, bottom=0.17)  # room for a last `HH:MM:SS`
        return _png(fig)


def drawdown_png(r: Report) -> bytes:
    """How far below its running peak the equity was, over time (the underwater curve)."""
    title = "Drawdown"
    c, dd = r.curve, r.drawdown
    if c is None or dd is None:
        return placeholder(title, "No trades yet" if not r.fills else "Not enough equity points yet",
                           _empty_detail(r))
    unit = _unit(r)
    pct = c.fractional
    depth = -(c.underwater * 100 if pct else c.underwater)
    with _figure() as fig:
        ax = fig.add_subplot()
        ts, value = thin(c.ts, depth)
        x = ts.astype("datetime64[ns]")
        ax.fill_between(x, value, 0, color=RED, alpha=0.25, linewidth=0, step="post")
        ax.plot(x, value, color=RED, linewidth=1.0, drawstyle="steps-post")
        _time_axis(ax, r.start, r.end)
        low = float(value.min())
        ax.set_ylim(low * 1.1 if low < 0 else -1.0, -low * 0.04 if low < 0 else 0.1)
        _number_axis(ax.yaxis, -low, " %" if pct else "")
        ax.set_ylabel("below the running peak (%)" if pct else f"below the running peak ({unit})")
        if dd.amount:
            depth_text = percent(dd.fraction) if dd.fraction is not None else money(float(dd.amount), unit)
            ended = "recovered after" if dd.recovered_ts is not None else "not recovered in"
            ax.set_title(f"Drawdown: at most {depth_text}, {ended} {duration(dd.duration_ns)}")
            trough = np.datetime64(dd.trough_ts, "ns")
            ax.plot([trough], [low], marker="v", color=RED, markersize=7, zorder=4)
        else:
            ax.set_title("Drawdown: none, the curve never fell below a peak")
        fig.subplots_adjust(left=0.13, right=0.95, top=0.9, bottom=0.17)
        return _png(fig)


def histogram_png(r: Report) -> bytes:
    """P&L per round trip: bars by sign, mean and median marked; the tails past the 1st and 99th
    percentiles are gathered in the edge bins (said on the chart)."""
    title = "P&L per round trip"
    if not r.trips:
        return placeholder(title, "No trades yet" if not r.fills else "No round trip closed yet", _empty_detail(r))
    unit = _unit(r)
    pnl = r.trip_pnl
    lo, hi = (float(v) for v in np.percentile(pnl, [1, 99])) if len(pnl) >= 20 else (float(pnl.min()),
                                                                                      float(pnl.max()))
    if hi <= lo:
        lo, hi = lo - max(abs(lo) * 0.1, 0.01), hi + max(abs(hi) * 0.1, 0.01)
    clipped = int(((pnl < lo) | (pnl > hi)).sum())
    bins = int(np.clip(round(math.sqrt(len(pnl)) * 2), 12, 60))
    width = (hi - lo) / bins  # edges on multiples of the width: 0 is an edge, no bar holds both signs
    edges = np.arange(math.floor(lo / width), math.ceil(hi / width) + 1) * width
    counts, edges = np.histogram(np.clip(pnl, lo, hi), bins=edges)
    mean, median = float(pnl.mean()), float(np.median(pnl))
    with _figure() as fig:
        ax = fig.add_subplot()
        centers = (edges[:-1] + edges[1:]) / 2
        colors = [GREEN if c >= 0 else RED for c in centers]
        ax.bar(centers, counts, width=np.diff(edges), color=colors, alpha=0.75, linewidth=0, zorder=2)
        ax.axvline(mean, color="#24292f", linewidth=1.5, label=f"mean {money(mean, unit, signed=True)}", zorder=3)
        ax.axvline(median, color=PURPLE, linewidth=1.5, linestyle="--",
                   label=f"median {money(median, unit, signed=True)}", zorder=3)
        ax.axvline(0, color=GREY, linewidth=0.8, zorder=1)
        left, right = min(edges[0], mean, median), max(edges[-1], mean, median)  # the edge bars whole
        ax.set_xlim(left - (right - left) * 0.02, right + (right - left) * 0.02)
        _number_axis(ax.xaxis, hi - lo)
        ax.set_xlabel(f"net P&L per round trip, after fees ({unit})")
        ax.set_ylabel("round trips")
        _count_axis(ax.yaxis)
        ax.grid(axis="x", visible=False)
        ax.set_title(f"{title}: {r.trips:,} trip{'s' if r.trips != 1 else ''}, {r.wins / r.trips:.1%} won", pad=24)
        # the legend above the plot, as the equity chart's: bars of any shape leave it clear
        ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=2, frameon=False, borderaxespad=0.2,
                  handlelength=1.6, columnspacing=1.2)
        if clipped:
            ax.text(1.0, -0.17, f"{clipped:,} trips beyond the 1st/99th percentile are counted in the edge bars",
                    transform=ax.transAxes, ha="right", va="top", fontsize=8, color=GREY)
        fig.subplots_adjust(left=0.1, right=0.97, top=0.84, bottom=0.2)
        return _png(fig)


def heatmap_png(r: Report) -> bytes:
    """Net P&L of the round trips by the UTC weekday and hour they closed."""
    title = "P&L by weekday and hour (UTC)"
    if not r.trips:
        return placeholder(title, "No trades yet" if not r.fills else "No round trip closed yet", _empty_detail(r))
    from matplotlib.colors import TwoSlopeNorm
    import matplotlib

    unit = _unit(r)
    grid = np.ma.masked_where(r.heat_trips == 0, r.heat)
    top = float(np.abs(r.heat).max()) or 1.0
    cmap = matplotlib.colormaps["RdYlGn"].with_extremes(bad="#eaeef2")
    with _figure(3.9) as fig:
        ax = fig.add_subplot()
        image = ax.imshow(grid, cmap=cmap, norm=TwoSlopeNorm(0.0, -top, top), aspect="auto", interpolation="nearest")
        ax.set_xticks(range(24), [f"{h:02d}" for h in range(24)], fontsize=8)
        ax.set_yticks(range(7), WEEKDAYS)
        ax.set_xlabel("hour of day (UTC), when the round trip closed")
        ax.grid(False)
        for side in ("top", "right", "left", "bottom"):
            ax.spines[side].set_visible(False)
        ax.tick_params(length=0)
        bar = fig.colorbar(image, ax=ax, fraction=0.035, pad=0.02)
        bar.set_label(f"net P&L ({unit})")
        _number_axis(bar.ax.yaxis, 2 * top)
        headline = _best_and_worst(r)
        ax.set_title(f"{title}: {headline}" if headline else title)
        fig.subplots_adjust(left=0.07, right=0.9, top=0.89, bottom=0.15)
        return _png(fig)


def _best_and_worst(r: Report) -> str:
    """The heatmap's headline: `only Fri 00h, -1.07 USDT` for a single cell; else the best hour
    if it gained and the worst if it lost (`best Fri 19h, worst Fri 07h`); "" when neither."""
    cells = r.heat_trips > 0

    def name(cell) -> str:
        return f"{WEEKDAYS[cell[0]]} {cell[1]:02d}h"

    if int(cells.sum()) == 1:
        cell = np.unravel_index(int(np.argmax(cells)), cells.shape)
        return f"only {name(cell)}, {money(float(r.heat[cell]), _unit(r), signed=True)}"
    best = np.unravel_index(int(np.argmax(np.where(cells, r.heat, -np.inf))), r.heat.shape)
    worst = np.unravel_index(int(np.argmin(np.where(cells, r.heat, np.inf))), r.heat.shape)
    said = [f"best {name(best)}"] if r.heat[best] > 0 else []
    if r.heat[worst] < 0:
        said.append(f"worst {name(worst)}")
    return ", ".join(said)


CHARTS = (("equity.png", "Equity curve", equity_png), ("drawdown.png", "Drawdown", drawdown_png),
          ("pnl_per_trip.png", "P&L per round trip", histogram_png),
          ("pnl_by_hour.png", "P&L by weekday and hour", heatmap_png))


def draw_all(r: Report) -> dict[str, bytes]:
    """Every chart: file name → PNG bytes."""
    return {name: draw(r) for name, _, draw in CHARTS}
