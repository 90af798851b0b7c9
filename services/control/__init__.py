"""The one control and query layer (issue #15): what the REST views, the Telegram commands and
`qf status|positions|trades|halt|resume|flatten` answer with and act through. No front end
imports another; each imports this.

`Control(cfg, clock)` reads the database read-only (`queries`, through `dbreader`: never a
writer's lock) and acts through risk (`risk.ask_risk`: HALT, RESUME, FLATTEN, STATE). Values
come back as plain Python (Decimals where money is); `queries.jsonable` makes them JSON."""
from __future__ import annotations

import time
from decimal import Decimal
from typing import Any, Callable

from services.control import queries
from services.control.dbreader import ReadOnlyDatabase
from services.control.pause import PauseView
from services.control.risk import RiskRefused, RiskUnreachable, ask_risk
from services.control.watch import BusWatch, feeds_view, services_view
from shared.config import Config
from shared.enums import ControlAction

__all__ = ["Control", "RiskRefused", "RiskUnreachable"]

ACTIONS = {"halt": ControlAction.HALT, "resume": ControlAction.RESUME, "flatten": ControlAction.FLATTEN}
REASON_MAX, BY_MAX = 500, 80  # characters: what risk stores of each, whole (services/risk/store.py)


def _sendable(value: str) -> bool:
    try:
        value.encode("utf-8")  # a lone surrogate (`"\ud800"` in JSON) cannot be sent on to risk
    except UnicodeEncodeError:
        return False
    return True


def check_reason(reason: object) -> str:
    """`reason` stripped, as every front end sends it (REST, `qf halt`, Telegram); ValueError
    for one that is empty, over REASON_MAX characters or not text UTF-8 can carry."""
    if not isinstance(reason, str) or not reason.strip() or len(reason) > REASON_MAX:
        raise ValueError(f"reason must be a non-empty string of at most {REASON_MAX} characters")
    if not _sendable(reason):
        raise ValueError("reason holds a character UTF-8 cannot carry (a lone surrogate)")
    return reason.strip()


def check_by(by: object) -> str:
    """`by` (who acts) as given; ValueError past BY_MAX characters or not UTF-8-sendable."""
    if not isinstance(by, str) or len(by) > BY_MAX:
        raise ValueError(f"by must be a string of at most {BY_MAX} characters")
    if not _sendable(by):
        raise ValueError("by holds a character UTF-8 cannot carry (a lone surrogate)")
    return by


