"""The desk's wire helpers: the spliced decision decodes like any other; the broker's answer is checked."""
from __future__ import annotations

from decimal import Decimal as D

import msgpack
import pytest

from services.risk.desk import encode_decision, read_ack
from shared import messages
from shared.enums import OrderStatus, Verdict
from shared.errors import DecodeError
from shared.messages import Ack, Decision, Error

FILL = {"ts": 5, "fill_id": "o-1", "order_id": "o", "client_order_id": "c", "symbol": "BTCUSDT", "side": "BUY",
        "price": "100.5", "qty": "0.004", "fee": "0.000402", "fee_asset": "USDT", "liquidity": "TAKER", "exch_ts": 1}


def ack_bytes(**kw) -> bytes:
    fields = dict(ts=5, client_order_id="c", order_id="o", status=OrderStatus.FILLED, filled_qty=D("0.004"),
                  avg_price=D("100.5"), fills=[FILL])
    fields.update(kw)
    return messages.encode(Ack(**fields))


@pytest.mark.parametrize("reason", [None, {"code": "MAX_POSITION", "text": "cut from 1 to 0.5"}])
def test_the_spliced_decision_decodes_to_the_same_message(reason):
    raw = ack_bytes()
    wire = msgpack.unpackb(raw)
    decision = Decision(ts=7, client_order_id="c", verdict=Verdict.ADJUSTED if reason else Verdict.APPROVED,
                        reason=reason, qty=D("0.004"), order=wire)
    spliced = encode_decision(decision, raw)
    assert messages.decode(spliced, messages.REQUESTS) == decision
    assert msgpack.unpackb(spliced) == msgpack.unpackb(messages.encode(decision))


def test_read_ack_takes_what_risk_needs_and_refuses_the_rest():
    assert read_ack(msgpack.unpackb(ack_bytes()), "c") == (OrderStatus.FILLED, D("0.004"), [FILL])
    good = msgpack.unpackb(ack_bytes())
    bad = [[1, 2], {**good, "v": 2}, {**good, "type": "decision"}, {**good, "client_order_id": "other"},
           {**good, "status": "DONE"}, {**good, "filled_qty": 0.004}, {**good, "fills": [1]},
           {**good, "fills": "none"}, msgpack.unpackb(messages.encode(Error(ts=1, code="UNKNOWN_ORDER", text="c")))]
    for wire in bad:
        with pytest.raises(DecodeError):
            read_ack(wire, "c")
