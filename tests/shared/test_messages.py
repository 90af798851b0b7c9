"""Wire messages: golden bytes, round trips, and typed errors for bad frames."""
from decimal import Decimal

import msgpack
import pytest
from hypothesis import given, settings, strategies as st

from shared import messages as m
from shared.enums import Liquidity, OrderKind, OrderStatus, Side, Verdict
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
                avg_price=Decimal("2"), fills=[FILL])
    yield m.Decision(ts=1, client_order_id="c", verdict="APPROVED", qty=Decimal("1"),
                     order=m.Ack(ts=1, client_order_id="c", order_id="o", status="FILLED", filled_qty=Decimal("1"),
                                 avg_price=Decimal("2"), fills=[FILL]))
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


# -- typed acks: Ack.fills are Fills, Decision.order is an Ack; the bytes are those of the maps before ---------

# Captured from the code before Ack.fills and Decision.order were typed (fill maps, the ack map):
# the typed messages must encode to these bytes exactly.
BROKER_ACK_HEX = (
    "8aa17601a474797065a361636ba2747301af636c69656e745f6f726465725f6964a26331a86f726465725f6964a46f2d6331"
    "a6737461747573a646494c4c4544aa66696c6c65645f717479a3312e30a96176675f7072696365a53130302e39a566696c6c"
    "7393de0010a2747301a766696c6c5f6964a66f2d63312d31a86f726465725f6964a46f2d6331af636c69656e745f6f726465"
    "725f6964a26331a673796d626f6ca742544355534454a473696465a3425559a57072696365a53130302e35a3717479a3302e"
    "34a3666565a6302e30303034a96665655f6173736574a3425443a96c6971756964697479a554414b4552a7657863685f7473"
    "07ac6465636973696f6e5f6d6964a63130302e3235ab6172726976616c5f6d6964a63130302e3235b1736c6970706167655f"
    "6465636973696f6ea4302e3235b0736c6970706167655f6172726976616ca4302e3235de0010a2747301a766696c6c5f6964"
    "a66f2d63312d32a86f726465725f6964a46f2d6331af636c69656e745f6f726465725f6964a26331a673796d626f6ca74254"
    "4355534454a473696465a3425559a57072696365a3313031a3717479a3302e35a3666565a6302e30303035a96665655f6173"
    "736574a3425443a96c6971756964697479a554414b4552a7657863685f747307ac6465636973696f6e5f6d6964a63130302e"
    "3235ab6172726976616c5f6d6964a63130302e3235b1736c6970706167655f6465636973696f6ea4302e3735b0736c697070"
    "6167655f6172726976616ca4302e3735de0010a2747301a766696c6c5f6964a66f2d63312d33a86f726465725f6964a46f2d"
    "6331af636c69656e745f6f726465725f6964a26331a673796d626f6ca742544355534454a473696465a3425559a570726963"
    "65a3313032a3717479a3302e31a3666565a6302e30303031a96665655f6173736574a3425443a96c6971756964697479a554"
    "414b4552a7657863685f747307ac6465636973696f6e5f6d6964a63130302e3235ab6172726976616c5f6d6964a63130302e"
    "3235b1736c6970706167655f6465636973696f6ea4312e3735b0736c6970706167655f6172726976616ca4312e3735a67265"
    "61736f6ea0")
SPLICED_DECISION_HEAD_HEX = (
    "88a17601a474797065a86465636973696f6ea274737baf636c69656e745f6f726465725f6964a26331a776657264696374a8"
    "415050524f564544a6726561736f6ec0a3717479a3312e30a56f72646572")
MAKER_ACK_HEX = (
    "8aa17601a474797065a361636ba2747315af636c69656e745f6f726465725f6964a172a86f726465725f6964a36f2d72a673"
    "7461747573b05041525449414c4c595f46494c4c4544aa66696c6c65645f717479aa302e3030303030303031a96176675f70"
    "72696365a7302e3035313233a566696c6c73918fa2747314a766696c6c5f6964a56f2d722d31a86f726465725f6964a36f2d"
    "72af636c69656e745f6f726465725f6964a172a673796d626f6ca6455448425443a473696465a453454c4ca57072696365a7"
    "302e3035313233a3717479aa302e3030303030303031a3666565b2302e30303030303030303030303035313233a96665655f"
    "6173736574a3425443a96c6971756964697479a54d414b4552a7657863685f7473cf0000018bcfe56800ac6465636973696f"
    "6e5f6d6964a6302e30353132b1736c6970706167655f6465636973696f6ea82d302e3030303033ad71756575655f77616974"
    "5f6e730fa6726561736f6ea0")
NO_FILLS_ACK_HEX = (
    "8aa17601a474797065a361636ba2747305af636c69656e745f6f726465725f6964a26332a86f726465725f6964a46f2d6332"
    "a6737461747573a750454e44494e47aa66696c6c65645f717479a130a96176675f7072696365c0a566696c6c7390a6726561"
    "736f6ea74e4f5f424f4f4b")


