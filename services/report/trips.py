"""Round trips and net P&L of a batch of fills, exact, the ledger's way, a column at a time.

Why: folding a million fills through `shared.ledger.Position.apply` one call at a time took
2.7 s of the report's 10 s (issue #16). What the report needs from the ledger is few figures —
where each round trip closes and its P&L, and the net P&L at the range's ends — and each is a
sum of cash flows, which integer columns (services/report/amounts.py) give in numpy passes:

- A fill's cash flow is −side × price × qty; minus its fee when the fee counts in the quote
  asset (the ledger's rule: no fee asset, the quote asset, or a symbol whose quote is unknown).
  A fee paid in the base asset instead comes off the quantity held.
- `realized − cost` moves by exactly each fill's cash flow (shared/ledger.py), so at any time
  net P&L = Σ cash flows − quote fees + held × last price, with no rounding (the ledger's one
  rounding, of a partly closed cost, cancels out of it).
- A trip closes at a fill against the position (held before it nonzero, side opposite) that
  takes it to flat or through it: `pre`, the quantity held after the closing part and before a
  base fee, is 0 or of the fill's sign. Its P&L is the cash of its fills since the last close,
  but for the part of a flipping fill that opens the next trip, −pre × price, carried over
  (the fill's whole fee stays with the closing trip, as `Position.apply` books it).

tests/services/report/test_trips.py holds `fold` equal to `Position.apply` — each trip's closing
fill and exact P&L, the net P&L — over hypothesis' fills: flips, base-asset fees, dust left by
them, several symbols, unknown symbols, batches cut anywhere.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal, localcontext
from typing import Sequence

import numpy as np

from services.report.amounts import Amounts, BadAmount, parse, places, to_decimal, to_units
from shared.money import MONEY, ZERO, UnknownAsset, base_asset, quote_asset

SEP = "\x1f"  # between a column's texts where a comma could be in a value (symbols, assets)


class BadFill(ValueError):
    """A fill the ledger cannot book: a side that is neither BUY nor SELL, a price or quantity
    that is not a positive decimal, a fee or slippage that is not a decimal. `index` is its
    position in the batch. Handled by the report's shell: one line naming it, exit status 2."""

    def __init__(self, index: int, text: str) -> None:
        super().__init__(text)
        self.index = index


@dataclass(frozen=True, slots=True)
class FillBatch:
    """Fills oldest first, a column each; money exact (Amounts)."""
    ts: np.ndarray  # int64 ns
    symbol: np.ndarray  # object: str
    buy: np.ndarray  # bool: BUY, else SELL
    maker: np.ndarray  # bool: MAKER, else TAKER
    price: Amounts
    qty: Amounts
    fee: Amounts
    fee_asset: np.ndarray  # object: str ("" for the quote asset)
    slippage: Amounts  # slippage_arrival, quote per unit (> 0 a cost); 0 where not measured
    measured: np.ndarray  # bool: the fill has a slippage_arrival

    def __len__(self) -> int:
        return len(self.ts)

    def take(self, idx) -> FillBatch:
        """The fills at `idx` (an index array or a slice)."""
        return FillBatch(self.ts[idx], self.symbol[idx], self.buy[idx], self.maker[idx], self.price.take(idx),
                         self.qty.take(idx), self.fee.take(idx), self.fee_asset[idx], self.slippage.take(idx),
                         self.measured[idx])


def make_batch(ts: Sequence[int], symbol: Sequence[str], side: Sequence[str], price: str, qty: str, fee: str,
               fee_asset: Sequence[str], liquidity: Sequence[str], slippage: str,
               measured: Sequence[bool]) -> FillBatch:
    """A FillBatch from text columns: price, qty, fee and slippage each one text of comma-joined
    decimals (as SQLite's group_concat gives them; slippage 0 where not `measured`). Raises
    BadFill naming the first fill at fault."""
    n = len(ts)
    sides = np.array(side, dtype=object)
    buy = sides == "BUY"
    wrong = ~buy & (sides != "SELL")
    if wrong.any():
        i = int(np.argmax(wrong))
        raise BadFill(i, f"side {str(side[i])[:20]!r} is neither BUY nor SELL")
    liq = np.array(liquidity, dtype=object)
    maker = liq == "MAKER"
    wrong = ~maker & (liq != "TAKER")
    if wrong.any():
        i = int(np.argmax(wrong))
        raise BadFill(i, f"liquidity {str(liquidity[i])[:20]!r} is neither MAKER nor TAKER")
    money = {}
    for name, text in (("price", price), ("qty", qty), ("fee", fee), ("slippage_arrival", slippage)):
        try:
            money[name] = parse(text, n)
        except BadAmount as exc:
            value = text.split(",")[exc.index] if 0 <= exc.index < n else ""
            raise BadFill(exc.index, f"{name} {value[:40]!r}: {exc}") from None
    for name in ("price", "qty"):
        positive = money[name].units > 0
        if not positive.all():
            i = int(np.argmin(positive))
            raise BadFill(i, f"{name} {money[name].decimal(i)} is not positive")
    return FillBatch(np.asarray(ts, dtype=np.int64), np.array(symbol, dtype=object), buy, maker, money["price"],
                     money["qty"], money["fee"], np.array(fee_asset, dtype=object), money["slippage_arrival"],
                     np.asarray(measured, dtype=bool))


