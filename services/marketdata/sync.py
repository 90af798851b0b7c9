"""Binance's "manage a local order book correctly" procedure as a pure state machine."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import Enum

from services.marketdata.book import OrderBook


class Market(str, Enum):
    """Which Binance market a stream comes from: their sequencing rules differ."""

    SPOT = "spot"  # each event's U == previous u + 1
    USDM = "usdm"  # each event's pu == previous u (ids are not contiguous)


class SyncResult(str, Enum):
    """What BookSync did with an input; the shell acts on GAP and SNAPSHOT_TOO_OLD."""

    APPLIED = "applied"  # event applied, book current
    BUFFERED = "buffered"  # waiting for a snapshot
    DROPPED_OLD = "dropped_old"  # event older than the book: nothing to do
    GAP = "gap"  # chain broken: book/buffer discarded, event buffered, snapshot needed
    SNAPSHOT_APPLIED = "snapshot_applied"  # book rebuilt and synced
    SNAPSHOT_TOO_OLD = "snapshot_too_old"  # snapshot cannot be lined up with events: fetch another
    SNAPSHOT_IGNORED = "snapshot_ignored"  # already synced: the snapshot is not needed


class BadEventError(ValueError):
    """A depth event or snapshot is malformed. The shell logs it, counts it and goes on;
    BookSync has already dropped its sync (the event's changes are lost) if it was synced."""


@dataclass(frozen=True, slots=True)
class Gap:
    """Where the update-id chain broke: the last id we had and the event that did not follow."""

    prev_u: int  # last update id applied (or buffered) before the gap
    first_u: int  # the event's U
    last_u: int  # the event's u
    pu: int | None  # the event's pu (USD-M only)

    def __str__(self) -> str:
        pu = "" if self.pu is None else f" pu={self.pu}"
        return f"after update id {self.prev_u} came U={self.first_u} u={self.last_u}{pu}"


class BookSync:
    """Keeps one symbol's OrderBook in step with a diff-depth stream plus REST snapshots.

    Feed every depth event to on_depth() and every snapshot to on_snapshot();
    when needs_snapshot is True the shell fetches (or awaits) a snapshot.
    Counters: events_applied, gaps (chain breaks seen), resyncs (snapshots
    applied after the first one). last_gap describes the latest break.
    """

    def __init__(self, symbol: str, market: Market = Market.SPOT, max_buffer: int = 10_000,
                 book_type: type | None = None) -> None:
        if max_buffer < 1:
            raise ValueError(f"max_buffer must be >= 1, got {max_buffer}")
        self.market = Market(market)
        # The C OrderBook (looked up here, so a benchmark can swap the module's); tests also run
        # book.PyOrderBook.
        self.book = (book_type or OrderBook)(symbol.upper())
        self.synced = False
        self.needs_snapshot = True
        self.events_applied = 0
        self.gaps = 0
        self.resyncs = 0
        self.last_gap: Gap | None = None
        # Oldest events fall out first when the snapshot is late: a snapshot
        # older than what is left is then refused and fetched again.
        self._buffer: deque[dict] = deque(maxlen=max_buffer)
        self._first = True  # the next applied event must straddle the snapshot
        self._snapshots = 0
        self._usdm = self.market is Market.USDM

    @property
    def buffered(self) -> int:
        """Number of events waiting for a snapshot."""
        return len(self._buffer)

    def buffered_range(self) -> tuple[int, int] | None:
        """Return (first U, last u) of the buffered events, or None if none are buffered."""
        if not self._buffer:
            return None
        return self._buffer[0]["U"], self._buffer[-1]["u"]

    def on_depth(self, event: dict) -> SyncResult:
        """Take a depthUpdate "data" dict (U, u, b, a; pu for USD-M) and return what happened.

        Raises BadEventError if the event is malformed (after dropping sync, as
        its changes cannot be applied).
        """
        try:
            U, u = event["U"], event["u"]
            pu = event["pu"] if self._usdm else None
        except (KeyError, TypeError) as e:
            self._fail(f"depth event without {e}")
        if type(U) is not int or type(u) is not int or U > u or (self._usdm and type(pu) is not int):
            self._fail(f"depth event with bad update ids U={U!r} u={u!r} pu={pu!r}")
        if not self.synced:
            return self._buffer_event(event, U, u, pu)
        return self._apply(event, U, u, pu)

    def on_snapshot(self, snapshot: dict) -> SyncResult:
        """Take a REST depth snapshot (lastUpdateId, bids, asks) and return what happened.

        Returns SNAPSHOT_APPLIED (buffered events applied on top), SNAPSHOT_TOO_OLD
        (the first buffered event starts after it: needs_snapshot stays True),
        SNAPSHOT_IGNORED when already synced, or GAP if a buffered event broke
        the chain. Raises BadEventError if the snapshot is malformed.
        """
        try:
            last, bids, asks = snapshot["lastUpdateId"], snapshot["bids"], snapshot["asks"]
        except (KeyError, TypeError) as e:
            raise BadEventError(f"{self.book.symbol}: snapshot without {e}") from None
        if type(last) is not int:
            raise BadEventError(f"{self.book.symbol}: snapshot lastUpdateId={last!r}")
        if not self.needs_snapshot:
            return SyncResult.SNAPSHOT_IGNORED
        buf = self._buffer
        # Events the snapshot already contains are useless now and for any later
        # (newer) snapshot, so they go even if this snapshot is then refused.
        while buf and (buf[0]["u"] < last if self._usdm else buf[0]["u"] <= last):
            buf.popleft()
        if buf and not self._straddles(buf[0], last):
            # The snapshot predates the first buffered event (or, USD-M only,
            # falls between two events' id ranges): applying it would skip updates.
            return SyncResult.SNAPSHOT_TOO_OLD
        try:
            self.book.apply_snapshot(last, bids, asks)
        except ValueError as e:
            raise BadEventError(str(e)) from None
        self._snapshots += 1
        if self._snapshots > 1:
            self.resyncs += 1
        self.synced, self.needs_snapshot, self._first = True, False, True
        pending = list(buf)
        buf.clear()
        for i, ev in enumerate(pending):
            if self._apply(ev, ev["U"], ev["u"], ev.get("pu")) is SyncResult.GAP:
                buf.extend(pending[i + 1:])
                return SyncResult.GAP
        return SyncResult.SNAPSHOT_APPLIED

    def _straddles(self, ev: dict, last: int) -> bool:
        # Binance: spot's first event has U <= lastUpdateId+1 <= u; USD-M's has
        # U <= lastUpdateId <= u. pu == lastUpdateId is also an exact fit: it
        # is the continuation rule applied to the snapshot.
        if self._usdm:
            return ev["U"] <= last <= ev["u"] or ev["pu"] == last
        return ev["U"] <= last + 1 <= ev["u"]

    def _buffer_event(self, event: dict, U: int, u: int, pu: int | None) -> SyncResult:
        buf = self._buffer
        if buf:
            prev = buf[-1]["u"]
            if u <= prev:
                return SyncResult.DROPPED_OLD
            # Same rules as for a synced book; a spot overlap (U <= prev) is fine.
            if (pu != prev) if self._usdm else (U > prev + 1):
                # Events before the break can never be completed: start over.
                self._note_gap(prev, U, u, pu)
                buf.clear()
                buf.append(event)
                return SyncResult.GAP
        buf.append(event)
        return SyncResult.BUFFERED

    def _apply(self, event: dict, U: int, u: int, pu: int | None) -> SyncResult:
        uid = self.book.update_id
        if self._usdm:
            if self._first:
                if u < uid:
                    return SyncResult.DROPPED_OLD
                ok = U <= uid or pu == uid
            else:
                if u <= uid:
                    return SyncResult.DROPPED_OLD
                ok = pu == uid
        else:
            if u <= uid:
                return SyncResult.DROPPED_OLD
            # U < uid+1 (overlap) is fine: levels carry absolute quantities as of u.
            ok = U <= uid + 1
        if not ok:
            self._lose_sync()
            self._note_gap(uid, U, u, pu)
            self._buffer.append(event)
            return SyncResult.GAP
        try:
            self.book.apply_diff(event["b"], event["a"], u)
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            self._fail(f"bad depth event U={U} u={u}: {e!r}")
        self._first = False
        self.events_applied += 1
        return SyncResult.APPLIED

    def _note_gap(self, prev: int, U: int, u: int, pu: int | None) -> None:
        self.gaps += 1
        self.last_gap = Gap(prev, U, u, pu)

    def _lose_sync(self) -> None:
        self.book.clear()
        self._buffer.clear()
        self.synced, self.needs_snapshot, self._first = False, True, True

    def _fail(self, msg: str):
        # The event's changes are lost, so a synced book can no longer be trusted.
        if self.synced:
            self._lose_sync()
        raise BadEventError(f"{self.book.symbol}: {msg}")

