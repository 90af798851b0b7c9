"""StoreHealth: whether the broker can make orders durable and store them, and when to try again.

A full disk fails the broker's writes thousands of times a second if it keeps trying; the
broker instead notes the outage once, refuses new orders while nothing it would do can be
made durable, and probes the storage with a backoff (50 ms doubling to 1 s) until it takes
writes again. Pure: time (monotonic seconds) is passed in, the shell does the writing.
"""
from __future__ import annotations

PROBE_FIRST_S, PROBE_MAX_S = 0.05, 1.0  # the first try after a failure, and the longest wait between tries
# While only the database refuses rows, orders are still durable in the journal and taken; past
# this many unstored records new ones are refused too (every record waits in memory as well).
JOURNAL_PENDING_MAX = 5000


class StoreHealth:
    """One storage outage at a time.

    `fail(why, now, frozen)` starts one (returns True) or notes another failure during it;
    `frozen` says the journal itself refused a record: nothing can be made durable, and the
    broker's model, ahead of what is durable, waits to be rebuilt. `refusal(pending)` is why a
    new order is refused now (None: take it). `probe_due(now)` says when to try the storage
    again; `probe_failed(why, now)` backs off; `recover(now)` ends the outage and returns how
    long it lasted."""

    def __init__(self, first_s: float = PROBE_FIRST_S, max_s: float = PROBE_MAX_S,
                 pending_max: int = JOURNAL_PENDING_MAX) -> None:
        self.first_s, self.max_s, self.pending_max = first_s, max_s, pending_max
        self.why: str | None = None  # the latest failure, while the outage lasts
        self.frozen = False
        self.since = 0.0
        self.next_probe = 0.0
        self.delay = first_s
        self.outages = 0  # started since the process began
        self.probes = 0  # failed tries during outages

    @property
    def down(self) -> bool:
        return self.why is not None

    def fail(self, why: str, now: float, frozen: bool = False) -> bool:
        """Note a failed write; True when it starts an outage."""
        started = self.why is None
        if started:
            self.since, self.delay, self.next_probe = now, self.first_s, now + self.first_s
            self.outages += 1
        self.why = why
        self.frozen = self.frozen or frozen
        return started

    def refusal(self, pending: int) -> str | None:
        """Why a new order is refused now, given `pending` unstored journal records; None to take it."""
        if self.why is None:
            return None
        if self.frozen:
            return f"the broker cannot make orders durable: {self.why}; retry later"
        if pending >= self.pending_max:
            return f"the database has not taken the last {pending} journal records: {self.why}; retry later"
        return None

    def probe_due(self, now: float) -> bool:
        return self.why is not None and now >= self.next_probe

    def wait_s(self, now: float) -> float | None:
        """Seconds until the next probe (None: no outage)."""
        return None if self.why is None else max(0.0, self.next_probe - now)

    def probe_failed(self, why: str, now: float) -> None:
        self.why = why
        self.probes += 1
        self.delay = min(self.max_s, self.delay * 2)
        self.next_probe = now + self.delay

    def recover(self, now: float) -> float:
        """The storage takes writes again: returns how long the outage lasted (s)."""
        lasted = now - self.since
        self.why, self.frozen = None, False
        return lasted

    def down_s(self, now: float) -> float:
        return now - self.since if self.why is not None else 0.0
