"""Wire messages: golden bytes, round trips, and typed errors for bad frames."""
from decimal import Decimal

import msgpack
import pytest
from hypothesis import given, settings, strategies as st

from shared import messages as m
from shared.enums import Liquidity, OrderKind, Side
from shared.errors import DecodeError

ORDER = m.OrderRequest(ts=1700000000000000000, client_order_id="c-1", strategy="imbalance", symbol="BTCUSDT",
                       side=Side.BUY, kind=OrderKind.MARKET, qty=Decimal("0.001"))
ORDER_HEX = ("8da17601a474797065a56f72646572a27473cf17979cfe362a0000af636c69656e745f6f726465725f6964a3632d31"
             "a87374726174656779a9696d62616c616e6365a673796d626f6ca742544355534454a473696465a3425559a46b696e64"
             "a64d41524b4554a3717479a5302e303031a57072696365c0a3746966a3475443aa636f6e666964656e6365cb000000"
             "0000000000a97369676e616c5f747300")
FILL = m.Fill(ts=1700000000000000001, fill_id="f-1", order_id="o-1", client_order_id="c-1", symbol="BTCUSDT",
              side=Side.SELL, price=Decimal("61837.63"), qty=Decimal("0.001"), fee=Decimal("0.06183763"),
              fee_asset="USDT", liquidity=Liquidity.TAKER, exch_ts=1723161255208)
FILL_HEX = ("8fa17601a474797065a466696c6ca27473cf17979cfe362a0001a766696c6c5f6964a3662d31a86f726465725f6964"
            "a36f2d31af636c69656e745f6f726465725f6964a3632d31a673796d626f6ca742544355534454a473696465a453454c4c"
            "a57072696365a836313833372e3633a3717479a5302e303031a3666565aa302e3036313833373633a96665655f6173736574"
            "a455534454a96c6971756964697479a554414b4552a7657863685f7473cf00000191346a1d28a373657107")


def test_golden_bytes_order_request():
    assert m.encode(ORDER).hex() == ORDER_HEX
    assert m.decode(bytes.fromhex(ORDER_HEX), m.REQUESTS) == ORDER


def test_golden_bytes_fill_with_seq():
    assert m.encode(FILL, seq=7).hex() == FILL_HEX
    decoded = m.decode(bytes.fromhex(FILL_HEX))
    assert decoded == FILL and decoded.price == Decimal("61837.63")


def _every_message():
    yield ORDER
    yield FILL
    yield m.Book(ts=1, symbol="BTCUSDT", exch_ts=2, update_id=3, bids=[[1.5, 2.0]], asks=[[1.6, 1.0]], mid=1.55,
                 spread=0.1, spread_bps=645.16, imbalance=0.33, microprice=1.56, recv_ts=9)
    yield m.Trade(ts=1, symbol="BTCUSDT", exch_ts=2, trade_id=3, price=Decimal("1.5"), qty=Decimal("2"),
                  buyer_is_maker=True)
    yield m.Decision(ts=1, client_order_id="c", verdict="REJECTED", reason={"code": "X", "text": "y"})
    yield m.Ack(ts=1, client_order_id="c", order_id="o", status="FILLED", filled_qty=Decimal("1"),
                avg_price=Decimal("2"), fills=[{"fill_id": "f"}])
    yield m.Heartbeat(ts=1, service="broker", pid=1, started_ts=1, status="ok", stats={"fills": 3})
    yield m.RiskState(ts=1, state="HALTED", reason="r", equity=Decimal("10"), drawdown=Decimal("0.1"))
    yield m.Alert(ts=1, service="risk", code="BROKER_ERROR", severity="error", text="bad ack", count=2)


@pytest.mark.parametrize("msg", list(_every_message()), ids=lambda x: type(x).__name__)
def test_round_trip(msg):
    registry = m.REQUESTS if type(msg) in m.REQUESTS.values() else m.EVENTS
    back = m.decode(m.encode(msg, seq=3), registry)
    assert m.encode(back, seq=3) == m.encode(msg, seq=3)


