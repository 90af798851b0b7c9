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
from shared.config import Config
from shared.enums import ControlAction

__all__ = ["Control", "RiskRefused", "RiskUnreachable"]

ACTIONS = {"halt": ControlAction.HALT, "resume": ControlAction.RESUME, "flatten": ControlAction.FLATTEN}


class Control:
    """Status, positions, trades, P&L and risk's state; HALT / RESUME / FLATTEN through risk."""

    def __init__(self, cfg: Config, clock: Callable[[], int] = time.time_ns,
                 db: ReadOnlyDatabase | None = None) -> None:
        self.cfg, self.clock = cfg, clock
        self.db = db if db is not None else ReadOnlyDatabase(cfg.common.db)
        self.pause = PauseView(cfg.shabbat)

    # -- queries (the database, read-only) --------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Fills, orders by status, the latest equity, positions (symbol -> qty), risk's last stored
        state change, and the Shabbat/Yom Tov pause now or next, as of `clock()`."""
        self.db.ensure()
        s = queries.summary()
        now = self.clock()
        return {"fills": s["fills"], "orders": s["orders"], "equity": s["equity"],
                "positions": {p.symbol: p.qty for p in s["positions"]}, "ts": now,
                "risk_state": queries.risk_state(), "pause": self.pause.status(now)}

    def positions(self, symbol: str | None = None) -> list:
        """Average-cost positions from the fills (queries.Position), by symbol."""
        self.db.ensure()
        return queries.positions(symbol)

    def trades(self, symbol: str | None = None, limit: int = queries.DEFAULT_LIMIT,
               since: int | None = None) -> list[dict]:
        """Fills, newest first (ValueError for a limit outside 1..MAX_LIMIT or a negative since)."""
        self.db.ensure()
        return queries.trades(symbol=symbol, limit=limit, since=since)

    def pnl(self) -> dict[str, Any]:
        """Realized P&L (before fees), fees in the quote asset, net realized, and the latest equity
        snapshot, summed over the positions."""
        self.db.ensure()
        found = queries.positions()
        realized = sum((p.realized for p in found), Decimal(0))
        net = sum((p.net_realized for p in found), Decimal(0))
        return {"realized": realized, "fees": realized - net, "net_realized": net,
                "equity": queries.latest_equity(), "symbols": len(found)}

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
        return ask_risk(self.cfg, what, by, reason)
