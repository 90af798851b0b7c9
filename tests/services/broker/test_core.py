"""Broker core: transition table, fees, acks, accounts, and state-machine properties."""
from __future__ import annotations

from decimal import Context, Decimal as D, localcontext

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.broker import core
from services.broker.core import Account, Order, Trigger
from shared import messages, money
from shared.enums import TERMINAL_STATUSES, Liquidity, OrderKind, OrderStatus, Side, TimeInForce
from shared.errors import InvalidTransition
from shared.money import MAX_PRICE, MAX_QTY
from shared.messages import MAX_DECIMAL_LEN, Fill, OrderRequest

S = OrderStatus


def request(qty="1", side=Side.BUY, kind=OrderKind.MARKET, price=None, tif=TimeInForce.GTC,
            symbol="BTCUSDT", coid="c1") -> OrderRequest:
    return OrderRequest(ts=1, client_order_id=coid, strategy="t", symbol=symbol, side=side, kind=kind,
                        qty=D(qty), price=None if price is None else D(price), tif=tif)


def new_order(qty="1", **kw) -> Order:
    return Order.from_request(request(qty, **kw), "o1", 10)


# -- transition table -----------------------------------------------------------------

@pytest.mark.parametrize("status,trigger,target", [
    (S.PENDING, Trigger.PARTIAL_FILL, S.PARTIALLY_FILLED), (S.PENDING, Trigger.FILL, S.FILLED),
    (S.PENDING, Trigger.CANCEL, S.CANCELLED), (S.PENDING, Trigger.REJECT, S.REJECTED),
    (S.PARTIALLY_FILLED, Trigger.PARTIAL_FILL, S.PARTIALLY_FILLED),
    (S.PARTIALLY_FILLED, Trigger.FILL, S.FILLED), (S.PARTIALLY_FILLED, Trigger.CANCEL, S.CANCELLED)])
def test_allowed_transitions(status, trigger, target):
    assert core.next_status(status, trigger) is target


def test_everything_else_raises():
    allowed = set(core.TRANSITIONS)
    for status in OrderStatus:
        for trigger in Trigger:
            if (status, trigger) not in allowed:
                with pytest.raises(InvalidTransition):
                    core.next_status(status, trigger)
    assert not any(status in TERMINAL_STATUSES for status, _ in allowed)


def test_partially_filled_cannot_be_rejected():
    order = new_order("2")
    order.fill(D("100"), D("1"), 11)
    with pytest.raises(InvalidTransition):
        order.reject("late", 12)
    assert order.status is S.PARTIALLY_FILLED


def test_overfill_and_non_positive_fills_raise_and_change_nothing():
    order = new_order("1")
    order.fill(D("100"), D("0.4"), 11)
    for price, qty in ((D("100"), D("0.61")), (D("100"), D("0")), (D("100"), D("-0.1")), (D("0"), D("0.1"))):
        with pytest.raises(InvalidTransition):
            order.fill(price, qty, 12)
    assert (order.status, order.filled_qty, order.fill_count) == (S.PARTIALLY_FILLED, D("0.4"), 1)
    assert order.fill(D("101"), D("0.6"), 13) == "o1-2"
    assert order.status is S.FILLED and order.avg_price == D("100.6")
    with pytest.raises(InvalidTransition):
        order.fill(D("100"), D("0.1"), 14)
    with pytest.raises(InvalidTransition):
        order.cancel("too late", 14)


def test_from_request_validates():
    with pytest.raises(ValueError):
        Order.from_request(request("0"), "o", 1)
    with pytest.raises(ValueError):
        Order.from_request(request("1", kind=OrderKind.LIMIT), "o", 1)
    rejected = Order.rejected(request("-1"), "o", 5, core.BAD_ORDER)
    assert rejected.status is S.REJECTED and rejected.reason == core.BAD_ORDER
    assert new_order(kind=OrderKind.MARKET, price="5").price is None  # a market order has no price


