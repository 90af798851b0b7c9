"""ImbalanceStrategy: entries, exits, in-flight and cooldown rules, exact positions."""
from __future__ import annotations

from decimal import Decimal

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.strategy.core import ImbalanceStrategy, fills_of
from shared import messages
from shared.enums import Liquidity, OrderKind, OrderStatus, Side, Verdict
from shared.errors import DecodeError
from shared.messages import Ack, Decision, Fill

MS = 1_000_000


def strategy(config, **env) -> ImbalanceStrategy:
    env = {"QF_STRATEGY_IMBALANCE": "0.6", "QF_STRATEGY_QTY": "0.001", "QF_STRATEGY_COOLDOWN_MS": "250", **env}
    return ImbalanceStrategy(config(**env).strategy, ["btcusdt", "ETHUSDT"], id_prefix="t-1")


def fill(cid: str, qty: str, price: str, side: Side = Side.BUY, n: int = 0) -> Fill:
    return Fill(ts=1, fill_id=f"o1-{n + 1}", order_id="o1", client_order_id=cid, symbol="BTCUSDT", side=side,
                price=Decimal(price), qty=Decimal(qty), fee=Decimal(0), fee_asset="USDT", liquidity=Liquidity.TAKER,
                exch_ts=1)


def ack(cid: str, *fills: Fill, status=OrderStatus.FILLED, filled_qty: str | None = None,
        avg_price: str | None = None) -> Ack:
    """The broker's ack as risk relays it (filled_qty: the fills' sum unless given; no avg_price unless given)."""
    filled = Decimal(filled_qty) if filled_qty is not None else sum((f.qty for f in fills), Decimal(0))
    return Ack(ts=1, client_order_id=cid, order_id="o1", status=status, filled_qty=filled,
               avg_price=None if avg_price is None else Decimal(avg_price), fills=list(fills))


def approve(intent, *fills, status=OrderStatus.FILLED) -> Decision:
    """A risk decision carrying a broker ack with `fills` as (qty, price) strings."""
    cid = intent.client_order_id
    return Decision(ts=0, client_order_id=cid, verdict=Verdict.APPROVED, qty=intent.qty,
                    order=ack(cid, *(fill(cid, q, p, intent.side, i) for i, (q, p) in enumerate(fills)), status=status))


def test_flat_and_bid_heavy_book_buys_the_configured_qty(config, book):
    s = strategy(config)
    intent = s.on_book(book(imbalance=0.6, recv_ts=123), now_ns=10 * MS)
    assert intent is not None
    assert (intent.side, intent.kind, intent.qty, intent.symbol) == (Side.BUY, OrderKind.MARKET,
                                                                     Decimal("0.001"), "BTCUSDT")
    assert intent.client_order_id == "t-1-1"
    assert intent.signal_ts == 123
    assert intent.confidence == pytest.approx(0.6)
    assert s.in_flight("BTCUSDT") is intent


def test_below_threshold_or_wrong_direction_does_nothing(config, book):
    s = strategy(config)
    assert s.on_book(book(imbalance=0.59), 0) is None
    assert s.on_book(book(imbalance=-0.99), 0) is None  # flat: spot never goes short


def test_one_order_in_flight_per_symbol(config, book):
    s = strategy(config, QF_STRATEGY_COOLDOWN_MS="0")
    first = s.on_book(book(imbalance=0.9), 0)
    assert first is not None
    assert s.on_book(book(imbalance=0.9), 10_000 * MS) is None
    # another symbol is independent
    other = s.on_book(book(symbol="ETHUSDT", imbalance=0.9), 10_000 * MS)
    assert other is not None and other.client_order_id == "t-1-2"


def test_fills_move_the_position_exactly_then_the_exit_sells_all_of_it(config, book):
    s = strategy(config)
    buy = s.on_book(book(imbalance=0.8), 0)
    outcome = s.on_decision(approve(buy, ("0.0004", "100.10"), ("0.0006", "100.20")))
    assert outcome.filled_qty == Decimal("0.0010")
    assert outcome.avg_price == Decimal("100.16")  # (0.04004 + 0.06012) / 0.001
    assert s.position("BTCUSDT") == Decimal("0.001")
    assert s.in_flight("BTCUSDT") is None
    assert s.on_book(book(imbalance=0.9), 300 * MS) is None  # long already: no second entry
    sell = s.on_book(book(imbalance=-0.6), 300 * MS)
    assert (sell.side, sell.qty) == (Side.SELL, Decimal("0.001"))
    s.on_decision(approve(sell, ("0.001", "101")))
    assert s.position("BTCUSDT") == 0


