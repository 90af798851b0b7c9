"""The broker's word, checked before risk relays or books it: order acks, cancel replies, fill and order events.

Risk approves an order, the broker answers with what it did, and risk used to relay that
answer to the strategy as APPROVED and book its fills, believing every digit: an ack with
NaN, 1e400 or negative fills, or fills summing to 10x the order, went out APPROVED
(issue #11). Risk must not pass on what it would not accept itself, so every answer is
held to what the broker can truthfully say of the order risk sent:

- the ack is of that order (`client_order_id`, each fill's `order_id`), its status agrees
  with its `filled_qty` (FILLED: all of the approved quantity; PENDING/REJECTED: none;
  PARTIALLY_FILLED/CANCELLED: less than all), and its fills sum to `filled_qty` exactly;
- each fill is a well-typed map of this order's symbol and side, with a `fill_id` unique in
  the ack and not booked for another order (a reused one would be skipped as a repeat), with
  every field a `fill` message has, a quantity and price positive and in the ledger's range
  (so booking it cannot fail after the strategy was told), a price within `band_bps` of the
  mid risk holds (QF_RISK_FILL_BAND_BPS, 10 % by default: an honest market order walks a
  few levels, never 100x) and not through the order's limit, a fee in the quote or base
  asset that is not negative and at most 10 % of what it is charged on (QF_BROKER_*_FEE
  cannot be set higher), and `avg_price` between the fills' prices.

Plain Decimal and int comparisons only: this runs on every order's answer path, inside the
time risk's benchmark holds to its budget (~5 µs for a one-fill ack on the 2-core VM, against
~0.5 µs for the type checks alone before). Each check raises BadAnswer
with a short `why` (a metric label, from the closed set WHYS) and a text for people.
"""
from __future__ import annotations

from decimal import Decimal
from typing import Callable, Mapping

from shared import messages
from shared.enums import OrderStatus, Side
from shared.errors import DecodeError
from shared.money import MAX_PRICE, MAX_QTY, STEP, ZERO, to_decimal

MAX_FEE_RATE = Decimal("0.1")  # the highest fee rate the broker accepts (QF_BROKER_TAKER/MAKER_FEE ≤ 0.1)
MAX_PLACES = 12  # decimals the ledger keeps exactly (shared.ledger.Ledger.apply_map)
_STATUSES = {s.value: s for s in OrderStatus}  # a dict lookup: OrderStatus(x) is a slow Enum call
_SIDES = {"BUY": Side.BUY, "SELL": Side.SELL}
_LIQUIDITY = ("MAKER", "TAKER")
_TEN_THOUSAND = Decimal(10_000)

# Why an answer was refused: the `why` label of qf_risk_bad_acks_total (a closed set, so the
# label stays bounded whatever a broker sends).
WHYS = frozenset({"bad_msgpack", "not_a_map", "bad_version", "unexpected_type", "bad_field", "wrong_order",
                  "unknown_symbol", "wrong_symbol", "wrong_side", "bad_qty", "bad_price", "bad_fee",
                  "bad_filled_qty", "over_qty", "bad_status", "sum_mismatch", "duplicate_fill", "price_band",
                  "limit_price", "bad_avg_price", "malformed"})


class BadAnswer(DecodeError):
    """A broker answer or event that decodes but cannot be true of the order risk sent or the
    book risk holds. Handled by the desk: the strategy gets REJECTED BROKER_ERROR (a cancel's
    client an `error` BROKER_ERROR), it is counted (qf_risk_bad_acks_total) and alerted, and
    nothing of it is booked. `reason` is the `why` label."""


def read_ack(wire: object, client_order_id: str) -> tuple[OrderStatus, Decimal, list]:
    """What risk needs of the broker's answer map: `(status, filled_qty, fills)`. Raises
    DecodeError for anything but an `ack` of this order with those fields well typed: reason
    `broker_error` for the broker's own `error` reply (it did not take the order), BadAnswer
    for an ack of another order; the rest is `vet_ack`'s."""
    if type(wire) is not dict or wire.get("v") != messages.VERSION:
        raise DecodeError("bad_version" if type(wire) is dict else "not_a_map", "broker answer")
    if wire.get("type") != "ack":
        if wire.get("type") == "error":
            raise DecodeError("broker_error", f"{wire.get('code')}: {wire.get('text')}"[:200])
        raise DecodeError("unexpected_type", str(wire.get("type"))[:40])
    if wire.get("client_order_id") != client_order_id:
        raise BadAnswer("wrong_order", f"client_order_id {str(wire.get('client_order_id'))[:40]!r}")
    fills = wire.get("fills", [])
    if type(fills) is not list:
        raise DecodeError("bad_field", "fills: expected a list of maps")
    for fill in fills:
        if type(fill) is not dict:
            raise DecodeError("bad_field", "fills: expected a list of maps")
    try:
        status = wire.get("status")
        status = _STATUSES.get(status) if type(status) is str else None
        if status is None:
            status = OrderStatus(wire.get("status"))  # not a plain known string: raises, or a str subclass
        return status, to_decimal(wire.get("filled_qty"), "filled_qty"), fills
    except ValueError as exc:
        raise DecodeError("bad_field", str(exc)[:120]) from None


