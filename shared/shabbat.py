"""The Shabbat and Yom Tov pauses of a place: from candle-lighting to nightfall, as data.

Pure: no I/O, no clock reads — every time is an argument. The sun comes from `astral` (NOAA's
algorithm, the one hebcal.com uses) and the Hebrew calendar from `pyluach`; nothing here does
sun maths of its own beyond choosing which of astral's answers applies.

The rules, as hebcal.com publishes them by default:

- A *holy day* is a Saturday, or (with `yom_tov`) a day on which work is forbidden: Rosh
  Hashana I–II, Yom Kippur, Sukkot I (+II abroad), Shemini Atzeret (+Simchat Torah abroad),
  Pesach I and VII (+II and VIII abroad), Shavuot (I–II abroad). Israel keeps one day where the
  diaspora keeps two (`Place.israel`).
- Consecutive holy days make one pause: it starts at candle-lighting on the eve of the first,
  sunset minus `candles_min` minutes (local custom: 18; Jerusalem 40; Haifa 30), and ends at
  nightfall (tzeit) after the last: the sun `N` degrees below the horizon (default 8.5°, three
  small stars) or a fixed number of minutes after sunset (42, 50, 72…).
- Sunset is the sun's upper limb at the horizon with refraction (astral), seen from the place's
  elevation (0 m for the named cities, as hebcal's default sea-level times); tzeit by degrees is
  geometric and measured from the true horizon.
- Times are whole minutes, rounded outwards: candle-lighting down, nightfall up. The pause is
  never shorter than the exact one (a published time may differ by that minute).

High latitudes (documented fallback, tested):

1. Where the sun does not go `N` degrees down after a sunset (Oslo or Helsinki around midsummer:
   at 60°N the sun is at most ~6.6° down), nightfall is the sun's lowest point, solar midnight
   — the closest the night comes to tzeit, so the pause ends no earlier than any tzeit would.
2. Where the sun does not set (or rise) at all on a day (Tromsø in June or December), that day's
   sunset is taken on the same meridian at the nearest latitude toward the equator where the sun
   sets within a day after that date's solar noon, searched in `FALLBACK_STEP_DEG` steps; its
   nightfall follows rule 1 there (at midsummer both land near solar midnight: a pause of about
   a day from Friday night; at midwinter near noon). A minutes rule counts from that sunset.

"Sunset of a day" is always the first sunset after that local date's solar noon, so a pause
starts on the eve's evening even where the sun sets after midnight. Years 1900..2200 are answered.
"""
from __future__ import annotations

import bisect
import math
import re
import unicodedata
import zoneinfo
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from functools import lru_cache
from typing import TYPE_CHECKING

from astral import Observer, SunDirection
from astral import sun as _sun
from pyluach import dates as _hdates

if TYPE_CHECKING:
    from shared.config import ShabbatConfig

UTC = timezone.utc
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
NS_PER_DAY = 86_400 * 10 ** 9
CHUNK_DAYS = 64  # pauses are computed and memoised per 64 days of their first holy day
HORIZON_DAYS = 400  # next_after() looks this far ahead (more than a year: never a year without a pause)
FALLBACK_STEP_DEG = 0.5  # rule 2: latitude step toward the equator where the sun neither sets nor rises
MAX_CANDLES_MIN = 90
MAX_TZEIT_DEG = 18.0
MAX_TZEIT_MIN = 120
DEFAULT_TZEIT = "8.5deg"
FIRST_YEAR, LAST_YEAR = 1900, 2200  # the years answered (NOAA's sun is good for far more; this bounds the memo)
ISRAEL_ZONES = frozenset({"Asia/Jerusalem", "Asia/Tel_Aviv", "Israel"})

KINDS = ("shabbat", "yom_tov", "shabbat+yom_tov")


# -- places ----------------------------------------------------------------------------------

def _check_lat(lat: float) -> str | None:
    return None if -90.0 <= lat <= 90.0 else f"latitude {lat:g} is outside -90..90"


def _check_lon(lon: float) -> str | None:
    return None if -180.0 <= lon <= 180.0 else f"longitude {lon:g} is outside -180..180"


def _check_elevation(elevation: float) -> str | None:
    return None if -500.0 <= elevation <= 9000.0 else f"elevation {elevation:g} m is outside -500..9000"