def test_cooldown_counts_from_the_previous_order(config, book):
    s = strategy(config)
    buy = s.on_book(book(imbalance=0.9), 1_000 * MS)
    s.on_decision(approve(buy, ("0.001", "100")))
    assert s.on_book(book(imbalance=-0.9), 1_249 * MS) is None
    assert s.on_book(book(imbalance=-0.9), 1_250 * MS) is not None


def test_rejection_changes_nothing_but_frees_the_symbol(config, book):
    s = strategy(config, QF_STRATEGY_COOLDOWN_MS="0")
    buy = s.on_book(book(imbalance=0.9), 0)
    out = s.on_decision(Decision(ts=0, client_order_id=buy.client_order_id, verdict=Verdict.REJECTED,
                                 reason={"code": "MAX_POSITION", "text": "too big"}))
    assert (out.verdict, out.filled_qty, out.position) == (Verdict.REJECTED, 0, 0)
    assert s.position("BTCUSDT") == 0 and s.in_flight("BTCUSDT") is None
    again = s.on_book(book(imbalance=0.9), 0)
    assert again.side is Side.BUY and again.client_order_id == "t-1-2"


def test_ack_without_fills_uses_filled_qty_and_unknown_ids_are_ignored(config, book):
    s = strategy(config)
    buy = s.on_book(book(imbalance=0.9), 0)
    assert s.on_decision(Decision(ts=0, client_order_id="someone-else", verdict=Verdict.APPROVED)) is None
    decision = Decision(ts=0, client_order_id=buy.client_order_id, verdict=Verdict.APPROVED,
                        qty=buy.qty, order=ack(buy.client_order_id, filled_qty="0.001", avg_price="100.5"))
    out = s.on_decision(decision)
    assert (out.filled_qty, out.avg_price) == (Decimal("0.001"), Decimal("100.5"))
    assert s.on_decision(decision) is None  # a duplicate answer is not applied twice
    assert s.position("BTCUSDT") == Decimal("0.001")


def test_a_malformed_ack_never_decodes_so_the_strategy_never_sees_it(config, book):
    s = strategy(config)
    buy = s.on_book(book(imbalance=0.9), 0)
    wire = approve(buy, ("0.001", "100")).to_wire()
    wire["order"]["fills"][0]["qty"] = 0.001  # a float qty: never on the money path
    with pytest.raises(DecodeError, match=r"order: fills\[0\]: qty: expected .*decimal string, got float"):
        messages.decode(msgpack.packb(wire), messages.REQUESTS)
    assert s.position("BTCUSDT") == 0  # the shell answers the order REJECTED BAD_REPLY (test_service.py)


def test_unknown_symbol_is_ignored(config, book):
    assert strategy(config).on_book(book(symbol="DOGEUSDT", imbalance=1.0), 0) is None


def test_fills_of_signs_by_side_and_refuses_negative_qty():
    d = Decision(ts=0, client_order_id="c", verdict=Verdict.APPROVED, order=ack("c", fill("c", "0.5", "10", Side.SELL)))
    assert fills_of(d, Side.SELL) == (Decimal("-0.5"), Decimal("10"))
    assert fills_of(Decision(ts=0, client_order_id="c", verdict=Verdict.APPROVED), Side.BUY) == (0, None)
    neg = Decision(ts=0, client_order_id="c", verdict=Verdict.APPROVED, order=ack("c", fill("c", "-1", "10")))
    with pytest.raises(ValueError, match="negative"):
        fills_of(neg, Side.BUY)


def test_fills_of_reads_the_typed_values_as_decoded_from_the_wire():
    d = Decision(ts=0, client_order_id="c", verdict=Verdict.APPROVED,
                 order=ack("c", fill("c", "0.0004", "100.10"), fill("c", "0.0006", "100.20", n=1), avg_price="100.16"))
    back = messages.decode(messages.encode(d), messages.REQUESTS)
    assert back == d and type(back.order.fills[0].qty) is Decimal
    assert fills_of(back, Side.BUY, Decimal("0.001")) == (Decimal("0.0010"), Decimal("100.16"))


events = st.lists(st.tuples(st.floats(-1, 1), st.integers(0, 400), st.sampled_from(["fill", "partial", "reject",
                                                                                    "none"])),
                  max_size=60)


