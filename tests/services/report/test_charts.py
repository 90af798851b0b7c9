"""What the charts say (services/report/charts.py), read back from the drawn figures: tick labels and
titles, on a short `qf backtest` database (minutes, a few round trips) and the three-day history."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from services.report import charts
from services.report.cli import make_report, parse_time
from services.report.core import WEEKDAYS
from services.report.markdown import duration
from services.report.sources import load_db
from tests.conftest import SPOT_CAPTURE

REPO = Path(__file__).resolve().parents[3]
CLOCK = re.compile(r"[0-2][0-9]:[0-5][0-9](:[0-5][0-9])?")  # HH:MM, or HH:MM:SS inside a minute
DAY = re.compile(r"[A-Z][a-z]{2} [0-3][0-9]")  # Jul 05


@pytest.fixture(scope="module")
def backtest_db(tmp_path_factory) -> str:
    """`qf backtest` of the spot capture: 17 round trips, all losses, over ~11 minutes."""
    db = str(tmp_path_factory.mktemp("bt") / "bt.db")
    env = {k: v for k, v in os.environ.items() if not k.startswith("QF_")}
    done = subprocess.run([sys.executable, "-m", "services.cli", "backtest", "--capture", SPOT_CAPTURE, "--db", db],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return db


def report_of(db: str, start: str | None = None, end: str | None = None):
    lo, hi = parse_time(start, "--from"), parse_time(end, "--to")
    return make_report(load_db(db, lo, hi), lo, hi)


@pytest.fixture
def drawn(monkeypatch):
    """Calls a chart function and returns its figure's texts once drawn: {"title", "x", "y", "offset",
    "legend", "colorbar"} (tick labels as lists), and how they lie: "clipped" (texts not wholly inside
    the figure), "legend_above" (the legend over the plot, not on it), "bars_cut" (bars past the x
    limits)."""
    seen = {}

    def capture(fig):
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        ax = fig.axes[0]
        texts = [t for a in fig.axes for t in (*_shown(a.get_xticklabels(), a.get_xlim(), 0),
                                               *_shown(a.get_yticklabels(), a.get_ylim(), 1), a.title, a.xaxis.label,
                                               a.yaxis.label, a.xaxis.get_offset_text(), *a.texts)]
        if ax.get_legend():
            texts += ax.get_legend().get_texts()
        box = fig.bbox

        def inside(t) -> bool:
            e = t.get_window_extent(renderer)
            return box.x0 <= e.x0 and e.x1 <= box.x1 and box.y0 <= e.y0 and e.y1 <= box.y1
        seen.update(clipped=[t.get_text() for t in texts if t.get_visible() and t.get_text() and not inside(t)])
        seen.update(legend_above=bool(ax.get_legend()) and
                    ax.get_legend().get_window_extent(renderer).y0 >= ax.get_window_extent(renderer).y1 - 1)
        lo, hi = ax.get_xlim()
        seen.update(bars_cut=[p.get_x() for p in ax.patches
                              if hasattr(p, "get_width") and (p.get_x() < lo or p.get_x() + p.get_width() > hi)])
        seen.update(title=ax.get_title(loc="left"), x=[t.get_text() for t in ax.get_xticklabels()],
                    y=[t.get_text() for t in ax.get_yticklabels()],
                    offset=ax.xaxis.get_offset_text().get_text(),
                    legend=[t.get_text() for t in ax.get_legend().get_texts()] if ax.get_legend() else [],
                    colorbar=[t.get_text() for t in fig.axes[1].get_yticklabels()] if len(fig.axes) > 1 else [])
        return b""

    def draw(chart, r):
        monkeypatch.setattr(charts, "_png", capture)
        chart(r)
        return dict(seen)
    return draw


def _shown(labels, limits, i):
    """The tick labels matplotlib draws: those of ticks inside the axis' limits."""
    lo, hi = sorted(limits)
    pad = (hi - lo) * 1e-9
    return [t for t in labels if lo - pad <= t.get_position()[i] <= hi + pad]


def _visible(labels: list[str]) -> list[str]:
    return [t for t in labels if t]


@pytest.mark.parametrize("start, end", [
    ("2024-08-09T00:01:00Z", "2024-08-09T00:03:10Z"),  # 2 min 10 s: ticks every 30 s
    ("2024-08-09T00:04:00Z", "2024-08-09T00:04:40Z"),  # 40 s: ticks every 5 s
    (None, None),  # the whole run, ~11 minutes
])
def test_short_spans_show_the_clock_time_on_every_tick(backtest_db, drawn, start, end):
    r = report_of(backtest_db, start, end)
    for chart in (charts.equity_png, charts.drawdown_png):
        labels = _visible(drawn(chart, r)["x"])
        assert len(labels) >= 3 and all(CLOCK.fullmatch(t) for t in labels), labels
        assert len(set(labels)) == len(labels), labels


def test_a_span_of_days_shows_dates_and_clock_times(history, drawn):
    r = report_of(history)
    for chart in (charts.equity_png, charts.drawdown_png):
        got = drawn(chart, r)
        labels = _visible(got["x"])
        assert labels[0] == "Jul 04" and all(CLOCK.fullmatch(t) or DAY.fullmatch(t) for t in labels), labels
        assert got["offset"] == "2024-Jul-07"


