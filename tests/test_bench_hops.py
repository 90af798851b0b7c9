"""bench/tick_to_trade_hops.py's matching: each order's stamps found by time across processes; an
order risk answered without the broker is left out rather than paired with the next one's."""
from __future__ import annotations

from bench.tick_to_trade_hops import STEPS, _orders, _points, steps, tail

US = 1000


def _order(t0: int, to_broker: bool = True) -> dict[str, list[str]]:
    """One order's stamp lines by process, 100 µs apart, starting at `t0` ns."""
    at = {p: t0 + i * 100 * US for i, p in enumerate("ABCDEFGHIJK")}
    lines = {"marketdata": [f"QFSTAMP B {at['B']} {at['A']}"],
             "strategy": [f"QFSTAMP D {at['D']} {at['C']} {at['A']}", f"QFSTAMP K {at['K']}"],
             "risk": [f"QFSTAMP E {at['E']}", f"QFSTAMP J {at['J']}"], "broker": []}
    if to_broker:
        lines["risk"] += [f"QFSTAMP F {at['F']}", f"QFSTAMP I {at['I']}"]
        lines["broker"] += [f"QFSTAMP G {at['G']}", f"QFSTAMP H {at['H']}"]
    return lines


def _merge(*orders: dict[str, list[str]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for o in orders:
        for name, lines in o.items():
            out.setdefault(name, []).extend(lines)
    return out


def test_each_order_is_matched_and_a_refused_one_is_left_out():
    lines = _merge(_order(1_000_000_000), _order(2_000_000_000, to_broker=False), _order(3_000_000_000),
                   {"strategy": ["a log line, not a stamp"]})
    orders = _orders(_points(lines))
    assert [o["A"] for o in orders] == [1_000_000_000, 3_000_000_000]
    for o in orders:
        assert all(o[b] - o[a] == (100 * US if name != "total" else 1000 * US) for name, a, b in STEPS)


def test_the_tail_blames_the_step_furthest_above_its_median():
    orders = _orders(_points(_merge(*(_order(t * 1_000_000_000) for t in range(1, 101)))))
    assert len(orders) == 100 and steps(orders)[-1][1:] == (1000.0, 1000.0, 1000.0)
    # the two slowest: one held 5 ms in the broker, one 3 ms on the hop into the strategy; a third,
    # not among them, 1 ms in risk's check
    for o, (late_from, extra) in zip(orders, (("H", 5000), ("C", 3000), ("F", 1000))):
        for p in "ABCDEFGHIJK"["ABCDEFGHIJK".index(late_from):]:
            o[p] += extra * US
    assert tail(orders) == [("broker work", 1, 5000.0), ("md -> strategy", 1, 3000.0)]
    assert dict((name, p99) for name, _, _, p99 in steps(orders))["total"] > 3000