def _taker(n: int, price: str, qty: str, fee: str, slip: str) -> m.Fill:
    """A fill as the paper broker made it (FillModel, a 1.0 market buy walking three asks, fee in BTC)."""
    return m.Fill(ts=1, fill_id=f"o-c1-{n}", order_id="o-c1", client_order_id="c1", symbol="BTCUSDT", side=Side.BUY,
                  price=Decimal(price), qty=Decimal(qty), fee=Decimal(fee), fee_asset="BTC", liquidity=Liquidity.TAKER,
                  exch_ts=7, decision_mid=Decimal("100.25"), arrival_mid=Decimal("100.25"),
                  slippage_decision=Decimal(slip), slippage_arrival=Decimal(slip))


BROKER_FILLS = [_taker(1, "100.5", "0.4", "0.0004", "0.25"), _taker(2, "101", "0.5", "0.0005", "0.75"),
                _taker(3, "102", "0.1", "0.0001", "1.75")]
BROKER_ACK = m.Ack(ts=1, client_order_id="c1", order_id="o-c1", status=OrderStatus.FILLED, filled_qty=Decimal("1.0"),
                   avg_price=Decimal("100.9"), fills=BROKER_FILLS)
MAKER_ACK = m.Ack(ts=21, client_order_id="r", order_id="o-r", status=OrderStatus.PARTIALLY_FILLED,
                  filled_qty=Decimal("0.00000001"), avg_price=Decimal("0.05123"), fills=[
                      m.Fill(ts=20, fill_id="o-r-1", order_id="o-r", client_order_id="r", symbol="ETHBTC",
                             side=Side.SELL, price=Decimal("0.05123"), qty=Decimal("0.00000001"),
                             fee=Decimal("0.0000000000005123"), fee_asset="BTC", liquidity=Liquidity.MAKER,
                             exch_ts=1700000000000, decision_mid=Decimal("0.0512"),
                             slippage_decision=Decimal("-0.00003"), queue_wait_ns=15)])


def _old_fill_map(fill: m.Fill) -> dict:
    """What the broker put in Ack.fills before they were typed: the fill's wire map less `v` and `type`."""
    wire = m.Message.to_wire(fill)  # the generic map, then without the unset quality fields
    return {k: v for k, v in wire.items() if k not in ("v", "type")
            and (k not in m.Fill._QUALITY or not (v is None or v == 0))}


@pytest.mark.parametrize("ack,golden", [(BROKER_ACK, BROKER_ACK_HEX), (MAKER_ACK, MAKER_ACK_HEX)],
                         ids=["taker", "maker"])
def test_a_typed_ack_encodes_to_the_bytes_of_its_fill_maps(ack, golden):
    old_form = {"v": 1, "type": "ack", "ts": ack.ts, "client_order_id": ack.client_order_id,
                "order_id": ack.order_id, "status": ack.status.value, "filled_qty": format(ack.filled_qty, "f"),
                "avg_price": format(ack.avg_price, "f"), "fills": [_old_fill_map(f) for f in ack.fills],
                "reason": ack.reason}
    assert m.encode(ack).hex() == golden == msgpack.packb(old_form).hex()
    assert m.encode(ack, seq=4) == msgpack.packb({**old_form, "seq": 4})
    back = m.decode(bytes.fromhex(golden), m.REQUESTS)
    assert back == ack and all(type(f) is m.Fill for f in back.fills) and back.fills[0].price == ack.fills[0].price
    assert m.encode(back).hex() == golden


def test_an_ack_without_fills_encodes_as_before():
    no_fills = m.Ack(ts=5, client_order_id="c2", order_id="o-c2", status=OrderStatus.PENDING, filled_qty=Decimal(0),
                     reason="NO_BOOK")
    assert m.encode(no_fills).hex() == NO_FILLS_ACK_HEX  # fills: () and [] are the same empty array
    assert m.encode(m.Ack(**{**{f: getattr(no_fills, f) for f in m.Ack._names}, "fills": []})).hex() == NO_FILLS_ACK_HEX
    assert m.decode(bytes.fromhex(NO_FILLS_ACK_HEX), m.REQUESTS).fills == []


def test_a_decision_with_a_typed_order_is_risks_splice_byte_for_byte():
    # risk answers with its decision's bytes around the broker's ack bytes (services/risk/desk.py)
    spliced = bytes.fromhex(SPLICED_DECISION_HEAD_HEX + BROKER_ACK_HEX)
    typed = m.Decision(ts=123, client_order_id="c1", verdict=Verdict.APPROVED, qty=Decimal("1.0"), order=BROKER_ACK)
    old_form = m.Decision(ts=123, client_order_id="c1", verdict=Verdict.APPROVED, qty=Decimal("1.0"),
                          order=msgpack.unpackb(bytes.fromhex(BROKER_ACK_HEX)))  # the ack's map, as before
    assert m.encode(typed) == spliced == m.encode(old_form)
    back = m.decode(spliced, m.REQUESTS)
    assert back == typed and back.order == BROKER_ACK and m.encode(back) == spliced


