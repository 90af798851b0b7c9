"""The vetting of the broker's answers, as pure functions: honest acks pass; what passes, the ledger books."""
from __future__ import annotations

from decimal import Decimal as D

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.risk.vet import BadAnswer, vet_ack, vet_fill, vet_status
from shared.enums import OrderStatus, Side
from shared.ledger import Ledger
from tests.fakes.hostile_broker import honest_ack

ASSETS = {"BTCUSDT": ("USDT", "BTC")}
BAND = D(1000)


@given(qty=st.decimals(min_value=D("0.00001"), max_value=D("1000"), places=5),
       mid=st.decimals(min_value=D("0.01"), max_value=D("1000000"), places=2),
       parts=st.sampled_from([1, 2, 4]), side=st.sampled_from(["BUY", "SELL"]))
def test_every_honest_ack_passes(qty, mid, parts, side):
    """What the paper broker answers for a market order walking a few levels is never refused."""
    order = {"client_order_id": "c", "symbol": "BTCUSDT", "side": side, "qty": str(qty)}
    step = mid / 1000  # each level 0.1 % further: 4 levels stay well within the 10 % band
    ack = honest_ack(order, mid, "o", parts=parts, step=step)
    status, filled, fills = vet_ack(ack, "c", "BTCUSDT", Side(side), qty, None, ASSETS, {"BTCUSDT": mid}, BAND)
    assert (status, filled, len(fills)) == (OrderStatus.FILLED, qty, parts)


AMOUNTS = st.one_of(st.decimals(allow_nan=True, allow_infinity=True).map(str), st.integers(-10, 10**16),
                    st.sampled_from(["1e400", "-0", "0E-50", "1e-13", "100.5", "0.001", "NaN", "sNaN"]),
                    st.floats(), st.none(), st.booleans())


@settings(max_examples=400)
@given(qty=AMOUNTS, price=AMOUNTS, fee=AMOUNTS, asset=st.sampled_from(["USDT", "BTC", "BNB", "", 5]))
def test_a_fill_the_vetting_passes_is_one_the_ledger_books(qty, price, fee, asset):
    """Risk tells the strategy APPROVED before it books: the vetting must be at least as strict
    as the ledger, or a relayed fill could fail to book."""
    fill = {"ts": 1, "fill_id": "f", "order_id": "o", "client_order_id": "c", "symbol": "BTCUSDT", "side": "BUY",
            "price": price, "qty": qty, "fee": fee, "fee_asset": asset, "liquidity": "TAKER", "exch_ts": 1}
    try:
        vet_fill(fill, "c", "o", "BTCUSDT", Side.BUY, None, ASSETS, {}, BAND)
    except BadAnswer:
        return
    assert Ledger().apply_map(fill) is not None


@pytest.mark.parametrize("status, filled, qty, ok", [
    (OrderStatus.FILLED, "1", "1", True), (OrderStatus.FILLED, "0.5", "1", False),
    (OrderStatus.FILLED, "0", "1", False),
    (OrderStatus.PARTIALLY_FILLED, "0.5", "1", True), (OrderStatus.PARTIALLY_FILLED, "1", "1", False),
    (OrderStatus.PARTIALLY_FILLED, "0", "1", False), (OrderStatus.CANCELLED, "0.5", "1", True),
    (OrderStatus.CANCELLED, "0", "1", True), (OrderStatus.CANCELLED, "1", "1", False),
    (OrderStatus.PENDING, "0", "1", True), (OrderStatus.PENDING, "0.1", "1", False),
    (OrderStatus.REJECTED, "0", "1", True), (OrderStatus.REJECTED, "1", "1", False),
    (OrderStatus.FILLED, "10", "1", False), (OrderStatus.CANCELLED, "-1", "1", False),
    (OrderStatus.FILLED, "10", None, True), (OrderStatus.PENDING, "1e12", None, False)])
def test_a_status_must_fit_the_filled_quantity(status, filled, qty, ok):
    call = (lambda: vet_status(status, D(filled), None if qty is None else D(qty)))
    if ok:
        call()
    else:
        with pytest.raises(BadAnswer):
            call()
