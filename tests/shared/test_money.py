"""shared/money.py: one contract for amounts (exact, never a float), quote assets known or an error."""
from __future__ import annotations

from decimal import Context, Decimal as D, localcontext

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared import messages, money
from shared.errors import ConfigError, DecodeError
from shared.money import (MAX_PRICE, MAX_QTY, QUOTE_ASSETS, BadAmount, UnknownAsset, base_asset, canonical, fee,
                          from_book_float, quote_asset, text, to_decimal, vwap)


# -- to_decimal: the one parser -------------------------------------------------------------

def test_to_decimal_takes_decimal_strings_ints_and_decimals_exactly():
    assert to_decimal("1.50", "x") == D("1.50") and str(to_decimal("1.50", "x")) == "1.50"  # no rounding, no normalising
    assert to_decimal(3, "x") == 3 and to_decimal(D("0.00000001"), "x") == D("1e-8")
    assert to_decimal("-2.5", "x") == D("-2.5") and to_decimal("1e-8", "x") == D("0.00000001")
    assert to_decimal(10**40, "x") == D(10**40)  # bounds are the caller's


@pytest.mark.parametrize("value", [0.1, 1.5, 0.0, float("nan"), float("inf")])
def test_to_decimal_refuses_every_float_naming_the_field(value):
    with pytest.raises(BadAmount, match=r"^price: a float .* is not an exact amount"):
        to_decimal(value, "price")


@pytest.mark.parametrize("value,why", [(True, "got bool"), (False, "got bool"), (None, "got NoneType"),
                                       ([], "got list"), ("nan", "not finite"), ("-Infinity", "not finite"),
                                       ("sNaN", "not finite"), ("1e", "not a decimal"), ("", "not a decimal"),
                                       ("0x10", "not a decimal"), (D("NaN"), "not finite"), (D("-inf"), "not finite")])
def test_to_decimal_refuses_bools_nan_inf_and_garbage(value, why):
    with pytest.raises(BadAmount, match=f"^qty: .*{why}"):
        to_decimal(value, "qty")


def test_a_refusal_is_a_value_error():
    assert issubclass(BadAmount, ValueError) and issubclass(UnknownAsset, ValueError)


@given(st.decimals(allow_nan=False, allow_infinity=False, places=12, min_value=-10**15, max_value=10**15))
def test_text_round_trips_through_to_decimal_and_the_wire(d):
    assert to_decimal(text(d), "x") == d and "E" not in text(d)
    assert messages.check_decimal("x", text(d)) == d


def test_the_wire_checker_keeps_money_s_contract_and_adds_its_bounds():
    for bad in (1.5, True, "nan", "inf", None):  # refused by to_decimal
        with pytest.raises(DecodeError) as exc:
            messages.check_decimal("qty", bad)
        assert exc.value.reason == "bad_field" and exc.value.detail.startswith("qty: ")
    for beyond in ("1e30", "1e-31", "0E-40", "1" * 65, "9e999999"):  # wire bounds only
        assert to_decimal(beyond, "qty") is not None
        with pytest.raises(DecodeError):
            messages.check_decimal("qty", beyond)
    assert messages.check_decimal("qty", "0") == 0 and messages.check_decimal("qty", 7) == 7


# -- the one place a float becomes a price -----------------------------------------------------

def test_from_book_float_goes_through_repr_onto_the_grid():
    assert from_book_float(61234.57) == D("61234.57") and from_book_float(0.1) == D("0.1")
    assert from_book_float(1e-8) == D("0.00000001") and from_book_float(100.0) == D("100")
    assert from_book_float(D("5.5")) == D("5.5")  # already exact


@pytest.mark.parametrize("price", [0.0, -1.0, float("nan"), float("inf"), 1e300, float(MAX_PRICE), 1e-9, "x"])
def test_from_book_float_is_none_for_what_no_book_can_be_marked_at(price):
    assert from_book_float(price) is None


# -- quote and base assets -------------------------------------------------------------------

@pytest.mark.parametrize("symbol,quote,base", [("BTCUSDT", "USDT", "BTC"), ("BTCFDUSD", "FDUSD", "BTC"),
                                               ("ETHBTC", "BTC", "ETH"), ("BNBETH", "ETH", "BNB"),
                                               ("BTCTUSD", "TUSD", "BTC"), ("btceur", "EUR", "BTC"), ("USDM:ETHFDUSD", "FDUSD", "USDM:ETH")])
def test_quote_and_base_assets(symbol, quote, base):
    assert (quote_asset(symbol), base_asset(symbol)) == (quote, base)
    assert quote_asset(symbol) == quote  # memoised: the same answer


@pytest.mark.parametrize("symbol", ["USDT", "BTCXYZ", "", "FDUSD"])
def test_an_unknown_quote_asset_is_an_error_never_empty(symbol):
    with pytest.raises(UnknownAsset, match="has no known quote asset"):
        quote_asset(symbol)
    with pytest.raises(UnknownAsset):
        base_asset(symbol)


def test_an_unknown_asset_of_a_configured_symbol_stops_a_service_at_start():
    # the CLI prints a ConfigError in one line and exits 2 (services/cli.py)
    assert issubclass(UnknownAsset, ConfigError)


def test_the_quote_memo_stays_bounded():
    for n in range(3000):
        quote_asset(f"X{n}USDT")
    assert len(money._QUOTE_OF) <= money._QUOTE_MEMO_MAX
    assert QUOTE_ASSETS[0] == "FDUSD"  # longest first where one ends another


# -- helpers ---------------------------------------------------------------------------------

def test_canonical_and_text():
    assert str(canonical(D("100.50000000"))) == "100.5" and str(canonical(D("1E+2"))) == "100"
    assert text(D("0.000")) == "0" and text(D("1E+2")) == "100" and text(D("1E-8")) == "0.00000001"


def test_vwap_and_fee_are_exact():
    slices = [(D("100.5"), D("0.4")), (D("101"), D("0.5")), (D("102"), D("0.1"))]
    assert vwap(slices) == D("100.9") and vwap([]) is None
    assert sum(fee(p, q, D("0.001")) for p, q in slices) == D("0.1009")
    assert fee(D("61837.63"), D("0.00123"), D("0.00075")) == D("0.057045213675")
    price, qty = MAX_PRICE - D("0.00000001"), MAX_QTY - D("0.00000001")
    with localcontext(Context(prec=100)):
        assert fee(price, qty, D("0.00075")) == price * qty * D("0.00075")