def _check_candles(minutes: object) -> str | None:
    if isinstance(minutes, bool) or not isinstance(minutes, int) or not 0 <= minutes <= MAX_CANDLES_MIN:
        return f"candle-lighting minutes must be a whole number from 0 to {MAX_CANDLES_MIN}, not {minutes!r}"
    return None


_NOT_ZONES = frozenset({"localtime", "posixrules", "Factory"})  # files in the zone database, not places


@lru_cache(maxsize=256)
def _check_tz(tz: str) -> str | None:
    try:
        if tz not in _NOT_ZONES and re.fullmatch(r"[A-Za-z][A-Za-z0-9_+\-/]*", tz):
            zoneinfo.ZoneInfo(tz)
            return None
    except (ValueError, KeyError, OSError):  # ZoneInfoNotFoundError is a KeyError; a directory: OSError
        pass
    return f"time zone {tz!r} is not an IANA zone name such as Europe/London or America/New_York"


@dataclass(frozen=True, slots=True)
class Place:
    """Where the pauses are kept: coordinates, IANA zone, elevation (m, for sunset), the local
    custom's candle-lighting minutes, and whether Yom Tov is kept one day (Israel) or two."""

    name: str
    lat: float
    lon: float
    tz: str
    elevation: float = 0.0
    candles_min: int = 18
    israel: bool = False

    def __post_init__(self) -> None:
        problem = (_check_lat(self.lat) or _check_lon(self.lon) or _check_tz(self.tz)
                   or _check_elevation(self.elevation) or _check_candles(self.candles_min))
        if problem:
            raise ValueError(problem)


# Coordinates as hebcal.com's city database gives them (GeoNames); elevation 0: sea-level times.
_CITIES = {
    "Jerusalem": Place("Jerusalem", 31.76904, 35.21633, "Asia/Jerusalem", candles_min=40, israel=True),
    "Tel Aviv": Place("Tel Aviv", 32.08088, 34.78057, "Asia/Jerusalem", israel=True),
    "Haifa": Place("Haifa", 32.81841, 34.9885, "Asia/Jerusalem", candles_min=30, israel=True),
    "New York": Place("New York", 40.71427, -74.00597, "America/New_York"),
    "London": Place("London", 51.50853, -0.12574, "Europe/London"),
    "Paris": Place("Paris", 48.85341, 2.3488, "Europe/Paris"),
    "São Paulo": Place("São Paulo", -23.5475, -46.63611, "America/Sao_Paulo"),
    "Johannesburg": Place("Johannesburg", -26.20227, 28.04363, "Africa/Johannesburg"),
    "Melbourne": Place("Melbourne", -37.814, 144.96332, "Australia/Melbourne"),
    "Los Angeles": Place("Los Angeles", 34.05223, -118.24368, "America/Los_Angeles"),
    "Chicago": Place("Chicago", 41.85003, -87.65005, "America/Chicago"),
    "Toronto": Place("Toronto", 43.70011, -79.4163, "America/Toronto"),
    "Buenos Aires": Place("Buenos Aires", -34.61315, -58.37723, "America/Argentina/Buenos_Aires"),
    "Moscow": Place("Moscow", 55.75222, 37.61556, "Europe/Moscow"),
    "Berlin": Place("Berlin", 52.52437, 13.41053, "Europe/Berlin"),
}
_ALIASES = {"nyc": "New York", "new york city": "New York", "tel aviv yafo": "Tel Aviv",
            "tel aviv jaffa": "Tel Aviv", "yerushalayim": "Jerusalem", "sao paulo": "São Paulo"}


def _key(text: str) -> str:
    """Case, accents, hyphens and spacing folded: "São-Paulo " → "sao paulo"."""
    plain = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    return " ".join(re.sub(r"[-_.'’]", " ", plain.lower()).split())


_LOOKUP = {**{_key(name): p for name, p in _CITIES.items()}, **{k: _CITIES[v] for k, v in _ALIASES.items()}}
KNOWN_CITIES = tuple(_CITIES)


