"""Risk limits from the `QF_RISK_*` settings: per-symbol rules, rates, breakers; printed at start."""
from __future__ import annotations

from dataclasses import dataclass, replace
from decimal import Decimal
from typing import TYPE_CHECKING, Iterable, Mapping

from services.risk.checks import SymbolRules
from shared.errors import ConfigError

if TYPE_CHECKING:
    from shared.config import Config

MINUTE_NS = 60 * 1_000_000_000


@dataclass(frozen=True, slots=True)
class RiskLimits:
    """Every limit the engine enforces. `rules` holds one SymbolRules per traded symbol."""
    rules: Mapping[str, SymbolRules]
    stale_book_ms: int = 5000
    max_open_orders: int = 10
    price_band_bps: Decimal = Decimal(100)
    fill_band_bps: Decimal = Decimal(1000)  # a broker's fill further than this from the mid is refused; 0: off
    orders_per_s: int = 10
    orders_per_min: int = 300
    loss_streak: int = 0  # 0: the loss-streak pause is off
    loss_window_ns: int = 30 * MINUTE_NS
    loss_pause_ns: int = 15 * MINUTE_NS
    daily_loss: Decimal = Decimal("0.02")  # fractions of the day's start equity / of the peak; 0: off
    daily_loss_soft: Decimal = Decimal("0.01")
    max_drawdown: Decimal = Decimal("0.05")
    drawdown_soft: Decimal = Decimal("0.03")
    day_reset: bool = False
    adjust: bool = True

    @property
    def stale_ns(self) -> int:
        return self.stale_book_ms * 1_000_000

    def with_rules(self, **changes) -> "RiskLimits":
        """A copy with `changes` applied to every symbol's rules (tests, benchmarks)."""
        return replace(self, rules={s: replace(r, **changes) for s, r in self.rules.items()})


def parse_symbol_limits(text: str) -> dict[str, dict[str, Decimal]]:
    """The canonical QF_RISK_SYMBOL_LIMITS text (see shared.config) → {SYMBOL: {key: Decimal}}."""
    out: dict[str, dict[str, Decimal]] = {}
    for entry in (e.strip() for e in text.split(";")):
        if entry:
            name, *pairs = entry.split()
            out[name] = {k: Decimal(v) for k, _, v in (p.partition("=") for p in pairs)}
    return out


def default_rules(symbols: Iterable[str], **values) -> dict[str, SymbolRules]:
    """The same rules for every symbol (tests, benchmarks); unspecified values are permissive."""
    base = dict(lot_size=Decimal("1e-8"), tick_size=Decimal("1e-8"), min_notional=Decimal(0),
                max_order_notional=Decimal("1e12"), max_position=Decimal("1e9"), max_notional=Decimal("1e12"))
    base.update(values)
    return {s.upper(): SymbolRules(symbol=s.upper(), **base) for s in symbols}


def from_config(cfg: "Config") -> RiskLimits:
    """RiskLimits for `cfg` (its symbols and QF_RISK_* settings). Raises ConfigError for an
    override naming a symbol that is not traded, or a soft breaker above its hard one."""
    r = cfg.risk
    overrides = parse_symbol_limits(r.symbol_limits)
    unknown = sorted(set(overrides) - set(cfg.md.symbols))
    if unknown:
        raise ConfigError(f"QF_RISK_SYMBOL_LIMITS names {', '.join(unknown)}, not in QF_SYMBOLS")
    for soft, hard, names in ((r.daily_loss_soft, r.daily_loss, "QF_RISK_DAILY_LOSS"),
                              (r.drawdown_soft, r.max_drawdown, "QF_RISK_MAX_DRAWDOWN / _DRAWDOWN_SOFT")):
        if soft and hard and soft > hard:
            raise ConfigError(f"{names}: the soft threshold {soft} is above the hard one {hard}")
    rules = {}
    for sym in cfg.md.symbols:
        values = dict(lot_size=r.lot_size, tick_size=r.tick_size, min_notional=r.min_notional,
                      max_order_notional=r.max_order_notional, max_position=r.max_position,
                      max_notional=r.max_notional)
        values.update(overrides.get(sym, {}))
        rules[sym] = SymbolRules(symbol=sym, **values)
    return RiskLimits(rules=rules, stale_book_ms=r.stale_book_ms, max_open_orders=r.max_open_orders,
                      price_band_bps=r.price_band_bps, fill_band_bps=r.fill_band_bps, orders_per_s=r.orders_per_s,
                      orders_per_min=r.orders_per_min, loss_streak=r.loss_streak,
                      loss_window_ns=int(r.loss_window_min * MINUTE_NS),
                      loss_pause_ns=int(r.loss_pause_min * MINUTE_NS), daily_loss=r.daily_loss,
                      daily_loss_soft=r.daily_loss_soft, max_drawdown=r.max_drawdown,
                      drawdown_soft=r.drawdown_soft, day_reset=r.day_reset, adjust=r.adjust)


def describe(limits: RiskLimits) -> list[dict[str, str]]:
    """One dict per log line, for printing the limits at start: the global ones, then each symbol's."""
    g = {"stale_book_ms": limits.stale_book_ms, "max_open_orders": limits.max_open_orders,
         "price_band_bps": limits.price_band_bps, "fill_band_bps": limits.fill_band_bps,
         "orders_per_s": limits.orders_per_s,
         "orders_per_min": limits.orders_per_min, "loss_streak": limits.loss_streak,
         "loss_window_min": limits.loss_window_ns / MINUTE_NS, "loss_pause_min": limits.loss_pause_ns / MINUTE_NS,
         "daily_loss": limits.daily_loss, "daily_loss_soft": limits.daily_loss_soft,
         "max_drawdown": limits.max_drawdown, "drawdown_soft": limits.drawdown_soft,
         "day_reset": limits.day_reset, "adjust": limits.adjust}
    lines = [{k: str(v) for k, v in g.items()}]
    for sym, rule in sorted(limits.rules.items()):
        lines.append({"symbol": sym, **{k: f"{getattr(rule, k):f}" for k in
                                        ("lot_size", "tick_size", "min_notional", "max_order_notional",
                                         "max_position", "max_notional")}})
    return lines
