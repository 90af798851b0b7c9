"""`qf calendar`: the shell around shared/shabbat.py — arguments, today's date, the table or JSON.

Exit status: 0 listed (an empty range is fine); 2 bad input (a date not YYYY-MM-DD, --to before
--from, a range over MAX_DAYS, an unknown --location, a bad QF_* setting), one line on stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from datetime import date, datetime, timedelta, timezone

EXIT_BAD_INPUT = 2
DEFAULT_DAYS = 30  # without --to: this many days after --from
MAX_DAYS = 5 * 366  # a longer range is a typo, and a slow one


class BadInput(Exception):
    """A one-line reason the calendar cannot be listed, naming the argument or setting at fault."""


def add_parser(sub) -> None:
    p = sub.add_parser("calendar", help="list the Shabbat and Yom Tov pauses (candle-lighting to nightfall) "
                                        "of a place",
                       description="Lists every pause of trading for Shabbat and Yom Tov that overlaps the "
                                   "days --from..--to (local days of the place): from candle-lighting on the "
                                   "eve to nightfall after the last holy day, consecutive days merged into one. "
                                   "The rules come from QF_SHABBAT_* (`qf config`); times are the place's "
                                   "local time. Exit status 0, or 2 for bad input.")
    p.add_argument("--from", dest="start", metavar="YYYY-MM-DD", help="first day (default: today, UTC)")
    p.add_argument("--to", dest="end", metavar="YYYY-MM-DD",
                   help=f"last day, included (default: {DEFAULT_DAYS} days after --from; at most "
                        f"{MAX_DAYS} days after it)")
    p.add_argument("--location", help="overrides QF_SHABBAT_LOCATION: a city (e.g. 'New York', 'sao paulo') "
                                      "or LAT,LON,TZ[,ELEVATION]")
    p.add_argument("--json", action="store_true",
                   help='print one JSON array of {"start", "end" (ISO-8601 with the UTC offset), "kind", "name"}')
    p.set_defaults(func=main)


def _day(text: str, flag: str) -> date:
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text.strip()):
        raise BadInput(f"{flag} {text!r} is not a date like 2027-04-21")
    try:
        return date.fromisoformat(text.strip())
    except ValueError as exc:
        raise BadInput(f"{flag} {text!r}: {exc}") from None


def _range(args: argparse.Namespace, today: date) -> tuple[date, date]:
    start = _day(args.start, "--from") if args.start else today
    end = _day(args.end, "--to") if args.end else start + timedelta(days=DEFAULT_DAYS)
    if end < start:
        raise BadInput(f"--to {end} is before --from {start}")
    if (end - start).days > MAX_DAYS:
        raise BadInput(f"--from {start} --to {end} spans {(end - start).days} days; at most {MAX_DAYS} "
                       "(5 years) at a time")
    return start, end


def _calendar(args: argparse.Namespace):
    from shared import config as qfconfig
    from shared.errors import ConfigError
    from shared.shabbat import calendar_from, place

    env = dict(os.environ)
    if args.location is not None:
        try:
            place(args.location)
        except ValueError as exc:
            raise BadInput(f"--location: {exc}") from None
        env["QF_SHABBAT_LOCATION"] = args.location
    try:
        cfg = qfconfig.load(env)
    except ConfigError as exc:
        raise BadInput(qfconfig.mask_secrets(str(exc))) from None
    return calendar_from(cfg.shabbat)


def _coords(lat: float, lon: float) -> str:
    return f"{abs(lat):.4f}°{'N' if lat >= 0 else 'S'}, {abs(lon):.4f}°{'E' if lon >= 0 else 'W'}"


def _when(t: datetime) -> str:
    return f"{t:%a %Y-%m-%d %H:%M} {t.tzname()}"


def _duration(pause) -> str:
    minutes = (pause.end_ns - pause.start_ns) // 60_000_000_000
    return f"{minutes // 60}h{minutes % 60:02d}m"


def render(cal, start: date, end: date, pauses: list) -> str:
    """The table: a header naming the place and the rules, then one line per pause."""
    where = cal.where
    lines = [f"Shabbat{' and Yom Tov' if cal.yom_tov else ''} pauses for {where.name} "
             f"({_coords(where.lat, where.lon)}, {where.tz}"
             f"{f', {where.elevation:g} m' if where.elevation else ''}), {start} to {end}",
             f"starts: candle-lighting, {cal.candles_min} min before sunset; ends: {cal.tzeit.describe()}; "
             f"Yom Tov {'as in Israel (one day)' if where.israel else 'as abroad (two days)'}"
             if cal.yom_tov else
             f"starts: candle-lighting, {cal.candles_min} min before sunset; ends: {cal.tzeit.describe()}; "
             "Yom Tov not included",
             ""]
    if not pauses:
        lines.append("(no pause in this range)")
        return "\n".join(lines)
    rows = [(_when(p.start), _when(p.end), _duration(p), p.kind, p.name) for p in pauses]
    head = ("start", "end", "length", "kind", "name")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
    for r in [head, *rows]:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4])
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    today = datetime.now(timezone.utc).date()  # the shell's one clock read
    try:
        start, end = _range(args, today)
        cal = _calendar(args)
    except BadInput as exc:
        print(f"qf calendar: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    pauses = cal.pauses(start, end)
    if args.json:
        print(json.dumps([p.to_json() for p in pauses], ensure_ascii=False))
    else:
        print(render(cal, start, end, pauses))
    return 0
