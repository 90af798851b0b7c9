"""How the notifier's messages read: plain text for a phone's lock screen, the news on the first line.

Plain text, not Markdown or HTML: an alert's text, a risk reason or a symbol may hold any
character, and one stray `_` or `<` in a parse mode makes Telegram refuse the whole message
(400 "can't parse entities"). Numbers keep their exact decimals, thousands separated;
times are UTC unless a risk reason brings its own zone (the Shabbat pauses)."""
from __future__ import annotations

import re
from collections import defaultdict
from datetime import datetime, timezone
from decimal import Decimal
from typing import Iterable, Sequence

from shared.enums import Side, TradingState
from shared.messages import Alert, Fill, RiskState
from shared.money import MONEY, canonical

MAX_TEXT = 4096  # Telegram's limit for a message's text
MAX_CAPTION = 1024  # ... and for a photo's caption
FILL_LINES = 10  # a batch lists this many fills, then "… and N more"
DETAIL_CHARS = 300  # an alert's or a feed status's detail is cut here

ICON = {"buy": "🟢", "sell": "🔴", "batch": "🔁", TradingState.HALTED: "⛔", TradingState.REDUCING: "⚠️",
        TradingState.ACTIVE: "✅", TradingState.PAUSED_SHABBAT: "🕯", "error": "🚨", "warning": "⚠️",
        "resolved": "✅", "restart": "🔄", "silent": "🔇", "back": "🔊", "feed": "📡", "replay": "🏁",
        "report": "📊", "hello": "👋"}


# -- numbers and times --------------------------------------------------------------

def number(value: Decimal, min_places: int = 0) -> str:
    """`value` exactly, thousands separated, at least `min_places` decimals: 61234.5 → 61,234.50."""
    d = canonical(value)
    if -d.as_tuple().exponent < min_places:
        d = d.quantize(Decimal(1).scaleb(-min_places), context=MONEY)
    return format(d, ",f")


def price(value: Decimal) -> str:
    return number(value, 2)


def money(value: Decimal, places: int = 2) -> str:
    """An amount of money for a person: rounded half-even to `places`, thousands separated."""
    return number(value.quantize(Decimal(1).scaleb(-places), context=MONEY), places)


def signed(value: Decimal, places: int = 2) -> str:
    """+12.34 / -12.34 (rounded half-even to `places`)."""
    d = value.quantize(Decimal(1).scaleb(-places), context=MONEY)
    return ("+" if d >= 0 else "-") + number(abs(d), places)


def percent(fraction: Decimal, places: int = 2) -> str:
    """A fraction as a percentage: 0.021 → 2.10%."""
    return number((fraction * 100).quantize(Decimal(1).scaleb(-places), context=MONEY), places) + "%"


def duration(seconds: float) -> str:
    """45s, 3m05s, 2h04m, 1d03h."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def utc(ns: int, fmt: str = "%H:%M:%S") -> str:
    return datetime.fromtimestamp(ns / 1e9, timezone.utc).strftime(fmt) + " UTC"


def clip(text: str, limit: int = MAX_TEXT) -> str:
    """`text` within Telegram's `limit`, cut at a line where it can be."""
    if len(text) <= limit:
        return text
    cut = text.rfind("\n", 0, limit - 2)
    cut = cut if cut > limit // 2 else limit - 2
    return text[:cut] + "\n…"


