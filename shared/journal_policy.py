"""StorePolicy: when the journal's records (shared/journal.py) are stored into SQLite.

Why: a record is durable once the journal has it, so storing it into SQLite can wait for a
moment off every answer's path. Storing right after each answer instead competes with the
rest of the round trip for the 2 cores (+140 µs at the median in the risk benchmark); bigger
batches make the order that waits for one slower. So records are stored once the process has
been idle `idle_ms` (between orders), or when `records` wait, or the oldest has waited `age_s`.
Pure: the caller passes the time (monotonic seconds) and does the storing.
"""
from __future__ import annotations

STORE_IDLE_MS, STORE_RECORDS, STORE_AGE_S = 1, 8, 0.01


class StorePolicy:
    """The thresholds of one journal's writer (the broker's `StoreKeeper`). `due(...)` says
    whether to store what is pending now; `wait_ms(...)` how long the loop may sleep before
    it asks again. `Journal.oldest` is the time `due` wants."""

    __slots__ = ("idle_ms", "records", "age_s")

    def __init__(self, idle_ms: int = STORE_IDLE_MS, records: int = STORE_RECORDS, age_s: float = STORE_AGE_S) -> None:
        self.idle_ms, self.records, self.age_s = idle_ms, records, age_s

    def due(self, pending: int, oldest: float, now: float, idle: bool = False) -> bool:
        """Whether `pending` unstored records, the oldest appended at `oldest`, go into SQLite
        at `now`: after an `idle` loop turn, when enough wait, or when the oldest waited long enough."""
        return pending > 0 and (idle or pending >= self.records or now - oldest >= self.age_s)

    def wait_ms(self, pending: int, longest_ms: int) -> int:
        """How long the loop may sleep: `idle_ms` while records wait (an idle turn stores them), else `longest_ms`."""
        return self.idle_ms if pending else longest_ms