def vet_ack(wire: object, client_order_id: str, symbol: str | None, side: Side | None, qty: Decimal | None,
            limit: Decimal | None, assets: Mapping[str, tuple[str, str]], mids: Mapping[str, Decimal],
            band_bps: Decimal, booked_for: Callable[[str], str | None] = lambda fill_id: None
            ) -> tuple[OrderStatus, Decimal, list]:
    """`read_ack`, then the ack held to the order: `symbol`, `side` and approved `qty` (None:
    not known to risk, e.g. a cancel of an order it no longer tracks), its LIMIT price `limit`
    (None for MARKET), the traded symbols' `(quote, base)` assets, risk's `mids` and the fill
    band; `booked_for(fill_id)` names the order a fill id was booked for (Ledger.booked_for):
    an ack reusing another order's would be relayed with fills risk then skips as repeats.
    Returns `(status, filled_qty, fills)`; raises DecodeError / BadAnswer."""
    status, filled, fills = read_ack(wire, client_order_id)
    order_id = wire.get("order_id")
    if type(order_id) is not str or type(wire.get("ts")) is not int or type(wire.get("reason", "")) is not str:
        raise BadAnswer("bad_field", "order_id, ts or reason of the wrong type")
    vet_status(status, filled, qty)
    total, low, high = ZERO, None, None
    ids = set() if len(fills) > 1 else None
    for fill in fills:
        q, p = vet_fill(fill, client_order_id, order_id, symbol, side, limit, assets, mids, band_bps)
        total += q
        if low is None or p < low:
            low = p
        if high is None or p > high:
            high = p
        owner = booked_for(fill["fill_id"])
        if owner is not None and owner != client_order_id:
            raise BadAnswer("duplicate_fill", f"fill_id {fill['fill_id'][:40]!r} was booked for another order")
        if ids is not None:
            if fill["fill_id"] in ids:
                raise BadAnswer("duplicate_fill", f"fill_id {fill['fill_id'][:40]!r} twice")
            ids.add(fill["fill_id"])
    if total != filled:
        raise BadAnswer("sum_mismatch", f"fills sum to {total}, filled_qty says {filled}")
    avg = wire.get("avg_price")
    if low is None:
        if avg is not None:
            raise BadAnswer("bad_avg_price", "avg_price without a fill")
    else:
        try:
            avg = to_decimal(avg, "avg_price")
        except ValueError as exc:
            raise BadAnswer("bad_avg_price", str(exc)[:120]) from None
        if not low - STEP <= avg <= high + STEP:  # an average lies between its parts (± its rounding)
            raise BadAnswer("bad_avg_price", f"avg_price {str(avg)[:40]} outside the fills' {low}..{high}")
    return status, filled, fills


def vet_status(status: OrderStatus, filled: Decimal, qty: Decimal | None) -> None:
    """Raise BadAnswer unless `filled` (the order's filled quantity) fits `status` and the
    order's quantity `qty` (None: unknown, only the sign and range are checked)."""
    if not ZERO <= filled < MAX_QTY:
        raise BadAnswer("bad_filled_qty", f"filled_qty {str(filled)[:40]}")
    if qty is not None and filled > qty:
        raise BadAnswer("over_qty", f"filled_qty {filled} above the order's {qty}")
    if status is OrderStatus.FILLED:
        ok = filled > 0 and (qty is None or filled == qty)
    elif status is OrderStatus.PARTIALLY_FILLED:
        ok = filled > 0 and (qty is None or filled < qty)
    elif status is OrderStatus.CANCELLED:
        ok = qty is None or filled < qty
    else:  # PENDING, REJECTED
        ok = not filled
    if not ok:
        raise BadAnswer("bad_status", f"{status.value} with filled_qty {filled} of {qty}")