def test_the_round_trip_counts_are_whole_numbers_each_once(backtest_db, history, drawn):
    for r in (report_of(backtest_db), report_of(backtest_db, "2024-08-09T00:01:00Z", "2024-08-09T00:03:10Z"),
              report_of(history)):
        labels = _visible(drawn(charts.histogram_png, r)["y"])
        assert labels[0] == "0" and all(re.fullmatch(r"[0-9][0-9,]*", t) for t in labels), labels
        assert len(set(labels)) == len(labels) and [int(t) for t in labels] == sorted(int(t) for t in labels)


def test_amount_ticks_show_every_digit_of_their_step(backtest_db, drawn):
    """Ticks 0.025 apart read -0.375, -0.35, … (not -0.38, -0.35, -0.33), and no "-0"."""
    r = report_of(backtest_db, "2024-08-09T00:01:00Z", "2024-08-09T00:03:10Z")
    for labels in (drawn(charts.histogram_png, r)["x"], drawn(charts.heatmap_png, r)["colorbar"]):
        values = [float(t.replace(",", "")) for t in _visible(labels)]
        steps = np.diff(values)
        assert len(values) >= 3 and np.allclose(steps, steps[0], rtol=1e-6), labels
        assert not any(re.fullmatch(r"-0(\.0*)?", t) for t in labels), labels


def test_the_drawdown_title_says_its_duration_as_the_summary_does(backtest_db, history, drawn):
    for r in (report_of(backtest_db, "2024-08-09T00:01:00Z", "2024-08-09T00:03:10Z"), report_of(history)):
        title = drawn(charts.drawdown_png, r)["title"]
        assert title.endswith(f"not recovered in {duration(r.drawdown.duration_ns)}"), title
    assert drawn(charts.drawdown_png, report_of(history))["title"] == \
        "Drawdown: at most 0.48%, not recovered in 3 d 0 h"


def test_the_heatmap_title_names_one_cell_with_its_pnl(backtest_db, drawn):
    r = report_of(backtest_db, "2024-08-09T00:01:00Z", "2024-08-09T00:03:10Z")
    assert int((r.heat_trips > 0).sum()) == 1 and float(r.heat.sum()) < 0
    title = drawn(charts.heatmap_png, r)["title"]
    assert title == f"P&L by weekday and hour (UTC): only Fri 00h, {charts.money(float(r.heat.sum()), 'USDT', True)}"
    assert "best" not in title and "worst" not in title


def test_the_heatmap_never_calls_a_loss_best_or_a_gain_worst(backtest_db, history, drawn):
    r = report_of(backtest_db)  # two hours, both losses
    assert int((r.heat_trips > 0).sum()) == 2 and (r.heat <= 0).all()
    assert drawn(charts.heatmap_png, r)["title"] == "P&L by weekday and hour (UTC): worst Fri 00h"
    r = report_of(history)  # gains and losses
    best, worst = np.unravel_index(np.argmax(r.heat), r.heat.shape), np.unravel_index(np.argmin(r.heat), r.heat.shape)
    assert r.heat[best] > 0 > r.heat[worst]
    assert drawn(charts.heatmap_png, r)["title"] == (f"P&L by weekday and hour (UTC): best {WEEKDAYS[best[0]]} "
                                                     f"{best[1]:02d}h, worst {WEEKDAYS[worst[0]]} {worst[1]:02d}h")


def test_the_histogram_legend_sits_above_the_bars_and_one_trip_is_singular(backtest_db, drawn):
    r = report_of(backtest_db, "2024-08-09T00:04:00Z", "2024-08-09T00:04:40Z")
    got = drawn(charts.histogram_png, r)
    assert got["title"] == f"P&L per round trip: {r.trips} trips, 0.0% won"
    assert got["legend"][0].startswith("mean ") and got["legend"][1].startswith("median ")


WINDOWS = [(None, None), ("2024-08-09T00:01:00Z", "2024-08-09T00:03:10Z"),
           ("2024-08-09T00:04:00Z", "2024-08-09T00:04:40Z"), ("2024-08-08T23:59:00Z", "2024-08-09T00:00:00Z")]


@pytest.mark.parametrize("start, end", WINDOWS)
def test_no_label_is_cut_off_and_no_bar_cut_or_hidden_by_the_legend(backtest_db, drawn, start, end):
    r = report_of(backtest_db, start, end)
    for chart in (charts.equity_png, charts.drawdown_png, charts.histogram_png, charts.heatmap_png):
        got = drawn(chart, r)
        assert got["clipped"] == [], (chart.__name__, got["clipped"])
        if chart is charts.histogram_png:
            assert got["legend_above"] and got["bars_cut"] == []


def test_one_trip_and_a_tiny_drawdown_read_as_such(backtest_db, drawn):
    r = report_of(backtest_db, "2024-08-08T23:59:00Z", "2024-08-09T00:00:00Z")
    assert r.trips == 1 and 0 < r.drawdown.fraction < 0.0001
    assert drawn(charts.histogram_png, r)["title"] == "P&L per round trip: 1 trip, 0.0% won"
    assert drawn(charts.drawdown_png, r)["title"] == "Drawdown: at most 0.0023%, not recovered in 36 s"
    assert drawn(charts.equity_png, r)["title"].endswith("USDT (-0.0023%) from the start")
    from services.report.markdown import rows
    assert dict(rows(r))["Max drawdown"] == "-0.0023% (-0.2311669041 USDT)"


def test_percentages_keep_two_decimals_and_small_ones_two_digits():
    assert [charts.percent(f) for f in (0, -0.0046254, 0.0001, -0.0000231)] == ["0.00%", "-0.46%", "0.01%", "-0.0023%"]
    assert charts.percent(0.0000231, signed=True) == "+0.0023%"