class Control:
    """Status, positions, trades, P&L and risk's state; HALT / RESUME / FLATTEN through risk."""

    def __init__(self, cfg: Config, clock: Callable[[], int] = time.time_ns,
                 db: ReadOnlyDatabase | None = None, watch: BusWatch | None = None) -> None:
        self.cfg, self.clock = cfg, clock
        self.db = db if db is not None else ReadOnlyDatabase(cfg.common.db)
        self.pause = PauseView(cfg.shabbat)
        self.watch = watch  # heartbeats and feed states heard on the bus (watch.py); None: not asked

    def bus(self, wait: bool = False):
        """(snapshot, services, feeds) as `self.watch` hears them now (`wait`: a young watcher first
        waits, bounded, for every service's first heartbeat). Needs a watch."""
        snap = self.watch.snapshot(wait=wait)
        services = services_view(snap, self.watch.expected, self.watch.stale_s)
        return snap, services, feeds_view(snap, tuple(self.cfg.md.symbols), self.watch.stale_s)

    # -- queries (the database, read-only) --------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Fills, orders by status, the latest equity, positions (symbol -> qty), risk's last stored
        state change, and the Shabbat/Yom Tov pause now or next, as of `clock()`; with a watch,
        also `trading_state` (risk's live state while its heartbeat is fresh), `services` (each
        heartbeat's age) and `feeds` (each symbol's state)."""
        self.db.ensure()
        s = queries.summary()
        now = self.clock()
        out = {"fills": s["fills"], "orders": s["orders"], "equity": s["equity"],
               "positions": {p.symbol: p.qty for p in s["positions"]}, "ts": now,
               "risk_state": queries.risk_state(), "pause": self.pause.status(now)}
        if self.watch is not None:  # with a watch: risk's live state, each heartbeat's age, each feed
            snap, services, feeds = self.bus()
            live = snap.risk is not None and services.get("risk", {}).get("fresh")
            out["trading_state"] = snap.risk.state.value if live else out["risk_state"]["state"]
            out["services"], out["feeds"] = services, feeds
        return out

    def positions(self, symbol: str | None = None) -> list:
        """Average-cost positions from the fills (queries.Position), by symbol."""
        self.db.ensure()
        return queries.positions(symbol)

    def trades(self, symbol: str | None = None, limit: int = queries.DEFAULT_LIMIT,
               since: int | None = None) -> list[dict]:
        """The newest page of fills (queries.trades_page, ts ≥ `since` when given), money as Decimals
        for the front ends that format numbers (ValueError for a limit outside 1..MAX_LIMIT or a
        negative since)."""
        if since is not None and since < 0:
            raise ValueError("since must be a non-negative ns timestamp")
        rows, _ = self.trades_page(symbol=symbol, start=since, limit=limit)
        return [{k: Decimal(v) if k in queries.MONEY_COLUMNS and v is not None else v for k, v in r.items()}
                for r in rows]

    def pnl(self) -> dict[str, Any]:
        """Realized (before fees), unrealized, fees, net, the latest equity and today's (UTC) figures
        (queries.pnl), as of `clock()`."""
        self.db.ensure()
        return queries.pnl(self.clock())

    def trades_page(self, **filters) -> tuple[list[dict], str | None]:
        """A page of fills with their quality fields and the next cursor (queries.trades_page)."""
        self.db.ensure()
        return queries.trades_page(**filters)

    def orders_page(self, **filters) -> tuple[list[dict], str | None]:
        self.db.ensure()
        return queries.orders_page(**filters)

    def signals_page(self, **filters) -> tuple[list[dict], str | None]:
        self.db.ensure()
        return queries.signals_page(**filters)

    def equity(self, start: int | None, end: int | None, interval: str = "auto") -> dict[str, Any]:
        """The equity curve resampled (queries.equity_series); default range: the day before `clock()`."""
        self.db.ensure()
        end = self.clock() if end is None else end
        start = end - queries.DAY_NS if start is None else start
        return queries.equity_series(start, end, interval)

    def stats(self, start: int | None = None, end: int | None = None) -> dict[str, Any]:
        self.db.ensure()
        return queries.stats(start, end)

    def risk_view(self, window_s: int = 3600, limit: int = 50) -> dict[str, Any]:
        """Risk as stored (state, denials in the last `window_s` by reason, recent events), its
        limits as configured and the pause now; no request to risk."""
        self.db.ensure()
        now = self.clock()
        with queries.database.atomic():
            state = queries.risk_state()
            denials = queries.denials_by_reason(now - window_s * 1_000_000_000)
            events = queries.risk_events(limit)
        return {"state": state, "limits": self.limits(), "pause": self.pause.status(now),
                "denials": {"window_s": window_s, "by_reason": denials, "total": sum(denials.values())},
                "events": events}

    def limits(self) -> dict[str, Any]:
        """Risk's limits as configured (QF_RISK_*), by their setting names' short form."""
        from dataclasses import fields
        r = self.cfg.risk
        return {f.name: getattr(r, f.name) for f in fields(r)
                if isinstance(getattr(r, f.name), (int, float, str, Decimal, bool)) and "timeout" not in f.name}

    # -- actions (through risk) -------------------------------------------------------------

    def risk(self, by: str) -> dict:
        """Risk's own answer to STATE: state, reason, positions, equity, detail."""
        return ask_risk(self.cfg, ControlAction.STATE, by, "")

    def act(self, action: str, by: str, reason: str) -> dict:
        """HALT / RESUME / FLATTEN (`action` by name, any case) through risk; its answer."""
        try:
            what = ACTIONS[action.lower()]
        except KeyError:
            raise ValueError(f"action must be one of {', '.join(sorted(ACTIONS))}, not {action!r}") from None
        return ask_risk(self.cfg, what, check_by(by), check_reason(reason))
