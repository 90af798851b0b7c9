"""The spot account: balances per asset moved by fills, what working orders reserve, and what is free.

A spot account cannot go negative: an order may only spend what is free, `free = total - reserved`,
where `total` is the start balance plus every fill's flows and `reserved` what the working orders
may still spend. Each working order holds `unit × remaining` of one asset (its *hold*):

- a SELL holds its base quantity: `unit = 1` in the base asset;
- a LIMIT BUY holds its worst cost plus fee in the quote asset: `unit = price × (1 + max(taker, maker))`
  (it never fills above its price, and a fill is at most a taker's);
- a MARKET BUY has no price of its own: `unit = mid × (1 + band_bps / 10⁴) × (1 + taker)`, with `mid`
  the book's mid when it was checked and `band_bps` risk's price band (QF_RISK_PRICE_BAND_BPS, else
  QF_RISK_FILL_BAND_BPS when that is off);
- with fees paid in the asset received (QF_BROKER_FEE_ASSET=received) a BUY's fee comes out of
  the base it receives, so its quote hold leaves the fee out (`unit = price`, `mid × (1 + band)`).

Units are rounded up to 1e-12 (exact for every price on the 1e-8 grid and fee rates of up to four
decimals; a hair more otherwise, never less). A fill moves the totals (BUY: quote −= price × qty,
base += qty; SELL: the reverse; the fee out of the asset it is paid in) and shrinks its order's hold
with the order's remaining quantity; an order that ends releases what it still holds. `Pricing`
works out the units, `Balances` keeps the totals and holds. Pure: no clock, no I/O; amounts exact
(Decimal in the MONEY context).

`free` goes below zero only when a fill spends more than its order held: a MARKET order walking
the book past the band, or a fill of an order risk stopped counting (no word from the broker
within 10 s, services/risk/core.py UNCERTAIN_NS). Every BUY (or SELL) is then denied until it is
back above what the order needs; the totals are never clamped: they are what the fills say.
"""
from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal
from typing import Iterable, Mapping

from shared.enums import Side
from shared.money import COST_STEP, MONEY, ZERO, UnknownAsset, base_asset, quote_asset, text

ONE = Decimal(1)
BPS = Decimal(10_000)
FEE_MODES = ("quote", "received")  # QF_BROKER_FEE_ASSET


@dataclass(frozen=True, slots=True)
class FeeRates:
    """The broker's fees as risk reserves for them: rates (QF_BROKER_TAKER_FEE, _MAKER_FEE) and the
    asset they are paid in (QF_BROKER_FEE_ASSET: `quote`, or `received`: a BUY's in the base)."""
    taker: Decimal = ZERO
    maker: Decimal = ZERO
    asset: str = "quote"

    def __post_init__(self) -> None:
        if self.asset not in FEE_MODES:
            raise ValueError(f"fee asset must be one of {', '.join(FEE_MODES)}, got {self.asset!r}")
        if not (ZERO <= self.taker < ONE and ZERO <= self.maker < ONE):
            raise ValueError(f"fee rates must be in [0, 1), got taker {self.taker}, maker {self.maker}")

    @property
    def buy_fee_in_quote(self) -> bool:
        """Whether a BUY's fee is paid in the quote asset (else out of the base it receives)."""
        return self.asset == "quote"


@dataclass(frozen=True, slots=True)
class Hold:
    """What one working order reserves: `unit` of `asset` per unit of its remaining quantity."""
    asset: str
    unit: Decimal
    amount: Decimal  # unit × remaining, exact


def is_spot(symbol: str) -> bool:
    """Whether `symbol` is a spot key (`BTCUSDT`); a market-prefixed key (`USDM:BTCUSDT`) is not."""
    return ":" not in symbol


def assets_of(symbol: str) -> tuple[str, str] | None:
    """(base, quote) of a spot symbol; None for any other key or a symbol of no known quote asset."""
    if not is_spot(symbol):
        return None
    try:
        return base_asset(symbol), quote_asset(symbol)
    except UnknownAsset:
        return None


def start_balances(given: Mapping[str, Decimal], symbols: Iterable[str], start_cash: Decimal) -> dict[str, Decimal]:
    """The account's start: `given` (QF_START_BALANCES) when it names any asset, else `start_cash`
    (QF_START_CASH) in the quote asset of each spot symbol of `symbols` of known assets (once per asset)."""
    if given:
        return dict(given)
    return {assets[1]: start_cash for assets in map(assets_of, symbols) if assets is not None}


def parse_balances(canonical: str) -> dict[str, Decimal]:
    """QF_START_BALANCES as shared.config leaves it (`USDT=10000,BTC=0.25`, validated) → {asset: amount}."""
    out = {}
    for entry in canonical.split(","):
        if entry:
            asset, _, amount = entry.partition("=")
            out[asset] = Decimal(amount)
    return out


def band_of(price_band_bps: Decimal, fill_band_bps: Decimal) -> Decimal:
    """The band a MARKET BUY reserves beyond the mid: risk's price band, else (0: off) its fill band."""
    return price_band_bps if price_band_bps else fill_band_bps