def _detail(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= DETAIL_CHARS else text[:DETAIL_CHARS - 1] + "…"


# -- fills --------------------------------------------------------------------------

def _fill_line(f: Fill) -> str:
    side = "BUY" if f.side is Side.BUY else "SELL"
    icon = ICON["buy"] if f.side is Side.BUY else ICON["sell"]
    return f"{icon} {side} {number(f.qty)} @ {price(f.price)} ({f.liquidity.value.lower()})"


def _fees(fills: Iterable[Fill]) -> str:
    by_asset: dict[str, Decimal] = defaultdict(Decimal)
    for f in fills:
        by_asset[f.fee_asset] += f.fee
    return " + ".join(f"{number(v)} {asset}" for asset, v in sorted(by_asset.items())) or "0"


def _vwap(fills: Sequence[Fill]) -> tuple[Decimal, Decimal]:
    qty = sum((f.qty for f in fills), Decimal(0))
    notional = sum((f.qty * f.price for f in fills), Decimal(0))
    places = max(-canonical(f.price).as_tuple().exponent for f in fills)
    avg = (notional / qty).quantize(Decimal(1).scaleb(-max(places, 2)), context=MONEY)
    return qty, avg


def fills_text(symbol: str, fills: Sequence[Fill]) -> str:
    """One message for one fill, or for a burst of fills of `symbol` (in arrival order):

    🟢 Bought 0.0012 BTCUSDT @ 61,234.50
    fee 0.07348 USDT (taker)

    🔁 3 fills BTCUSDT
    🟢 BUY 0.001 @ 61,234.50 (maker)
    …
    Bought 0.002 @ avg 61,234.75 · sold 0.002 @ avg 61,240.10
    Fees 0.36707 USDT
    """
    if len(fills) == 1:
        f = fills[0]
        verb, icon = ("Bought", ICON["buy"]) if f.side is Side.BUY else ("Sold", ICON["sell"])
        return (f"{icon} {verb} {number(f.qty)} {symbol} @ {price(f.price)}\n"
                f"fee {_fees(fills)} ({f.liquidity.value.lower()})")
    lines = [f"{ICON['batch']} {len(fills)} fills {symbol}"]
    lines += [_fill_line(f) for f in fills[:FILL_LINES]]
    if len(fills) > FILL_LINES:
        lines.append(f"… and {len(fills) - FILL_LINES} more")
    totals = []
    for side, verb in ((Side.BUY, "bought"), (Side.SELL, "sold")):
        part = [f for f in fills if f.side is side]
        if part:
            qty, avg = _vwap(part)
            totals.append(f"{verb} {number(qty)} @ avg {price(avg)}")
    total = " · ".join(totals)
    lines.append(total[:1].upper() + total[1:])
    lines.append(f"Fees {_fees(fills)}")
    return clip("\n".join(lines))


# -- the trading state ----------------------------------------------------------------

# risk's reasons for the calendar's changes (services/risk/core.py on_clock), times `Fri 2026-12-11 15:55 IST`
_LOCAL = r"(?P<{}>[A-Z][a-z]{{2}}) \d{{4}}-\d{{2}}-\d{{2}} (?P<{}>\d{{2}}:\d{{2}}) (?P<{}>\S+)"
_PAUSE = re.compile(r"(?P<name>.+?): from " + _LOCAL.format("d1", "t1", "z1") + " to "
                    + _LOCAL.format("d2", "t2", "z2") + "$")
_FLATTEN = re.compile(r"(?P<name>.+?) starts at " + _LOCAL.format("d1", "t1", "z1") + ":")
_ENDED = re.compile(r"(?P<name>.+?) ended at " + _LOCAL.format("d1", "t1", "z1") + r"(?:; (?P<rest>.*))?$")


def _when(m: re.Match, i: int) -> str:
    return f"{m[f'd{i}']} {m[f't{i}']} {m[f'z{i}']}"  # Sat 17:16 IST


def state_text(msg: RiskState, previous: TradingState | None) -> str:
    """One message for a change of risk's trading state, with its reason:

    🕯 Paused for Shabbat until Sat 17:16 IST
    ⛔ Trading halted / <reason> / Equity 9,790.12 · drawdown 2.10%
    """
    state, reason = msg.state, msg.reason.strip()
    figures = f"Equity {money(msg.equity)} · drawdown {percent(msg.drawdown)}"
    if state is TradingState.PAUSED_SHABBAT and (m := _PAUSE.match(reason)):
        return (f"{ICON[state]} Paused for {m['name']} until {_when(m, 2)}\n"
                f"No trading from {_when(m, 1)}; it resumes by itself.")
    if state is TradingState.REDUCING and (m := _FLATTEN.match(reason)):
        return (f"{ICON[TradingState.PAUSED_SHABBAT]} {m['name']} at {_when(m, 1)}: closing positions, "
                f"no new entries\n{figures}")
    if m := _ENDED.match(reason):
        if state is TradingState.ACTIVE:
            return f"{ICON[state]} {m['name']} is over: trading resumed ({_when(m, 1)})\n{figures}"
        return f"{ICON[state]} {m['name']} is over, trading stays {state.value}\n{_detail(m['rest'] or '')}\n{figures}"
    was = f" (was {previous.value})" if previous is not None and previous is not state else ""
    head = {TradingState.HALTED: "Trading halted",
            TradingState.REDUCING: "Reducing only: positions may shrink, no new entries",
            TradingState.ACTIVE: "Trading active again",
            TradingState.PAUSED_SHABBAT: "Trading paused for Shabbat or Yom Tov"}[state]
    body = _detail(reason) if reason else "(no reason given)"
    return f"{ICON[state]} {head}{was}\n{body}\n{figures}"


# -- alerts, services, market data -------------------------------------------------------

def alert_text(msg: Alert) -> str:
    """🚨 broker: STORE_UNAVAILABLE / <the alert's own line>; ✅ Resolved: …"""
    if msg.severity == "resolved":
        return f"{ICON['resolved']} Resolved: {msg.service} {msg.code}\n{_detail(msg.text)}"
    icon = ICON["error"] if msg.severity == "error" else ICON["warning"]
    return f"{icon} {msg.service}: {msg.code}\n{_detail(msg.text)}"


def restart_text(service: str, old_pid: int, new_pid: int, started_ts: int, silent_s: float | None) -> str:
    pids = f"pid {old_pid} → {new_pid}" if old_pid != new_pid else f"pid {new_pid}"
    after = f" after {duration(silent_s)} of silence" if silent_s is not None else ""
    return f"{ICON['restart']} {service} restarted{after} ({pids}, up since {utc(started_ts)})"


def silent_text(service: str, silent_s: float, last_ns: int) -> str:
    return f"{ICON['silent']} {service} is silent: no heartbeat for {duration(silent_s)} (last at {utc(last_ns)})"


def back_text(service: str, silent_s: float) -> str:
    return f"{ICON['back']} {service} is back after {duration(silent_s)} without a heartbeat (same process)"


def feed_down_text(symbol: str, state: str, detail: str, down_s: float) -> str:
    why = f"{state}: {_detail(detail)}" if detail else state
    return f"{ICON['feed']} Market data {symbol}: no order book for {duration(down_s)}\n{why}"


def feed_back_text(symbol: str, down_s: float) -> str:
    return f"{ICON['feed']} Market data {symbol} is back: book in sync after {duration(down_s)} without one"


def replay_done_text(symbol: str) -> str:
    return f"{ICON['replay']} Replay finished for {symbol}: no more market data from the capture"


def replay_failed_text(symbol: str, detail: str) -> str:
    return f"{ICON['error']} Replay stopped for {symbol}: {detail[:300]}"


def hello_text(report_at: str) -> str:
    report = f", and a daily report at {report_at} UTC" if report_at else ""
    return (f"{ICON['hello']} QuantumFlow notifier is on.\n"
            f"You will hear of trades, halts and pauses, alerts and service restarts{report}.")
