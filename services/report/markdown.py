"""The report as Markdown: the summary table, the block of the README, and rewriting that block (pure text).

Money is the exact decimal text the API shows (shared/money.py `text`: no exponent, no trailing
zeros); ratios are rounded for reading. Nothing here reads the clock: the period is the data's.
"""
from __future__ import annotations

from decimal import Decimal

from services.report.charts import CHARTS, duration, percent, period, when
from services.report.core import Report
from shared.money import text as money_text

START, END = "<!-- report:start -->", "<!-- report:end -->"


class MarkerError(ValueError):
    """The README has no block to rewrite: a marker missing, repeated, or the end before the
    start. Handled by the CLI: one line, exit status 2, the README untouched."""


def money(amounts: dict[str, Decimal], signed: bool = False) -> str:
    """`+12.5 USDT` (several assets joined by ` + `); `0` when there are none."""
    parts = [f"{'+' if signed and v > 0 else ''}{money_text(v)} {asset or '(quote)'}"
             for asset, v in amounts.items() if v or len(amounts) == 1]
    return " + ".join(parts) if parts else "0"


def _ratio(value: float | None, digits: int = 2, missing: str = "n/a") -> str:
    return missing if value is None else f"{value:.{digits}f}"


def rows(r: Report, has_states: bool = True) -> list[tuple[str, str]]:
    """The summary as (figure, value) rows."""
    out = [("Period", f"{period(r)} ({duration(r.end - r.start)})" if r.start is not None else period(r))]
    if not r.fills:
        out.append(("Trades", "none yet: no fills in this period"))
        if r.equity_end is not None:
            out.append(("Equity", f"{money_text(r.equity_end)} {r.quote or ''}".rstrip()))
        return out
    out.append(("Trades", f"{r.trips:,} round trips (from {r.fills:,} fills)"))
    out.append(("Net P&L", f"{money(r.net_pnl, signed=True)} (realized and open at the last fill price, after fees)"))
    out.append(("Fees", money(r.fees)))
    if r.equity_start is not None and r.equity_end is not None:
        out.append(("Equity", f"{money_text(r.equity_start)} → {money_text(r.equity_end)} {r.quote}".rstrip()
                    + " (snapshots, marked to mid)"))
    out.append(("Win rate", f"{r.win_rate:.1%} ({r.wins:,} of {r.trips:,} round trips)" if r.trips
                else "n/a (no round trip closed)"))
    out.append(("Profit factor", _ratio(r.profit_factor, missing="n/a (no losing trip)" if r.trips else "n/a")))
    basis = f"{r.hourly_closes:,} hourly closes, annualised"
    why = "n/a (no starting balance: give --start-cash)" if r.curve is not None and r.curve.derived \
        and (r.curve.start is None or r.curve.start <= 0) else "n/a (too few hourly closes, or no change)"
    out.append(("Sharpe", f"{r.sharpe:.2f} ({basis})" if r.sharpe is not None else why))
    out.append(("Sortino", f"{r.sortino:.2f} ({basis})" if r.sortino is not None else
                why if r.sharpe is None else "n/a (no losing hour)"))
    dd = r.drawdown
    if dd is None:
        out.append(("Max drawdown", "n/a (fewer than two equity points)"))
    elif not dd.amount:
        out.append(("Max drawdown", "none"))
    else:
        amount = money({r.quote: dd.amount.copy_negate()})
        out.append(("Max drawdown", f"{percent(-dd.fraction)} ({amount})" if dd.fraction is not None else amount))
        end = f"recovered {when(dd.recovered_ts)}" if dd.recovered_ts is not None else "not recovered"
        out.append(("Max drawdown duration", f"{duration(dd.duration_ns)} (peak {when(dd.peak_ts)}, "
                                             f"trough {when(dd.trough_ts)}, {end})"))
    if r.slippage_fills:
        bps = f"{r.slippage_bps:.3f} bp of notional, " if r.slippage_bps is not None else ""
        out.append(("Average slippage", f"{bps}cost {money(r.slippage_cost, signed=True)} over {r.slippage_fills:,} "
                                        "fills (against the arrival mid; > 0 a cost)"))
    else:
        out.append(("Average slippage", "n/a (no fill with an arrival mid)"))
    share = f"{r.maker_fills / r.fills:.1%} of fills"
    if r.maker_notional_share is not None:
        share += f", {r.maker_notional_share:.1%} of notional"
    out.append(("Maker share", share))
    if not has_states:
        out.append(("Risk states", "not in this source (a CSV export holds fills only)"))
    return out


def table(r: Report, has_states: bool = True) -> str:
    """The summary as a Markdown table."""
    lines = ["| Figure | Value |", "|---|---|"]
    lines += [f"| {k} | {v.replace('|', '/')} |" for k, v in rows(r, has_states)]
    return "\n".join(lines)


def block(r: Report, source: str, image_dir: str, has_states: bool = True) -> str:
    """The report as Markdown: a line saying what it is, the table, the charts (linked under
    `image_dir`, relative to the document; "" for the same directory)."""
    prefix = f"{image_dir.rstrip('/')}/" if image_dir not in ("", ".") else ""
    images = "\n\n".join(f"![{alt}]({prefix}{name})" for name, alt, _ in CHARTS)
    return (f"*Made by `qf report` from the {source}: {period(r)}.*\n\n"
            f"{table(r, has_states)}\n\n{images}\n")


def replace_block(text: str, content: str, name: str = "README") -> str:
    """`text` with what lies between its START and END markers replaced by `content` (the
    markers and everything outside them kept byte for byte). Raises MarkerError."""
    for marker in (START, END):
        n = text.count(marker)
        if n != 1:
            raise MarkerError(f"{name} has {'no' if n == 0 else n} {marker!s} marker{'s' if n > 1 else ''}: "
                              f"put one {START} and one {END} line where the report goes")
    i, j = text.index(START), text.index(END)
    if j < i:
        raise MarkerError(f"{name}: {END} comes before {START}")
    return f"{text[:i + len(START)]}\n{content.strip(chr(10))}\n{text[j:]}"
