"""Decimal columns as scaled integers (services/report/amounts.py): both ways of parsing give the
exact Decimal of every value, and anything that is not a plain decimal is refused by position."""
from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given, settings, strategies as st

from services.report.amounts import BadAmount, _parse_exact, _parse_fast, parse, parse_texts

plain = st.builds(lambda sign, whole, frac, dot: f"{sign}{whole}{'.' + frac if frac or dot else ''}",
                  st.sampled_from(("", "-")), st.integers(0, 10**20).map(str),
                  st.text("0123456789", max_size=20), st.booleans())


@settings(max_examples=500, deadline=None)
@given(st.lists(plain, min_size=1, max_size=30))
def test_every_value_parses_to_its_exact_decimal(values):
    parsed = parse_texts(values)
    assert [parsed.decimal(i) for i in range(len(values))] == [Decimal(v) for v in values]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.builds(lambda units, places: str(Decimal(units).scaleb(-places)) if places else str(units),
                          st.integers(-10**9, 10**9), st.integers(0, 6)), min_size=1, max_size=30))
def test_the_fast_way_when_it_answers_agrees_with_the_exact_way(values):
    values = [format(Decimal(v), "f") for v in values]
    text = ",".join(values)
    import numpy as np
    buf = np.frombuffer(text.encode(), dtype=np.uint8)
    bounds = np.concatenate(([-1], np.flatnonzero(buf == ord(",")), [len(buf)]))
    exact = _parse_exact(values, buf, bounds)
    fast = _parse_fast(text, buf, bounds, len(values), ",")
    assert fast is not None  # ≤ 15 characters, far below 2^51 units: the fast way vouches for these
    assert [fast.decimal(i) for i in range(len(values))] == [exact.decimal(i) for i in range(len(values))]


def test_long_values_take_the_exact_way():
    values = ["12345678901234.56789", "0.00000000000000000001", "-99999999999999999999.5"]
    parsed = parse_texts(values)
    assert [parsed.decimal(i) for i in range(3)] == [Decimal(v) for v in values]
    assert parsed.scale == 20


@pytest.mark.parametrize("bad", ["", "-", ".", "1e5", "1.2.3", "--1", "1-", "+1", " 1", "1_0", "٣", "nan", "inf"])
def test_what_is_not_a_plain_decimal_is_refused_at_its_position(bad):
    with pytest.raises(BadAmount) as caught:
        parse_texts(["1.5", "2", bad, "3"])
    assert caught.value.index == 2


def test_a_wrong_count_is_refused():
    with pytest.raises(BadAmount):
        parse("1,2,3", 4)