@settings(max_examples=200, deadline=None)
@given(events)
def test_never_short_never_two_in_flight_and_cooldown_respected(config, book, seq):
    """Whatever books and answers arrive, spot stays long/flat and the rules hold."""
    cfg = config(QF_STRATEGY_IMBALANCE="0.5", QF_STRATEGY_COOLDOWN_MS="250").strategy
    s = ImbalanceStrategy(cfg, ["BTCUSDT"], id_prefix="p")
    now, last_order, pending = 0, None, None
    for imbalance, dt_ms, answer in seq:
        now += dt_ms * MS
        intent = s.on_book(book(imbalance=imbalance), now)
        if intent is not None:
            assert pending is None, "second order while one is in flight"
            assert last_order is None or now - last_order >= 250 * MS
            if intent.side is Side.SELL:
                assert intent.qty == s.position("BTCUSDT") > 0
            last_order, pending = now, intent
        if pending is not None and answer != "none":
            if answer == "reject":
                decision = Decision(ts=0, client_order_id=pending.client_order_id, verdict=Verdict.REJECTED)
            else:
                qty = pending.qty if answer == "fill" else pending.qty / 2
                decision = approve(pending, (str(qty), "100"))
            s.on_decision(decision)
            pending = None
        assert s.position("BTCUSDT") >= 0



def _fill_map(**changes) -> dict:
    return {"ts": 1, "fill_id": "o1-1", "order_id": "o1", "client_order_id": "t-1-1", "symbol": "BTCUSDT",
            "side": "BUY", "price": "1", "qty": "0.001", "fee": "0", "fee_asset": "USDT", "liquidity": "TAKER",
            "exch_ts": 1, **changes}


@pytest.mark.parametrize("order", [
    {"fills": "abc"},  # walked as characters: AttributeError escaped the ValueError handler
    {"fills": [1, 2]},
    {"fills": [_fill_map(qty="9e999999"), _fill_map(qty="9e999999")]},  # the sum overflowed
    {"fills": [_fill_map(qty="1e-999999")]},
    {"fills": [_fill_map(side=["BUY"])]},
    {"fills": [_fill_map(side="HOLD")]},
    {"fills": [_fill_map(price="NaN")]},
    {"fills": [_fill_map(qty=0.001)]},
    {"fills": [_fill_map(qty=True)]},
    {"fills": [{k: v for k, v in _fill_map().items() if k != "price"}]},
    {"fills": [], "filled_qty": "Infinity"},
    {"fills": [_fill_map()], "avg_price": {"x": 1}},
    {"fills": [_fill_map()], "type": "decision"},
    {"fills": [_fill_map()], "v": 2},
    {"fills": [_fill_map()], "status": "DONE"},
])
def test_a_hostile_ack_of_any_shape_is_a_decode_error(order):
    wire = Decision(ts=0, client_order_id="t-1-1", verdict=Verdict.APPROVED,
                    order=ack("t-1-1", fill("t-1-1", "0.001", "1"))).to_wire()
    wire["order"].update(order)
    with pytest.raises(DecodeError):
        messages.decode(msgpack.packb(wire), messages.REQUESTS)


@pytest.mark.parametrize("fills,filled_qty", [
    # well formed, but not for this order: the position went short (a long/flat strategy then
    # never traded again) or past what was asked
    ([("0.001", "1", Side.SELL)], None),
    ([("0.001", "1", Side.BUY), ("0.001", "1", Side.BUY)], None),
    ([("-0.001", "1", Side.BUY)], None),
    ([], "0.01"),
    ([], "-0.001"),
])
def test_an_ack_not_credible_for_the_order_is_a_value_error_and_changes_nothing(config, book, fills, filled_qty):
    s = strategy(config)
    buy = s.on_book(book(imbalance=0.9), 0)
    cid = buy.client_order_id
    lie = ack(cid, *(fill(cid, q, p, side, i) for i, (q, p, side) in enumerate(fills)), filled_qty=filled_qty)
    decision = messages.decode(messages.encode(Decision(ts=0, client_order_id=cid, verdict=Verdict.APPROVED,
                                                        order=lie)), messages.REQUESTS)  # it decodes: well formed
    with pytest.raises(ValueError):
        s.on_decision(decision)
    assert s.position("BTCUSDT") == 0 and s.in_flight("BTCUSDT") is None


@pytest.mark.parametrize("imbalance", [1.5, 1e300, -2.0, -1e308])
def test_a_book_whose_imbalance_is_not_a_share_is_never_decided_on(config, book, imbalance):
    s = strategy(config)
    assert s.on_book(book(imbalance=imbalance), 0) is None and s.refused_books == 1
    assert s.features.imbalance == {}  # nor remembered as a feature
    assert s.on_book(book(imbalance=1.0), 1).side is Side.BUY  # the edge of the range is a real book