@pytest.mark.parametrize("payload,reason", [
    (b"", "bad_msgpack"),
    (b"\xc1", "bad_msgpack"),
    (msgpack.packb([1, 2]), "not_a_map"),
    (msgpack.packb({"v": 2, "type": "fill"}), "bad_version"),
    (msgpack.packb({"v": 1, "type": "nope", "ts": 1}), "unknown_type"),
    (msgpack.packb({"v": 1, "type": "order", "ts": 1}), "missing_field"),
    (msgpack.packb({**ORDER.to_wire(), "qty": "NaN"}), "bad_field"),
    (msgpack.packb({**ORDER.to_wire(), "qty": 0.001}), "bad_field"),  # a float is never money
    (msgpack.packb({**ORDER.to_wire(), "side": "HOLD"}), "bad_field"),
    (msgpack.packb({**ORDER.to_wire(), "ts": "1"}), "bad_field"),
    (b"\x00" * (m.MAX_FRAME + 1), "oversized"),
])
def test_bad_frames_raise_typed_errors(payload, reason):
    with pytest.raises(DecodeError) as err:
        m.decode(payload, m.REQUESTS)
    assert err.value.reason == reason


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_escape_as_other_errors(payload):
    try:
        m.decode(payload, m.REQUESTS)
    except DecodeError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(list(ORDER.to_wire()) + ["x"]),
                       st.one_of(st.none(), st.integers(), st.floats(), st.text(max_size=5), st.booleans(),
                                 st.lists(st.integers(), max_size=3))))
def test_random_maps_never_escape_as_other_errors(raw):
    try:
        msg = m.from_wire({**raw, "v": 1, "type": "order"}, m.REQUESTS)
    except DecodeError:
        return
    assert isinstance(msg.qty, Decimal) and msg.qty.is_finite()


_MONEY = st.one_of(st.none(), st.just(m.Decimal(0)), st.decimals(allow_nan=False, allow_infinity=False, places=8,
                                                                  min_value=-10**6, max_value=10**6))


@given(price=st.decimals(allow_nan=False, allow_infinity=False, places=8, min_value="0.00000001", max_value=10**6),
       quality=st.tuples(_MONEY, _MONEY, _MONEY, _MONEY), wait=st.sampled_from([0, 1, 10**9]),
       seq=st.one_of(st.none(), st.integers(0, 2**40)))
def test_the_direct_fill_map_is_the_generic_one_without_unset_quality(price, quality, wait, seq):
    fill = m.Fill(ts=1, fill_id="f-1", order_id="o-1", client_order_id="c-1", symbol="BTCUSDT", side=m.Side.SELL,
                  price=price, qty=m.Decimal("0.5"), fee=price * m.Decimal("0.0005"), fee_asset="USDT",
                  liquidity=m.Liquidity.MAKER, exch_ts=2, decision_mid=quality[0], arrival_mid=quality[1],
                  slippage_decision=quality[2], slippage_arrival=quality[3], queue_wait_ns=wait)
    generic = m.Message.to_wire(fill, seq)
    expected = {k: v for k, v in generic.items() if k not in m.Fill._QUALITY or not (v is None or v == 0)}
    assert fill.to_wire(seq) == expected and list(fill.to_wire(seq)) == list(expected)


# -- bounds on what a request brings in (issue #11) ------------------------------------------------

@pytest.mark.parametrize("text", ["9e999999", "1e-999999", "0E-999999", "1e30", "-1e30", "1E+30",
                                  "1" * 31, "0." + "0" * 30 + "1", "9" * 65, "Infinity", "sNaN", "-nan"])
def test_wire_decimals_beyond_the_bounds_are_bad_fields(text):
    # "9e999999" reached the broker and overflowed its arithmetic (`internal`); "1e-999999" is a
    # million digits once written out
    with pytest.raises(DecodeError) as err:
        m.decode(msgpack.packb({**ORDER.to_wire(), "qty": text}), m.REQUESTS)
    assert err.value.reason == "bad_field"


@pytest.mark.parametrize("text", ["1e29", "-" + "9" * 30, "1e-30", "0.00000001", "0", "-0", "0.000",
                                  "123456789012345678901234567890.123456789012345678901234567891"[:64]])
def test_wire_decimals_within_the_bounds_decode_exactly(text):
    assert m.decode(msgpack.packb({**ORDER.to_wire(), "qty": text}), m.REQUESTS).qty == Decimal(text)


@pytest.mark.parametrize("field,value", [("client_order_id", ""), ("client_order_id", "x" * 129),
                                         ("strategy", ""), ("strategy", "s" * 129), ("symbol", "B" * 10_000)])
def test_request_names_are_one_to_128_characters(field, value):
    with pytest.raises(DecodeError) as err:
        m.decode(msgpack.packb({**ORDER.to_wire(), field: value}), m.REQUESTS)
    assert err.value.reason == "bad_field"
    with pytest.raises(DecodeError):
        m.decode(msgpack.packb({"v": 1, "type": "cancel", "ts": 1, "client_order_id": "x" * 129}), m.REQUESTS)
    assert m.decode(msgpack.packb({**ORDER.to_wire(), field: "x" * 128}), m.REQUESTS)