@dataclass(slots=True)
class Holding:
    """One symbol as the fold carries it from batch to batch (exact)."""
    quote: str  # "" when the symbol's quote asset is unknown (every fee then counts in P&L)
    base: str
    held: Decimal = ZERO  # the ledger's qty
    last_price: Decimal = ZERO
    cash: Decimal = ZERO  # Σ cash flows − quote fees of all its fills
    trip: Decimal = ZERO  # ... of the open trip's fills (with a flip's carried part)

    @classmethod
    def of(cls, symbol: str) -> Holding:
        try:  # as Position.__post_init__: an unknown symbol is kept, with no quote and no base
            return cls(quote_asset(symbol), base_asset(symbol))
        except UnknownAsset:
            return cls("", "")

    @property
    def net(self) -> Decimal:
        """realized − quote fees + unrealized at the last price, as the ledger's Position has it."""
        with localcontext(MONEY):
            return self.cash + self.held * self.last_price


@dataclass(slots=True)
class Folded:
    """What one `fold` found: the trips closed (each closing fill's batch index, its P&L), and when
    asked each fill's change of the total net P&L, in units of 10^-`scale`."""
    trip_index: list[int] = field(default_factory=list)
    trip_pnl: list[Decimal] = field(default_factory=list)
    net_delta: np.ndarray | None = None
    scale: int = 0


def fold(holdings: dict[str, Holding], b: FillBatch, net_delta: bool = False) -> Folded:
    """Book the batch (oldest first) into `holdings` (symbol → Holding, added to as symbols
    appear), as `Position.apply` would fill by fill. Returns the trips it closed and, with
    `net_delta`, each fill's change of Σ net P&L."""
    codes = {s: k for k, s in enumerate(dict.fromkeys(b.symbol.tolist()))}
    for s in codes:
        if s not in holdings:
            holdings[s] = Holding.of(s)
    hs = [holdings[s] for s in codes]
    quote = np.array([h.quote for h in hs], dtype=object)
    base = np.array([h.base for h in hs], dtype=object)
    code = np.fromiter(map(codes.__getitem__, b.symbol.tolist()), dtype=np.int64, count=len(b))
    fills_quote = quote[code]
    in_quote = (fills_quote == "") | (b.fee_asset == "") | (b.fee_asset == fills_quote)
    base_fee = ~in_quote & (b.fee_asset == base[code]) & (b.fee.units != 0)
    any_base_fee = bool(base_fee.any())
    # one scale per batch for each kind of amount, fine enough for every value and carried figure
    sp = max(b.price.scale, *(places(h.last_price) for h in hs))
    sq = max(b.qty.scale, b.fee.scale if any_base_fee else 0, *(places(h.held) for h in hs))
    sc = max(sp + sq, b.fee.scale, *(places(h.trip) for h in hs), *(places(h.cash) for h in hs))
    price = b.price.at(sp)
    signed = np.where(b.buy, b.qty.at(sq), -b.qty.at(sq))
    change = signed - np.where(base_fee, b.fee.at(sq), 0) if any_base_fee else None
    # −(cash flow − quote fee) of each fill
    outflow = signed * price * 10 ** (sc - sp - sq) + np.where(in_quote, b.fee.at(sc), 0)
    out = Folded(net_delta=np.zeros(len(b), dtype=object) if net_delta else None, scale=sc)
    ends: list[tuple[int, int]] = []
    for k, h in enumerate(hs):
        idx = np.flatnonzero(code == k) if len(hs) > 1 else slice(None)
        ends += _fold_symbol(h, idx, b.buy[idx], price[idx], signed[idx], None if change is None else change[idx],
                             outflow[idx], (sp, sq, sc), out.net_delta)
    ends.sort()
    out.trip_index = [i for i, _ in ends]
    out.trip_pnl = [to_decimal(u, sc) for _, u in ends]
    return out


def _fold_symbol(h: Holding, idx, buy: np.ndarray, price: np.ndarray, signed: np.ndarray,
                 change: np.ndarray | None, outflow: np.ndarray, scales: tuple[int, int, int],
                 net_delta: np.ndarray | None) -> list[tuple[int, int]]:
    """One symbol's fills (batch indices `idx`, in order) into `h`: `signed` quantities, their
    `change` of the quantity held when a base-asset fee takes some (else None), `outflow`s. Its
    trips as (batch index, P&L in units of the cash scale)."""
    sp, sq, sc = scales
    k = 10 ** (sc - sp - sq)
    held = np.cumsum(np.concatenate(([to_units(h.held, sq)], signed if change is None else change)))
    before, after = held[:-1], held[1:]  # the quantity held before and after each fill
    pre = after if change is None else before + signed  # after the closing part, before a base fee
    closes = np.flatnonzero((~buy & (before > 0) & (pre <= 0)) | (buy & (before < 0) & (pre >= 0)))
    spent = np.cumsum(np.concatenate(([-to_units(h.trip, sc)], outflow)))  # −(the open trip's cash)
    batch_index = np.arange(len(buy)) if isinstance(idx, slice) else idx
    ends, baseline = [], 0
    for j in closes.tolist():
        cash = -spent[j + 1] + pre[j] * price[j] * k  # without a flipping fill's opening part
        ends.append((int(batch_index[j]), cash - baseline))
        baseline = cash
    if net_delta is not None:
        value = after * price * k  # the quantity held at its last price
        prev = np.concatenate(([to_units(h.held, sq) * to_units(h.last_price, sp) * k], value[:-1]))
        net_delta[idx] = value - prev - outflow
    h.trip = to_decimal(-spent[-1] - baseline, sc)
    with localcontext(MONEY):
        h.cash -= to_decimal(int(outflow.sum()), sc)
    h.held = to_decimal(int(held[-1]), sq)
    h.last_price = to_decimal(int(price[-1]), sp)
    return ends
