"""The README block (services/report/markdown.py): only what lies between the markers changes, and
a README that cannot take the report is refused in one line."""
from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given, settings, strategies as st

from services.report.markdown import END, START, MarkerError, duration, money, replace_block

README = f"# Project\n\nIntro.\n\n{START}\nold report\n{END}\n\n## After\ntext\n"


def test_only_the_block_between_the_markers_is_replaced():
    out = replace_block(README, "new table\n\n![x](img.png)\n")
    assert out == f"# Project\n\nIntro.\n\n{START}\nnew table\n\n![x](img.png)\n{END}\n\n## After\ntext\n"
    assert replace_block(out, "new table\n\n![x](img.png)") == out  # a second run changes no byte


@settings(max_examples=200, deadline=None)
@given(st.text(), st.text(), st.text(), st.text())
def test_text_outside_the_markers_is_kept_byte_for_byte(before, inside, after, content):
    for t in (before, inside, after, content):
        if START in t or END in t:
            return
    text = f"{before}{START}{inside}{END}{after}"
    out = replace_block(text, content)
    assert out.startswith(before + START) and out.endswith(END + after)
    assert replace_block(out, content) == out


@pytest.mark.parametrize("text, says", [
    ("# no markers\n", "has no <!-- report:start --> marker"),
    (f"{START}\n{START}\n{END}\n", "has 2 <!-- report:start --> markers"),
    (f"{START}\n{END}\n{END}\n", "has 2 <!-- report:end --> markers"),
    (f"{END}\n{START}\n", "comes before"),
])
def test_a_readme_without_one_pair_of_markers_is_refused(text, says):
    with pytest.raises(MarkerError, match=says):
        replace_block(text, "x", "README.md")


def test_money_is_the_exact_decimal_text_and_durations_read_well():
    assert money({"USDT": Decimal("12.50000")}, signed=True) == "+12.5 USDT"
    assert money({"USDT": Decimal("-0.00000001"), "BNB": Decimal("0.1")}) == "-0.00000001 USDT + 0.1 BNB"
    assert money({"USDT": Decimal("1E+3")}) == "1000 USDT"
    assert money({}) == "0"
    assert [duration(n * 10**9) for n in (42, 3720, 90_000)] == ["42 s", "1 h 2 min", "1 d 1 h"]
