"""The desk's wire helpers: the spliced decision decodes like any other; the broker's answer is checked."""
from __future__ import annotations

import dataclasses
from decimal import Decimal as D

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.risk.desk import approval_parts, decision_parts
from services.risk.vet import read_ack
from shared import messages
from shared.enums import Liquidity, OrderStatus, Side, Verdict
from shared.errors import DecodeError
from shared.messages import Ack, Decision, Error, Fill

FILL_MSG = Fill(ts=5, fill_id="o-1", order_id="o", client_order_id="c", symbol="BTCUSDT", side=Side.BUY,
                price=D("100.5"), qty=D("0.004"), fee=D("0.000402"), fee_asset="USDT", liquidity=Liquidity.TAKER,
                exch_ts=1)
FILL = {"ts": 5, "fill_id": "o-1", "order_id": "o", "client_order_id": "c", "symbol": "BTCUSDT", "side": "BUY",
        "price": "100.5", "qty": "0.004", "fee": "0.000402", "fee_asset": "USDT", "liquidity": "TAKER", "exch_ts": 1}


def ack_bytes(**kw) -> bytes:
    fields = dict(ts=5, client_order_id="c", order_id="o", status=OrderStatus.FILLED, filled_qty=D("0.004"),
                  avg_price=D("100.5"), fills=[FILL_MSG])
    fields.update(kw)
    return messages.encode(Ack(**fields))


@pytest.mark.parametrize("reason", [None, {"code": "MAX_POSITION", "text": "cut from 1 to 0.5"}])
def test_the_spliced_decision_decodes_to_the_same_message(reason):
    raw = ack_bytes()
    decision = Decision(ts=7, client_order_id="c", verdict=Verdict.ADJUSTED if reason else Verdict.APPROVED,
                        reason=reason, qty=D("0.004"), order=messages.decode(raw, messages.REQUESTS))
    before, after = decision_parts(decision)
    spliced = before + msgpack.packb(decision.ts) + after + raw
    assert messages.decode(spliced, messages.REQUESTS) == decision
    assert spliced == messages.encode(decision)  # the typed ack encodes to the broker's bytes
    assert msgpack.unpackb(raw)["fills"] == [FILL] and FILL_MSG.wire_body() == FILL


def test_read_ack_takes_what_risk_needs_and_refuses_the_rest():
    assert read_ack(msgpack.unpackb(ack_bytes()), "c") == (OrderStatus.FILLED, D("0.004"), [FILL])
    good = msgpack.unpackb(ack_bytes())
    bad = [[1, 2], {**good, "v": 2}, {**good, "type": "decision"}, {**good, "client_order_id": "other"},
           {**good, "status": "DONE"}, {**good, "filled_qty": 0.004}, {**good, "fills": [1]},
           {**good, "fills": "none"}, {**good, "status": None}, {**good, "status": 3}, {**good, "status": "filled"},
           msgpack.unpackb(messages.encode(Error(ts=1, code="UNKNOWN_ORDER", text="c")))]
    for wire in bad:
        with pytest.raises(DecodeError):
            read_ack(wire, "c")


REUSED = msgpack.Packer()


class Shout(str):
    """A str subclass: not the plain string the status table is keyed by."""


def test_read_ack_takes_every_status_and_str_subclasses_of_them():
    for status in OrderStatus:
        wire = {**msgpack.unpackb(ack_bytes()), "status": status.value}
        assert read_ack(wire, "c")[0] is status
        assert read_ack({**wire, "status": Shout(status.value)}, "c")[0] is status


@given(coid=st.text(min_size=1, max_size=128), ts=st.integers(0, 2**64 - 1),
       qty=st.decimals(min_value=D("1e-8"), max_value=D("1e12"), places=8),
       verdict=st.sampled_from([Verdict.APPROVED, Verdict.ADJUSTED]),
       reason=st.none() | st.fixed_dictionaries({"code": st.just("MAX_POSITION"), "text": st.text(max_size=60)}),
       fills=st.integers(0, 3))
def test_the_decision_made_while_the_broker_works_is_the_one_encoded_at_its_answer(coid, ts, qty, verdict,
                                                                                    reason, fills):
    """The desk packs a decision in two parts before the broker answers, then only its time
    stamp: byte for byte what packing the whole Decision with the broker's map would give."""
    raw = ack_bytes(client_order_id=coid, fills=[FILL_MSG] * fills)
    head = Decision(ts=0, client_order_id=coid, verdict=verdict, reason=reason, qty=qty)
    before, after = decision_parts(head, REUSED.pack)  # as the desk does: one Packer for every order
    assert (before, after) == decision_parts(head) == approval_parts(coid, verdict, reason, qty, REUSED.pack)
    spliced = before + msgpack.packb(ts) + after + raw
    decision = Decision(ts=ts, client_order_id=coid, verdict=verdict, reason=reason, qty=qty,
                        order=messages.decode(raw, messages.REQUESTS))
    assert spliced == messages.encode(decision)  # the typed ack packs to the broker's bytes
    assert spliced == messages.encode(dataclasses.replace(decision, order=msgpack.unpackb(raw)))  # as its map did
    assert messages.decode(spliced, messages.REQUESTS) == decision
