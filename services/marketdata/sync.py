"""Binance's "manage a local order book correctly" procedure as a pure state machine."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import Enum

from services.marketdata.book import OrderBook

# How far one event may move a symbol's update id past the id before it (the book's, or the
# buffered event's before it). Spot ids count one symbol's updates, each event holding all of a
# 100 ms batch: 1,466 at most in the BTCUSDT capture of tests/data (median 28). USD-M ids are
# shared far wider: u - pu reaches 794,496 there (median 2,275). A corrupted digit high up jumps
# ~1e8 (spot, 11 digits) or ~1e10 (USD-M, 13): refused before it can become the book's id, where
# it would make every true event after it look old (issue #11: a book stuck for good).
MAX_ID_JUMP = {"spot": 10 ** 7, "usdm": 10 ** 10}
BEHIND_LIMIT = 2  # events in a row older than the book (or buffer): the book took a lie, not them


class Market(str, Enum):
    """Which Binance market a stream comes from: their sequencing rules differ."""

    SPOT = "spot"  # each event's U == previous u + 1
    USDM = "usdm"  # each event's pu == previous u (ids are not contiguous)


class SyncResult(str, Enum):
    """What BookSync did with an input; the shell acts on GAP and SNAPSHOT_TOO_OLD, counts SUSPECT."""

    APPLIED = "applied"  # event applied, book current
    BUFFERED = "buffered"  # waiting for a snapshot
    DROPPED_OLD = "dropped_old"  # event older than the book: nothing to do
    GAP = "gap"  # chain broken: book/buffer discarded, event buffered, snapshot needed
    SNAPSHOT_APPLIED = "snapshot_applied"  # book rebuilt and synced
    SNAPSHOT_TOO_OLD = "snapshot_too_old"  # snapshot cannot be lined up with events: fetch another
    SNAPSHOT_IGNORED = "snapshot_ignored"  # already synced: the snapshot is not needed
    SUSPECT = "suspect"  # ids jump implausibly far: refused, book and buffer kept as they were


class BadEventError(ValueError):
    """A depth event or snapshot is malformed. The shell logs it, counts it and goes on;
    BookSync has already dropped its sync (the event's changes are lost) if it was synced."""


@dataclass(frozen=True, slots=True)
class Gap:
    """Where the update-id chain broke: the last id we had and the event that did not follow
    (`last_u < prev_u`: the stream is behind the book, which had taken an event it never sent)."""

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
    applied after the first one), suspects (events refused for an implausible
    id jump). last_gap describes the latest break.

    Beyond Binance's procedure, a stream that lies (a corrupted digit in U/u/pu) must cost
    one resync, never a book stuck behind an id it will not see again: an event jumping
    more than MAX_ID_JUMP ahead is refused (SUSPECT); after its first event a synced spot
    book takes only U == previous u + 1 (Binance's rule; an overlap can only be a lie or a
    replay); and BEHIND_LIMIT events in a row older than the book mean the book is the
    liar: it is discarded (GAP) and resynced from them (as are BEHIND_LIMIT events in a row
    too far ahead of it: then the book, not they, is wrong).
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
        self.suspects = 0
        self.last_gap: Gap | None = None
        # Oldest events fall out first when the snapshot is late: a snapshot
        # older than what is left is then refused and fetched again.
        self._buffer: deque[dict] = deque(maxlen=max_buffer)
        self._first = True  # the next applied event must straddle the snapshot
        self._snapshots = 0
        self._usdm = self.market is Market.USDM
        self._max_jump = MAX_ID_JUMP[self.market.value]
        self._behind = 0  # events in a row older than the book / the buffer's last
        self._ahead = 0  # events in a row refused as too far ahead of it

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
        ref = self.book.update_id if self.synced else self._buffer[-1]["u"] if self._buffer else None
        # (The first event after a snapshot that does not even straddle it is a plain gap.)
        if ref is not None and u - ref > self._max_jump and \
                not (self._first and self.synced and not self._straddles(event, ref)):
            self._ahead += 1
            if self._ahead < BEHIND_LIMIT:
                # If it was a true event garbled on the way, the next one shows the gap.
                self.suspects += 1
                return SyncResult.SUSPECT
            # Twice in a row: the stream is right and our reference is not; the chain rules
            # below make that a gap.
        self._ahead = 0
        if not self.synced:
            return self._buffer_event(event, U, u, pu)
        return self._apply(event, U, u, pu)

    def discard(self) -> None:
        """Drop the book and every buffered event and wait for a new snapshot: the shell's
        last resort when no book has come for too long (a buffer it cannot trust)."""
        self._lose_sync()

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
        self.synced, self.needs_snapshot, self._first, self._behind = True, False, True, 0
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
                self._behind += 1
                if self._behind < BEHIND_LIMIT:
                    return SyncResult.DROPPED_OLD
                # The stream has moved on below the buffer's last event: that one was the lie.
                return self._restart_buffer(event, prev, U, u, pu)
            self._behind = 0
            # Same rules as for a synced book.
            if (pu != prev) if self._usdm else (U > prev + 1):
                # Events before the break can never be completed: start over.
                return self._restart_buffer(event, prev, U, u, pu)
            if not self._usdm and U <= prev:
                # A spot overlap: harmless if true (levels are absolute as of u), but a synced
                # book refuses it, so the buffer starts over from it rather than keep an event
                # the book could not take after it.
                buf.clear()
        self._behind = 0
        buf.append(event)
        return SyncResult.BUFFERED

    def _restart_buffer(self, event: dict, prev: int, U: int, u: int, pu: int | None) -> SyncResult:
        self._note_gap(prev, U, u, pu)
        self._behind = 0
        self._buffer.clear()
        self._buffer.append(event)
        return SyncResult.GAP

    def _apply(self, event: dict, U: int, u: int, pu: int | None) -> SyncResult:
        uid = self.book.update_id
        if u < uid or (u == uid and not (self._usdm and self._first)):
            if self._first:
                return SyncResult.DROPPED_OLD  # older than the snapshot: nothing to do
            self._behind += 1
            if self._behind < BEHIND_LIMIT:
                return SyncResult.DROPPED_OLD  # a stray repeat changes nothing
            ok = False  # the stream is behind the book: the book took an event never sent
        elif self._usdm:
            ok = (U <= uid or pu == uid) if self._first else pu == uid
        else:
            # The first event straddles the snapshot; after it, Binance's rule: U == prev u + 1.
            ok = U <= uid + 1 if self._first else U == uid + 1
        if not ok:
            self._lose_sync()
            self._note_gap(uid, U, u, pu)
            self._buffer.append(event)
            return SyncResult.GAP
        try:
            self.book.apply_diff(event["b"], event["a"], u)
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            self._fail(f"bad depth event U={U} u={u}: {e!r}")
        self._first, self._behind = False, 0
        self.events_applied += 1
        return SyncResult.APPLIED

    def _note_gap(self, prev: int, U: int, u: int, pu: int | None) -> None:
        self.gaps += 1
        self.last_gap = Gap(prev, U, u, pu)

    def _lose_sync(self) -> None:
        self.book.clear()
        self._buffer.clear()
        self.synced, self.needs_snapshot, self._first, self._behind = False, True, True, 0

    def _fail(self, msg: str):
        # The event's changes are lost, so a synced book can no longer be trusted.
        if self.synced:
            self._lose_sync()
        raise BadEventError(f"{self.book.symbol}: {msg}")