def vet_fill(fill: dict, client_order_id: str, order_id: str | None, symbol: str | None, side: Side | None,
             limit: Decimal | None, assets: Mapping[str, tuple[str, str]], mids: Mapping[str, Decimal],
             band_bps: Decimal) -> tuple[Decimal, Decimal]:
    """One fill map (from an ack or a `fill.*` event) held to its order (`order_id`, `symbol`,
    `side`, `limit`: None where not known) and the book: see the module docstring. A symbol
    with no mid yet (risk just started) skips the band. Returns `(qty, price)`; raises BadAnswer."""
    fill_id, sym, fill_side, fee_asset = fill.get("fill_id"), fill.get("symbol"), fill.get("side"), \
        fill.get("fee_asset")
    # every field a `fill` message must have (shared.messages.Fill), of its type
    if (type(fill_id) is not str or not fill_id or type(sym) is not str or type(fee_asset) is not str
            or fill.get("liquidity") not in _LIQUIDITY or type(fill.get("ts")) is not int
            or type(fill.get("exch_ts")) is not int or type(fill.get("order_id")) is not str):
        raise BadAnswer("bad_field", f"fill {str(fill_id)[:40]!r}: fill_id, order_id, symbol, fee_asset, liquidity, "
                                     f"ts or exch_ts missing or of the wrong type")
    if fill.get("client_order_id") != client_order_id or (order_id is not None and fill.get("order_id") != order_id):
        raise BadAnswer("wrong_order", f"fill {fill_id[:40]!r} of order {str(fill.get('order_id'))[:40]!r}")
    pair = assets.get(sym)
    if pair is None:
        raise BadAnswer("unknown_symbol", f"fill {fill_id[:40]!r}: symbol {sym[:24]!r} is not traded here")
    if symbol is not None and sym != symbol:
        raise BadAnswer("wrong_symbol", f"fill {fill_id[:40]!r}: {sym[:24]} for a {symbol} order")
    got = _SIDES.get(fill_side) if type(fill_side) is str else None
    if got is None:
        raise BadAnswer("bad_field", f"fill {fill_id[:40]!r}: side {str(fill_side)[:20]!r}")
    if side is not None and got is not side:
        raise BadAnswer("wrong_side", f"fill {fill_id[:40]!r}: {got.value} for a {side.value} order")
    qty = _amount(fill.get("qty"), "qty", fill_id)
    price = _amount(fill.get("price"), "price", fill_id)
    fee = _amount(fill.get("fee"), "fee", fill_id)
    # Ranges before any arithmetic: a huge exponent must be refused, never computed with.
    if not ZERO < qty < MAX_QTY or qty.as_tuple().exponent < -MAX_PLACES:
        raise BadAnswer("bad_qty", f"fill {fill_id[:40]!r}: qty {str(qty)[:40]}")
    if not ZERO < price < MAX_PRICE or price.as_tuple().exponent < -MAX_PLACES:
        raise BadAnswer("bad_price", f"fill {fill_id[:40]!r}: price {str(price)[:40]}")
    if limit is not None and (price > limit if got is Side.BUY else price < limit):
        raise BadAnswer("limit_price", f"fill {fill_id[:40]!r}: {got.value} at {price} through the limit {limit}")
    mid = mids.get(sym)
    if band_bps and mid is not None and abs(price - mid) * _TEN_THOUSAND > band_bps * mid:
        raise BadAnswer("price_band", f"fill {fill_id[:40]!r}: price {price} more than {band_bps} bps "
                                      f"from the mid {mid}")
    if not ZERO <= fee < MAX_QTY or fee.as_tuple().exponent < -30:  # the ledger's own bounds
        raise BadAnswer("bad_fee", f"fill {fill_id[:40]!r}: fee {str(fee)[:40]}")
    # Paid in the quote asset, or in the base asset received (QF_BROKER_FEE_ASSET=received): the
    # paper broker knows no other (a fee in an asset risk cannot price would hide a cost).
    quote, base = pair
    if fee_asset == quote:
        top = MAX_FEE_RATE * price * qty
    elif fee_asset == base:
        top = MAX_FEE_RATE * qty
    else:
        raise BadAnswer("bad_fee", f"fill {fill_id[:40]!r}: fee asset {fee_asset[:12]!r} is neither {quote} nor {base}")
    if fee > top:
        raise BadAnswer("bad_fee", f"fill {fill_id[:40]!r}: fee {str(fee)[:40]} {fee_asset[:12]} above "
                                   f"{MAX_FEE_RATE:%} of the fill")
    return qty, price


def _amount(value: object, name: str, fill_id: str) -> Decimal:
    """A fill's decimal field; BadAnswer `bad_<name>` for a float, NaN, Infinity, a bool or garbage."""
    try:
        return to_decimal(value, name)
    except ValueError as exc:
        raise BadAnswer(f"bad_{name}", f"fill {fill_id[:40]!r}: {str(exc)[:120]}") from None