class Pricing:
    """What one unit of an order reserves (the module's rules) under `fees` and a MARKET BUY's
    `band_bps`; the factors, and the assets of `symbols`, worked out once (a check asks per order)."""

    def __init__(self, fees: FeeRates, band_bps: Decimal, symbols: Iterable[str] = ()) -> None:
        self.fees, self.band_bps = fees, band_bps
        quote_fee = fees.buy_fee_in_quote
        self._limit = MONEY.add(ONE, max(fees.taker, fees.maker)) if quote_fee else ONE
        self._market = MONEY.multiply(MONEY.add(ONE, MONEY.divide(band_bps, BPS)),
                                      MONEY.add(ONE, fees.taker) if quote_fee else ONE)
        self._assets = {s: assets_of(s) for s in symbols}

    def unit(self, symbol: str, side: Side, price: Decimal | None, mid: Decimal | None) -> tuple[str, Decimal] | None:
        """`(asset, unit)` an order on `symbol` holds per unit of its quantity: `price` is a LIMIT
        order's, None for a MARKET order (priced at `mid`). None when nothing can be reserved: not
        a spot symbol of known assets, or a MARKET BUY without a mid."""
        assets = self._assets[symbol] if symbol in self._assets else assets_of(symbol)
        if assets is None:
            return None
        if side is Side.SELL:
            return assets[0], ONE
        if price is not None:
            unit = MONEY.multiply(price, self._limit)
        elif mid is not None:
            unit = MONEY.multiply(mid, self._market)
        else:
            return None
        return assets[1], unit.quantize(COST_STEP, ROUND_CEILING, MONEY)


class Balances:
    """Totals per asset from a start and fills, and the holds of working orders by client_order_id.
    `free(asset)` is what a new order may spend. Read `totals`/`reserved`/`holds`; change them
    through the methods only (the reserved sums follow the holds)."""

    def __init__(self, start: Mapping[str, Decimal] | None = None) -> None:
        self.start: dict[str, Decimal] = dict(start or {})
        self.totals: dict[str, Decimal] = dict(self.start)
        self.reserved: dict[str, Decimal] = {}
        self.holds: dict[str, Hold] = {}

    def total(self, asset: str) -> Decimal:
        return self.totals.get(asset, ZERO)

    def reserved_of(self, asset: str) -> Decimal:
        return self.reserved.get(asset, ZERO)

    def free(self, asset: str) -> Decimal:
        """total - reserved (negative only after a fill spent more than its order held)."""
        return MONEY.subtract(self.totals.get(asset, ZERO), self.reserved.get(asset, ZERO))

    def on_fill(self, symbol: str, side: Side, qty: Decimal, price: Decimal, fee: Decimal = ZERO,
                fee_asset: str = "") -> bool:
        """Move the totals by one fill of spot `symbol`: BUY pays `price × qty` in the quote asset
        and receives `qty` base, SELL the reverse; `fee` comes out of `fee_asset` (empty: the quote
        asset). Returns False, changing nothing, for a symbol that is not spot or of unknown assets.
        The order's hold is not touched here: it follows the order's remaining quantity (`hold`)."""
        assets = assets_of(symbol)
        if assets is None:
            return False
        base, quote = assets
        notional = MONEY.multiply(price, qty)
        if side is Side.BUY:
            self._move(quote, -notional)
            self._move(base, qty)
        else:
            self._move(base, -qty)
            self._move(quote, notional)
        if fee:
            self._move(fee_asset or quote, -fee)
        return True

    def hold(self, client_order_id: str, asset: str, unit: Decimal, remaining: Decimal) -> None:
        """Let the order hold `unit × remaining` of `asset` (replacing what it held; `remaining` ≤ 0
        releases it)."""
        self.release(client_order_id)
        if remaining > 0:
            amount = MONEY.multiply(unit, remaining)
            self.holds[client_order_id] = Hold(asset, unit, amount)
            self.reserved[asset] = MONEY.add(self.reserved.get(asset, ZERO), amount)

    def set_remaining(self, client_order_id: str, remaining: Decimal) -> None:
        """The order may still fill `remaining` (≤ 0: it ended): its hold follows. No hold: nothing."""
        held = self.holds.get(client_order_id)
        if held is not None:
            self.hold(client_order_id, held.asset, held.unit, remaining)

    def release(self, client_order_id: str) -> None:
        """The order ended: what it held is free again."""
        held = self.holds.pop(client_order_id, None)
        if held is not None:
            left = MONEY.subtract(self.reserved[held.asset], held.amount)
            if left:
                self.reserved[held.asset] = left
            else:
                del self.reserved[held.asset]

    def view(self) -> dict[str, dict[str, str]]:
        """{asset: {total, reserved, free}} as decimal strings, for every asset held or reserved."""
        assets = sorted(set(self.totals) | set(self.reserved))
        return {a: {"total": text(self.total(a)), "reserved": text(self.reserved_of(a)), "free": text(self.free(a))}
                for a in assets}

    def _move(self, asset: str, amount: Decimal) -> None:
        self.totals[asset] = MONEY.add(self.totals.get(asset, ZERO), amount)