@pytest.mark.parametrize("qty,price", [("9e999999", None), ("1000000000001", None), ("1", "1000000000000001"),
                                       ("1", "-5"), ("-0", None)])
def test_from_request_refuses_amounts_beyond_the_ledger_bounds(qty, price):
    kind = OrderKind.MARKET if price is None else OrderKind.LIMIT
    with pytest.raises(ValueError):
        Order.from_request(request(qty, kind=kind, price=price), "o", 1)
    assert new_order(str(MAX_QTY), kind=OrderKind.LIMIT, price=str(MAX_PRICE)).qty == MAX_QTY


def test_the_largest_fill_stays_exact_and_readable_on_the_wire():
    # every product of bounded amounts fits MONEY's 50 digits and the wire's decimal bounds
    price, qty = MAX_PRICE - D("0.00000001"), MAX_QTY - D("0.00000001")
    fee = money.fee(price, qty, D("0.00075"))
    with localcontext(Context(prec=100)):
        assert fee == price * qty * D("0.00075")  # exact
    assert fee.adjusted() < 30 and len(format(fee, "f")) <= MAX_DECIMAL_LEN
    acct = Account(D("1e6"))
    acct.apply("BTCUSDT", Side.BUY, price, qty, fee)
    with localcontext(Context(prec=100)):
        assert acct.cash == D("1e6") - price * qty - fee


# -- fees, quote assets ---------------------------------------------------------------------

def test_the_core_keeps_no_money_helpers_of_its_own():
    # one module, one contract (shared/money.py): no float converter, no quote asset that returns ""
    for name in ("to_decimal", "fee", "vwap", "base_asset", "QUOTE_ASSETS"):
        assert not hasattr(core, name), name
    assert core.quote_asset is money.quote_asset and core.canonical is money.canonical


@pytest.mark.parametrize("symbol", ["USDT", "BTCXYZ", ""])
def test_an_account_of_an_unknown_quote_asset_raises(symbol):
    with pytest.raises(money.UnknownAsset):
        Account(D("1")).apply(symbol, Side.BUY, D("1"), D("1"), D("0"), "BTC")


# -- acks, events, accounts ----------------------------------------------------------------------

def test_ack_and_event_carry_the_order_state():
    order = new_order("1.0")
    order.fill(D("100.5"), D("0.4"), 20)
    order.fill(D("101"), D("0.6"), 21)
    fills = [Fill(ts=20 + i, fill_id=f"o1-{i + 1}", order_id="o1", client_order_id="c1", symbol="BTCUSDT",
                  side=Side.BUY, price=p, qty=q, fee=D(0), fee_asset="USDT", liquidity=Liquidity.TAKER, exch_ts=7)
             for i, (p, q) in enumerate([(D("100.5"), D("0.4")), (D("101"), D("0.6"))])]
    ack = core.ack_for(order, iter(fills), 22)
    assert (ack.status, ack.filled_qty, ack.avg_price, ack.fills) == (S.FILLED, D("1.0"), D("100.8"), fills)
    assert ack.fills[0] is fills[0]  # taken as they are: not copied, not checked again
    assert messages.decode(messages.encode(ack), messages.REQUESTS) == ack
    event = core.order_event(order, 22)
    assert (event.status, event.filled_qty, event.avg_price) == (S.FILLED, D("1.0"), D("100.8"))


def test_account_cash_positions_and_equity():
    acct = Account(D("1000"))
    acct.apply("BTCUSDT", Side.BUY, D("100"), D("2"), D("0.2"))
    acct.apply("BTCUSDT", Side.SELL, D("110"), D("0.5"), D("0.055"))
    assert acct.cash == D("1000") - D("200") - D("0.2") + D("55") - D("0.055")
    assert acct.positions == {"BTCUSDT": D("1.5")}
    assert acct.equity({}) == acct.cash + D("1.5") * D("110")  # last fill price without a book
    assert acct.equity({"BTCUSDT": D("90")}) == acct.cash + D("135")