def test_a_fill_encodes_once_and_hands_out_copies():
    fill = _taker(1, "100.5", "0.4", "0.0004", "0.25")
    first = fill.to_wire()
    first["qty"] = "999"  # a caller's change stays its own
    del first["v"]
    assert fill.to_wire()["qty"] == "0.4" and fill.to_wire(seq=3)["seq"] == 3 and "seq" not in fill.to_wire()
    body = fill.wire_body()
    assert list(body) == list(fill.to_wire())[2:] and body == _old_fill_map(fill)
    assert fill == _taker(1, "100.5", "0.4", "0.0004", "0.25") and "_wire" not in repr(fill)
    assert "_wire" not in m.Fill._names and len(m.Fill._specs) == len(m.Fill._names)


@pytest.mark.parametrize("change,where", [
    ({"fills": [{"fill_id": "f"}]}, "order: fills[0]: fill.ts"),
    ({"fills": "abc"}, "order: fills: expected list of fill maps"),
    ({"fills": [None]}, "order: fills[0]: expected fill map"),
    ({"fills": [{**BROKER_FILLS[0].wire_body(), "price": 100.5}]}, "order: fills[0]: price: expected"),
    ({"fills": [{**BROKER_FILLS[0].wire_body(), "fee": "1e-40"}]}, "order: fills[0]: fee: expected"),
    ({"fills": [{**BROKER_FILLS[0].wire_body(), "side": "HOLD"}]}, "order: fills[0]: side: expected"),
    ({"fills": [{**BROKER_FILLS[0].wire_body(), "queue_wait_ns": "5"}]}, "order: fills[0]: queue_wait_ns"),
    ({"type": "fill"}, "order: 'fill'"),
    ({"v": 9}, "order: 9"),
    ({"filled_qty": 1.0}, "order: filled_qty: expected"),
])
def test_a_decision_s_ack_is_checked_once_at_decode_naming_the_field(change, where):
    wire = m.Decision(ts=1, client_order_id="c1", verdict=Verdict.APPROVED, order=BROKER_ACK).to_wire()
    wire["order"].update(change)
    with pytest.raises(DecodeError) as err:
        m.decode(msgpack.packb(wire), m.REQUESTS)
    assert where in err.value.detail, err.value.detail
    with pytest.raises(DecodeError):
        m.decode(msgpack.packb({**wire, "order": [1]}), m.REQUESTS)


# -- bounds on what a request brings in (issue #11) ------------------------------------------------

@pytest.mark.parametrize("text", ["9e999999", "1e-999999", "0E-999999", "1e30", "-1e30", "1E+30",
                                  "1" * 31, "0." + "0" * 30 + "1", "9" * 65, "Infinity", "sNaN", "-nan",
                                  # what Decimal() reads and no wire writes: '1_000' bought 1000 BTC
                                  " 0.001", "0.001 ", "0.001\n", "1_000", "\u0661\u0662", "\uff11"])
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


@pytest.mark.parametrize("field", ["client_order_id", "strategy", "symbol"])
@pytest.mark.parametrize("value", ["a\nlevel=error event=FORGED", "ids\x00\x07\x1b[31mred", "\x00", "tab\there",
                                   "line\u2028sep", "del\x7f"])
def test_request_names_are_printable(field, value):
    # an id with a newline or an escape sequence wrote forged lines into the logs and `qf trades`
    with pytest.raises(DecodeError) as err:
        m.decode(msgpack.packb({**ORDER.to_wire(), field: value}), m.REQUESTS)
    assert err.value.reason == "bad_field" and "printable" in err.value.detail
    assert m.decode(msgpack.packb({**ORDER.to_wire(), field: "ok-é 1"}), m.REQUESTS)


@pytest.mark.parametrize("field,value", [("client_order_id", ""), ("client_order_id", "x" * 129),
                                         ("strategy", ""), ("strategy", "s" * 129), ("symbol", "B" * 10_000)])
def test_request_names_are_one_to_128_characters(field, value):
    with pytest.raises(DecodeError) as err:
        m.decode(msgpack.packb({**ORDER.to_wire(), field: value}), m.REQUESTS)
    assert err.value.reason == "bad_field"
    with pytest.raises(DecodeError):
        m.decode(msgpack.packb({"v": 1, "type": "cancel", "ts": 1, "client_order_id": "x" * 129}), m.REQUESTS)
    assert m.decode(msgpack.packb({**ORDER.to_wire(), field: "x" * 128}), m.REQUESTS)
