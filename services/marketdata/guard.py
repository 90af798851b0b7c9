"""Keeping each symbol's book coming: per-symbol snapshot backoff and the stall escalation, pure."""
# Why (issue #11): a single depth event with a corrupted `u` left a symbol without a book for
# good while frames kept arriving, so the silence watchdog (live.py) never fired; in one variant
# the snapshot was re-requested ~150 times a second (119 requests, weight 5,950, in 5 s against
# the fake Binance: the whole minute's budget), which against Binance ends in a 429/418 ban.
# BookSync now refuses the known lies; this guard is the net under everything else:
#
# - Snapshots of one symbol that do not give it a lasting book are spaced out exponentially:
#   the 1st at once, then SNAPSHOT_BASE_S, twice that, ... up to half the sync timeout. A book
#   that stays synced SNAPSHOT_HEALTHY_S resets it. Under a stream that lies without end this
#   costs one snapshot per timeout/2 per symbol (spot, limit 1000: 50 × 12 = 600 weight a
#   minute of Binance's 6,000 at the 10 s default), and the weight gate (binance.py) bounds
#   the sum of all symbols.
# - A symbol whose frames (depth, trades, tickers) keep arriving but whose book has not come
#   for `timeout_s` is stalled: its buffer is dropped and a new snapshot fetched; at twice the
#   timeout the connection is replaced. A new connection starts the clock again.
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

SNAPSHOT_BASE_S = 0.25  # wait before the 2nd snapshot of a symbol that is not synced by the 1st
SNAPSHOT_HEALTHY_S = 30.0  # a book synced this long: its next snapshot goes out at once


@dataclass(frozen=True, slots=True)
class Action:
    """What the shell must do for a stalled symbol: `resnapshot` (drop its book and buffer,
    fetch a new snapshot) or `reconnect` (replace its market's connection)."""

    kind: str
    key: str
    waited_s: float  # how long its frames have come without a book


@dataclass(slots=True)
class _Sym:
    frames: int = 0  # the symbol's frame count at the last check
    books: int = 0  # its published-book count at the last check
    since: float | None = None  # first check that saw frames without a new book
    stage: int = 0  # actions taken in this stall on this connection
    stalled: bool = False  # a stall is going on (from its detection to the next book)
    attempts: int = 0  # snapshots requested since the book was last healthy
    next_snapshot: float = 0.0  # no snapshot request before this
    synced_at: float | None = None  # when the book last became synced


class BookGuard:
    """Per symbol: when the next snapshot may be asked for, and whether the book is stalled.

    Time (monotonic seconds) is an argument of every call. Counters: `stalls` (stalls detected)
    and `recoveries` (stalls ended by a book), by key."""

    def __init__(self, keys: Iterable[str], timeout_s: float, base_s: float = SNAPSHOT_BASE_S,
                 healthy_s: float = SNAPSHOT_HEALTHY_S) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.timeout_s, self.base_s, self.healthy_s = timeout_s, base_s, healthy_s
        self.cap_s = max(base_s, timeout_s / 2)
        self._s = {k: _Sym() for k in keys}
        self.stalls = dict.fromkeys(self._s, 0)
        self.recoveries = dict.fromkeys(self._s, 0)

    # -- snapshot pacing ----------------------------------------------------------------

    def snapshot_wait(self, key: str, now: float) -> float:
        """Seconds before a snapshot of `key` may be requested (0: now)."""
        return max(0.0, self._s[key].next_snapshot - now)

    def snapshot_sent(self, key: str, now: float) -> None:
        """A snapshot of `key` was requested at `now`: the next one waits longer."""
        s = self._s[key]
        s.attempts += 1
        s.next_snapshot = now + min(self.cap_s, self.base_s * 2 ** min(s.attempts - 1, 30))

    def attempts(self, key: str) -> int:
        """Snapshots of `key` requested since its book was last healthy."""
        return self._s[key].attempts

    def synced(self, key: str, now: float) -> None:
        """`key`'s book became synced."""
        self._s[key].synced_at = now

    def unsynced(self, key: str, now: float) -> None:
        """`key`'s book was lost (gap, bad event, disconnection): if it had lasted, its
        snapshots start over from no wait."""
        s = self._s[key]
        if s.synced_at is not None and now - s.synced_at >= self.healthy_s:
            s.attempts, s.next_snapshot = 0, 0.0
        s.synced_at = None

    # -- stalls -------------------------------------------------------------------------

    def check(self, now: float, counts: dict[str, tuple[int, int]]) -> tuple[list[Action], list[str]]:
        """Take each key's running (frames received, books published) counts; return the
        actions due and the keys whose stall a book has just ended. Call it every ~0.1 s:
        its resolution is the time between calls."""
        actions, recovered = [], []
        for key, (frames, books) in counts.items():
            s = self._s[key]
            if books != s.books:
                s.books, s.frames, s.since, s.stage = books, frames, None, 0
                if s.stalled:
                    s.stalled = False
                    self.recoveries[key] += 1
                    recovered.append(key)
                continue
            if frames != s.frames:
                s.frames = frames
                if s.since is None:
                    s.since = now
            if s.since is None:
                continue
            waited = now - s.since
            if waited >= self.timeout_s * (s.stage + 1):
                if not s.stalled:
                    s.stalled = True
                    self.stalls[key] += 1
                s.stage += 1
                actions.append(Action("resnapshot" if s.stage == 1 else "reconnect", key, waited))
        return actions, recovered

    def disconnected(self, key: str) -> None:
        """`key`'s connection ended: its frames stopped, and the connection's own machinery
        (backoff, silence watchdog) takes over; a new connection starts the clock again."""
        s = self._s[key]
        s.since, s.stage = None, 0

    def stalled_since(self, key: str) -> float | None:
        """When the frames without a book of a stall going on began, else None."""
        s = self._s[key]
        return s.since if s.stalled else None

    def is_stalled(self, key: str) -> bool:
        return self._s[key].stalled
