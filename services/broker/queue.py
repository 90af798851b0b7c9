"""Queue position of resting orders, after hftbacktest's risk-averse and probabilistic queue models."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

# Quantities are integer units of 1e-8 (exact); only the probabilistic split of a level
# decrease is computed in floats, then rounded up (never advancing an order further than the model says).
UNIT = 100_000_000  # units per 1 of the base asset


@dataclass(slots=True)
class QueuePos:
    """Where one resting order stands at its price.

    `ahead`: units displayed at our price that are in front of us (never
    negative; None until our price level has been seen since the order rested).
    `level`: the displayed size at our price when last seen. `traded`: units
    that traded against our price since then (to be netted out of the next
    level decrease, so that a trade is not counted twice)."""
    ahead: int | None = None
    level: int = 0
    traded: int = 0
    joined: int | None = None  # `ahead` when the order took its place (for fill-quality checks)

    def join(self, displayed: int) -> None:
        """Take the back of the queue behind everything displayed now."""
        self.ahead, self.level, self.traded, self.joined = displayed, displayed, 0, displayed


class RiskAverseQueue:
    """Conservative: only trades at our price advance us; a level that shrinks
    below what is ahead of us caps it (hftbacktest's RiskAdverseQueueModel)."""
    name = "risk_averse"

    def trade(self, pos: QueuePos, qty: int) -> int:
        """A trade of `qty` units against our price. Returns the units of it that
        reach us (0 while the queue ahead absorbs it)."""
        if pos.ahead is None:
            return 0
        reach = qty - pos.ahead
        pos.ahead = max(pos.ahead - qty, 0)
        pos.traded += qty
        return max(reach, 0)

    def level(self, pos: QueuePos, new: int) -> None:
        """The displayed size at our price is now `new` units."""
        if pos.ahead is None:
            pos.join(new)
            return
        pos.ahead = min(pos.ahead, new)
        pos.level, pos.traded = new, 0


class ProbQueue(RiskAverseQueue):
    """Probabilistic (hftbacktest's ProbQueueModel, after Rigtorp): a decrease
    of the level not explained by trades is a cancel, which is behind us with
    probability p = f(back) / (f(back) + f(front)); we advance by the expected
    part in front. `f` is x**n (power) or log(1 + x) (log), x in base units."""

    def __init__(self, f: Callable[[float], float], name: str) -> None:
        self.f = f
        self.name = name

    def level(self, pos: QueuePos, new: int) -> None:
        if pos.ahead is None:
            pos.join(new)
            return
        cancelled = pos.level - new - pos.traded
        front, back = pos.ahead, max(pos.level - pos.ahead, 0)
        pos.level, pos.traded = new, 0
        if cancelled <= 0 or front == 0:
            pos.ahead = min(front, new)
            return
        fb, ff = self.f(back / UNIT), self.f(front / UNIT)
        p = fb / (fb + ff) if fb + ff > 0 else 1.0
        if not math.isfinite(p):
            p = 1.0
        # expected cancels in front, plus any that cannot fit behind us
        est = front - (1.0 - p) * cancelled + min(back - p * cancelled, 0.0)
        pos.ahead = min(max(math.ceil(est), 0), new)


def power(n: float) -> Callable[[float], float]:
    return lambda x: x ** n


def log1p(x: float) -> float:
    return math.log1p(x)


def make_queue_model(name: str, n: float = 2.0) -> RiskAverseQueue:
    """'risk_averse', 'power' (f = x**n) or 'log' (f = log(1 + x)). Raises ValueError otherwise."""
    if name == "risk_averse":
        return RiskAverseQueue()
    if name == "power":
        if not n > 0:
            raise ValueError(f"power queue model needs n > 0, got {n}")
        return ProbQueue(power(n), f"power{n:g}")
    if name == "log":
        return ProbQueue(log1p, "log")
    raise ValueError(f"unknown queue model {name!r}: risk_averse, power or log")