def test_account_takes_a_base_asset_fee_from_the_position():
    acct = Account(D("1000"))
    acct.apply("BTCUSDT", Side.BUY, D("100"), D("2"), D("0.002"), "BTC")
    acct.apply("BTCUSDT", Side.SELL, D("100"), D("1"), D("0.1"), "USDT")
    assert acct.positions == {"BTCUSDT": D("0.998")} and acct.cash == D("1000") - D("200") + D("100") - D("0.1")


# -- properties ---------------------------------------------------------------------------------

qtys = st.decimals(min_value=D("0.00000001"), max_value=D("5"), places=8)
ops = st.lists(st.one_of(
    st.tuples(st.just("fill"), st.decimals(min_value=D("-1"), max_value=D("5"), places=8),
              st.decimals(min_value=D("-1"), max_value=D("1000"), places=2)),
    st.tuples(st.just("cancel"), st.none(), st.none()),
    st.tuples(st.just("reject"), st.none(), st.none())), max_size=30)


@settings(max_examples=300, deadline=None)
@given(qty=qtys, steps=ops)
def test_state_machine_invariants(qty, steps):
    order = new_order(str(qty))
    for ts, (op, q, price) in enumerate(steps):
        before = (order.status, order.filled_qty, order.notional, order.fill_count, order.reason)
        try:
            if op == "fill":
                order.fill(price, q, ts)
            elif op == "cancel":
                order.cancel("x", ts)
            else:
                order.reject("x", ts)
        except InvalidTransition:
            assert (order.status, order.filled_qty, order.notional, order.fill_count, order.reason) == before
        else:
            assert before[0] not in TERMINAL_STATUSES, "left a terminal status"
        assert D(0) <= order.filled_qty <= order.qty
        assert (order.status is S.FILLED) == (order.filled_qty == order.qty)
        assert (order.status is S.PARTIALLY_FILLED) == (0 < order.filled_qty < order.qty and order.is_open)


def test_copy_is_a_field_for_field_copy_and_avg_price_follows_later_fills():
    import dataclasses
    order = new_order("1")
    order.fill(D("100"), D("0.4"), 20)
    assert order.avg_price == D("100")
    snap = order.copy()
    assert snap == dataclasses.replace(order) and snap is not order
    order.fill(D("101"), D("0.6"), 30)  # the original moves on; the copy and its average do not
    assert (order.avg_price, snap.avg_price) == (D("100.6"), D("100"))
    assert (snap.filled_qty, snap.status) == (D("0.4"), OrderStatus.PARTIALLY_FILLED)
    order.notional = D("200")  # set directly (as a stored order is rebuilt): the average is computed afresh
    assert order.avg_price == D("200")


def test_order_ids_are_distinct_uuid4_hex():
    import uuid

    from services.broker.desk import OrderIds
    ids = OrderIds()
    made = [ids.next() for _ in range(1000)]  # several refills of the random buffer
    assert len(set(made)) == 1000
    assert all(len(i) == 32 and uuid.UUID(hex=i).version == 4 and uuid.UUID(hex=i).hex == i for i in made)


def test_seeded_order_ids_are_uuid4_hex_and_repeat_with_their_seed():
    import uuid

    from services.backtest import engine
    from services.broker.desk import SeededIds
    made = [SeededIds(7).next() for _ in range(2)]
    ids = SeededIds(7)
    run = [ids.next() for _ in range(500)]
    assert made[0] == made[1] == run[0] and len(set(run)) == 500
    assert SeededIds(8).next() != run[0]
    assert all(uuid.UUID(hex=i).version == 4 and uuid.UUID(hex=i).hex == i for i in run)
    assert engine.SeededIds is SeededIds  # the backtest's exchange uses the broker's