def _number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{what} {text.strip()!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{what} {text.strip()!r} is not a finite number")
    return value


def place(spec: str) -> Place:
    """The Place a setting names: a known city (case, accents and hyphens ignored: "sao paulo",
    "Tel-Aviv") or `LAT,LON,TZ[,ELEVATION]` (degrees north and east, an IANA zone, metres).
    A point keeps Yom Tov the Israeli way (one day) when its zone is Israel's (Asia/Jerusalem),
    and lights candles 18 minutes before sunset. Raises ValueError naming the bad part."""
    text = spec.strip()
    if not text:
        raise ValueError(f"no place given: name one of {', '.join(KNOWN_CITIES)}, or give LAT,LON,TZ[,ELEVATION]")
    if "," not in text:
        found = _LOOKUP.get(_key(text))
        if found is None:
            raise ValueError(f"unknown place {text!r}: name one of {', '.join(KNOWN_CITIES)}, or give "
                             "LAT,LON,TZ[,ELEVATION] such as 59.91,10.75,Europe/Oslo")
        return found
    parts = [p.strip() for p in text.split(",")]
    if len(parts) not in (3, 4):
        raise ValueError(f"{text!r}: a point is LAT,LON,TZ[,ELEVATION] (3 or 4 comma-separated parts, "
                         f"got {len(parts)}), e.g. 59.91,10.75,Europe/Oslo")
    lat, lon = _number(parts[0], "latitude"), _number(parts[1], "longitude")
    elevation = _number(parts[3], "elevation") if len(parts) == 4 else 0.0
    for problem in (_check_lat(lat), _check_lon(lon), _check_tz(parts[2]), _check_elevation(elevation)):
        if problem:
            raise ValueError(f"{text!r}: {problem}")
    return Place(f"{lat:g},{lon:g}", lat, lon, parts[2], elevation, 18, parts[2] in ISRAEL_ZONES)


# -- the nightfall rule ------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Tzeit:
    """Nightfall: the sun `degrees` below the horizon, or `minutes` after sunset (one is None)."""

    degrees: float | None = None
    minutes: int | None = None

    def __str__(self) -> str:
        return f"{self.degrees:g}deg" if self.degrees is not None else f"{self.minutes}min"

    def describe(self) -> str:
        if self.degrees is not None:
            return f"nightfall, the sun {self.degrees:g}° below the horizon"
        return f"{self.minutes} minutes after sunset"


def parse_tzeit(text: str) -> Tzeit:
    """`8.5deg` (any 0 < degrees <= 18) or `42min` (any whole 1..120). Raises ValueError."""
    value = text.strip().lower()
    if m := re.fullmatch(r"(\d+(?:\.\d+)?)\s*deg", value):
        degrees = float(m[1])
        if 0.0 < degrees <= MAX_TZEIT_DEG:
            return Tzeit(degrees=degrees)
        raise ValueError(f"nightfall {text.strip()!r}: degrees below the horizon must be above 0 and at most "
                         f"{MAX_TZEIT_DEG:g}")
    if m := re.fullmatch(r"(\d+)\s*min", value):
        minutes = int(m[1])
        if 1 <= minutes <= MAX_TZEIT_MIN:
            return Tzeit(minutes=minutes)
        raise ValueError(f"nightfall {text.strip()!r}: minutes after sunset must be 1 to {MAX_TZEIT_MIN}")
    raise ValueError(f"nightfall {text.strip()!r} is neither degrees below the horizon ('8.5deg') nor minutes "
                     "after sunset ('42min', '50min', '72min')")


# -- pauses ----------------------------------------------------------------------------------

def _ns(t: datetime) -> int:
    return (t - EPOCH) // timedelta(microseconds=1) * 1000


@dataclass(frozen=True, slots=True)
class Pause:
    """One pause: `start` (candle-lighting) inclusive, `end` (nightfall) exclusive, both aware
    datetimes in the place's zone; `kind` is "shabbat", "yom_tov" or "shabbat+yom_tov"; `name`
    e.g. "Shabbat", "Pesach VII–VIII", "Rosh Hashana I–II + Shabbat"."""

    start: datetime
    end: datetime
    kind: str
    name: str

    @property
    def start_ns(self) -> int:
        return _ns(self.start)

    @property
    def end_ns(self) -> int:
        return _ns(self.end)

    def to_json(self) -> dict:
        """{"start", "end" (ISO-8601 with the UTC offset, local time), "kind", "name"}."""
        return {"start": self.start.isoformat(), "end": self.end.isoformat(), "kind": self.kind, "name": self.name}


_FESTIVALS = {"Rosh Hashana": "Rosh Hashana", "Yom Kippur": "Yom Kippur", "Succos": "Sukkot",
              "Shmini Atzeres": "Shemini Atzeret", "Simchas Torah": "Simchat Torah", "Pesach": "Pesach",
              "Shavuos": "Shavuot"}
_ROMAN = {1: "I", 2: "II", 7: "VII", 8: "VIII"}


@dataclass(frozen=True, slots=True)
class _Day:
    """A holy day: its civil date, whether it is a Saturday, and its Yom Tov (name, day number)."""

    day: date
    shabbat: bool
    festival: str | None
    number: int | None


def _floor_minute(t: datetime) -> datetime:
    return t.replace(second=0, microsecond=0)


def _ceil_minute(t: datetime) -> datetime:
    floor = _floor_minute(t)
    return floor if floor == t else floor + timedelta(minutes=1)


class Calendar:
    """The pauses of one place under one set of rules, computed on demand and memoised.

    `pauses(start, end)` lists them by date; `at(t_ns)` and `next_after(t_ns)` answer for an
    instant. After the first call for a period (a library pass over 64 days, ~1 ms), a call is a
    bisection over memoised integers with no library call: cheap enough for every order."""

    def __init__(self, where: Place, *, yom_tov: bool = True, candles_min: int | None = None,
                 tzeit: str = DEFAULT_TZEIT) -> None:
        """Raises ValueError for candle-lighting minutes outside 0..90 or a bad nightfall rule."""
        if candles_min is not None and (problem := _check_candles(candles_min)):
            raise ValueError(problem)
        self._where = where
        self._yom_tov = bool(yom_tov)
        self._candles = where.candles_min if candles_min is None else candles_min
        self._tzeit = parse_tzeit(tzeit)
        self._zone = zoneinfo.ZoneInfo(where.tz)
        # the memo: pauses whose first holy day lies in chunks [_lo, _hi), sorted, with their ns
        self._lo = self._hi = 0
        self._pauses: list[Pause] = []
        self._starts: list[int] = []
        self._ends: list[int] = []

    @property
    def where(self) -> Place:
        return self._where

    @property
    def yom_tov(self) -> bool:
        return self._yom_tov

    @property
    def candles_min(self) -> int:
        """Candle-lighting minutes before sunset in force (the place's custom unless overridden)."""
        return self._candles

    @property
    def tzeit(self) -> Tzeit:
        return self._tzeit

    # -- queries -------------------------------------------------------------------------

    def pauses(self, start: date, end: date) -> list[Pause]:
        """Every pause overlapping the local days `start`..`end` (both included), sorted.
        Raises ValueError when `end` is before `start`."""
        if end < start:
            raise ValueError(f"the range ends ({end}) before it starts ({start})")
        first, last = _epoch_day(start), _epoch_day(end)
        self._cover(first - 5, last + 3)
        lo = datetime.combine(start, time(), tzinfo=self._zone)
        hi = datetime.combine(end + timedelta(days=1), time(), tzinfo=self._zone)
        lo_ns, hi_ns = _ns(lo), _ns(hi)
        i = bisect.bisect_right(self._ends, lo_ns)  # ends are sorted too: pauses never overlap
        out = []
        while i < len(self._pauses) and self._starts[i] < hi_ns:
            out.append(self._pauses[i])
            i += 1
        return out

    def at(self, t_ns: int) -> Pause | None:
        """The pause containing `t_ns` (ns since the epoch; start inclusive, end exclusive), or None."""
        day = t_ns // NS_PER_DAY
        self._cover(day - 6, day + 2)
        i = bisect.bisect_right(self._starts, t_ns) - 1
        if i >= 0 and t_ns < self._ends[i]:
            return self._pauses[i]
        return None

    def next_after(self, t_ns: int) -> Pause | None:
        """The first pause starting strictly after `t_ns`, looking HORIZON_DAYS ahead; None if none."""
        day = t_ns // NS_PER_DAY
        self._cover(day - 6, day + 2)
        i = bisect.bisect_right(self._starts, t_ns)
        while i == len(self._starts) and self._hi * CHUNK_DAYS <= min(day + HORIZON_DAYS, _LAST_DAY - 3):
            self._cover(day, self._hi * CHUNK_DAYS)  # one more chunk
        if i < len(self._starts) and self._starts[i] <= (day + HORIZON_DAYS + 1) * NS_PER_DAY:
            return self._pauses[i]
        return None

    # -- the memo ------------------------------------------------------------------------

    def _cover(self, first_day: int, last_day: int) -> None:
        """Make the memo hold every pause whose first holy day is in epoch days first..last.
        Raises ValueError outside FIRST_YEAR..LAST_YEAR."""
        if first_day < _FIRST_DAY or last_day > _LAST_DAY:
            raise ValueError(f"the Shabbat calendar answers for {FIRST_YEAR}..{LAST_YEAR} only")
        lo, hi = first_day // CHUNK_DAYS, last_day // CHUNK_DAYS + 1
        if self._lo <= lo and hi <= self._hi and self._hi > self._lo:
            return
        if self._hi == self._lo:  # empty
            self._lo = self._hi = lo
        before = [p for k in range(lo, self._lo) for p in self._chunk(k)]
        after = [p for k in range(self._hi, hi) for p in self._chunk(k)]
        if before or after:
            self._pauses = before + self._pauses + after
            self._starts = [p.start_ns for p in before] + self._starts + [p.start_ns for p in after]
            self._ends = [p.end_ns for p in before] + self._ends + [p.end_ns for p in after]
        self._lo, self._hi = min(self._lo, lo), max(self._hi, hi)

    def _chunk(self, k: int) -> list[Pause]:
        """The pauses whose first holy day is in epoch days [k*CHUNK_DAYS, (k+1)*CHUNK_DAYS)."""
        out = []
        for n in range(k * CHUNK_DAYS, (k + 1) * CHUNK_DAYS):
            d = _date(n)
            first = self._holy(d)
            if first is None or self._holy(d - timedelta(days=1)) is not None:
                continue
            run = [first]
            while (nxt := self._holy(run[-1].day + timedelta(days=1))) is not None:
                run.append(nxt)
            out.append(self._pause(run))
        return out

    def _holy(self, d: date) -> _Day | None:
        shabbat = d.weekday() == 5
        festival = number = None
        if self._yom_tov:
            text = _hdates.GregorianDate(d.year, d.month, d.day).festival(
                israel=self._where.israel, include_working_days=False, prefix_day=True)
            if text:
                head, _, rest = text.partition(" ")
                if head.isdigit():
                    number, text = int(head), rest
                festival = _FESTIVALS[text]
        if not shabbat and festival is None:
            return None
        return _Day(d, shabbat, festival, number)

    def _pause(self, run: list[_Day]) -> Pause:
        eve = run[0].day - timedelta(days=1)
        sunset_eve, _ = self._sunset(eve)
        start = _floor_minute((sunset_eve - timedelta(minutes=self._candles)).astimezone(self._zone))
        end = _ceil_minute(self._nightfall(run[-1].day).astimezone(self._zone))
        shabbat = any(d.shabbat for d in run)
        festive = any(d.festival for d in run)
        kind = "shabbat+yom_tov" if shabbat and festive else ("yom_tov" if festive else "shabbat")
        return Pause(start, end, kind, _name(run))

    # -- the sun (astral) ----------------------------------------------------------------

    def _sunset(self, d: date) -> tuple[datetime, float]:
        """The first sunset (UTC) after local date `d`'s solar noon — `d`'s evening even where the
        sun sets after midnight — and the latitude it was taken at (fallback rule 2)."""
        lat = self._where.lat
        while True:
            obs = Observer(lat, self._where.lon, max(self._where.elevation, 0.0))
            noon = _sun.noon(obs, d)
            local = noon.astimezone(self._zone).date()
            if local != d:  # a zone far from its solar time (UTC+14 at 157°W): astral counts UTC dates
                noon = _sun.noon(obs, d + (d - local))
            for i in (-1, 0, 1):
                try:  # the zenith astral's sunset() uses: the upper limb, with refraction
                    t = _sun.time_of_transit(obs, d + timedelta(days=i), 90.0 + _sun.SUN_APPARENT_RADIUS,
                                             SunDirection.SETTING)
                except ValueError:  # polar day or night at this latitude
                    continue
                if noon < t < noon + timedelta(days=1):
                    return t, lat
            if abs(lat) < FALLBACK_STEP_DEG:  # cannot happen: the sun sets everywhere near the equator
                raise ValueError(f"no sunset found for {self._where.name} on {d}")
            lat -= math.copysign(FALLBACK_STEP_DEG, lat)

    def _nightfall(self, d: date) -> datetime:
        """Nightfall (UTC) after local date `d`'s sunset."""
        sunset, lat = self._sunset(d)
        if self._tzeit.minutes is not None:
            return sunset + timedelta(minutes=self._tzeit.minutes)
        obs = Observer(lat, self._where.lon, 0.0)
        midnight = next(m for m in (_sun.midnight(obs, d + timedelta(days=i)) for i in range(4)) if m > sunset)
        zenith = 90.0 + self._tzeit.degrees
        for i in (-1, 0, 1):
            try:
                t = _sun.time_of_transit(obs, d + timedelta(days=i), zenith, SunDirection.SETTING,
                                         with_refraction=False)
            except ValueError:  # the sun does not go that far down on that day
                continue
            if sunset < t <= midnight:
                return t
        return midnight  # fallback rule 1: the sun's lowest point


def _epoch_day(d: date) -> int:
    return d.toordinal() - EPOCH_ORDINAL


_FIRST_DAY = _epoch_day(date(FIRST_YEAR, 1, 1)) + 7  # margins for the days around a query
_LAST_DAY = _epoch_day(date(LAST_YEAR, 12, 31)) - 7


def _date(epoch_day: int) -> date:
    return date.fromordinal(epoch_day + EPOCH_ORDINAL)


def _name(run: list[_Day]) -> str:
    """ "Shabbat", "Pesach VII–VIII", "Shabbat + Shavuot I–II", "Rosh Hashana I–II + Shabbat":
    in order of the days, Yom Tov days of one festival collapsed to a span; a Shabbat that is
    also Yom Tov named last."""
    parts: list[str] = []
    spans: dict[str, list[int]] = {}  # festival -> its day numbers, in the order met
    for d in run:
        label = d.festival or "Shabbat"
        if label not in spans:
            spans[label] = []
            parts.append(label)
        if d.number is not None:
            spans[label].append(d.number)
    names = []
    for label in parts:
        numbers = spans[label]
        if numbers:
            label += " " + _ROMAN[numbers[0]] + ("–" + _ROMAN[numbers[-1]] if len(numbers) > 1 else "")
        names.append(label)
    if any(d.shabbat and d.festival for d in run):
        names.append("Shabbat")
    return " + ".join(names)


def calendar_from(cfg: "ShabbatConfig") -> Calendar:
    """The Calendar the QF_SHABBAT_* settings describe (already validated by config.load)."""
    minutes = int(cfg.candles_min) if cfg.candles_min else None
    return Calendar(place(cfg.location), yom_tov=cfg.yom_tov, candles_min=minutes, tzeit=cfg.tzeit)


# -- the pause's phase at an instant (risk's enforcement, the API, `qf up`) -----------------------

FLATTEN, PAUSED = "flatten", "paused"  # the phases besides "" (trading as usual)


def phase_at(cal: Calendar, t_ns: int, flatten_ns: int) -> tuple[str, Pause | None, int]:
    """(phase, pause, until_ns) at `t_ns`: PAUSED inside a pause (the pause, its end); FLATTEN in
    the `flatten_ns` before one starts (the coming pause, its start); else "" (the next pause or
    None, the instant the flatten window opens). `until_ns` is when the answer may next change:
    a caller that keeps it need not ask again before then. Pure."""
    cur = cal.at(t_ns)
    if cur is not None:
        return PAUSED, cur, cur.end_ns
    nxt = cal.next_after(t_ns)
    if nxt is None:
        return "", None, t_ns + NS_PER_DAY
    opens = nxt.start_ns - flatten_ns
    if t_ns >= opens:
        return FLATTEN, nxt, nxt.start_ns
    return "", nxt, opens
