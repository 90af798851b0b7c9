"""The notifier's core: bus events and the time in, messages for a person out. No I/O, no clock.

What is worth a message, and when:
- fills: one message per symbol per burst. The first fill of a symbol opens a window of
  `batch_ns`; every fill of that symbol until it closes goes into the same message (a
  market order walking five levels is one message, not five);
- risk's trading state: one message per change of state or reason (risk repeats
  `risk.state` with every heartbeat); the first state heard is news only when it is not
  ACTIVE, and the last one told is remembered across restarts (`take_memory`);
- alerts: each `alert.*` as it comes (shared/alerts.py already sends a condition once,
  reminds at most every 5 minutes and says when it is resolved);
- services: a heartbeat from another process (pid or `started_ts` changed) is a restart;
  no heartbeat for `gap_ns` is a silence, told once, and its end too. A process that
  started within STACK_START_NS of the notifier itself is the stack starting together
  (`qf up`, `docker compose up`), not news;
- market data: a symbol without a book for `md_grace_ns` (a reconnect that takes a second
  is no news), then its return; a replay's end.

Use: `on_event(topic, msg, now)` for each event, `poll(now)` at least by `next_deadline()`,
then `take_messages()`; `take_memory()` hands what must survive a restart to the shell
when it changed, and `Core(memory=...)` takes it back."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from services.notifier import text
from shared.enums import TradingState
from shared.messages import Alert, Fill, Heartbeat, MdStatus, Message, RiskState

NS = 1_000_000_000
MD_GRACE_NS = 30 * NS  # a symbol's book may be away this long before anyone is told
GAP_MIN_NS = 10 * NS  # silence for at least this long (and 5 heartbeats) before it is told
MAX_BATCH = 500  # a burst this big goes out at once, without waiting for its window
SEEN_FILLS = 4096  # fill ids remembered, so a fill heard twice is told once
MAX_SERVICES = 64  # services (heartbeat names) kept track of: names come from the bus
STACK_START_NS = 60 * NS  # services started this close to the notifier started with it
REPLAY_ENDS = ("REPLAY_DONE", "REPLAY_FAILED")  # a replay that ended: told once, never "not synced"


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message for every configured chat. `kind` names it in logs (fills, state, alert,
    restart, silent, back, feed, replay, report, hello); `photo` is a PNG (sent with
    `text` as its caption)."""
    kind: str
    text: str
    photo: bytes | None = None


@dataclass(slots=True)
class _Batch:
    opened: int
    fills: list[Fill] = field(default_factory=list)


@dataclass(slots=True)
class _Service:
    pid: int
    started_ts: int
    last_ns: int | None = None  # when we last heard it (our clock); None: not since we started
    silent_since: int | None = None  # last_ns of a silence we told of


@dataclass(slots=True)
class _Feed:
    state: str
    detail: str
    since: int
    told: bool = False


def gap_for(heartbeat_ms: int) -> int:
    """How long a service may be silent before it is told: five heartbeats, at least 10 s."""
    return max(GAP_MIN_NS, 5 * heartbeat_ms * 1_000_000)


class NotifierCore:
    def __init__(self, batch_ns: int, gap_ns: int = GAP_MIN_NS, md_grace_ns: int = MD_GRACE_NS,
                 memory: dict | None = None, started_ns: int | None = None) -> None:
        """`memory`: what `take_memory` gave before a restart; `started_ns`: when the notifier
        started (a service that started within STACK_START_NS of it started with it)."""
        self.batch_ns, self.gap_ns, self.md_grace_ns = batch_ns, gap_ns, md_grace_ns
        self.started_ns = started_ns
        self._out: list[Outgoing] = []
        self._batches: dict[str, _Batch] = {}
        self._seen: set[str] = set()
        self._seen_order: deque[str] = deque()
        self._feeds: dict[str, _Feed] = {}
        self.state: TradingState | None = None
        self.reason = ""
        self.services: dict[str, _Service] = {}
        self._changed = False
        self._restore(memory or {})

    # -- in ---------------------------------------------------------------------------

    def on_event(self, topic: str, msg: Message, now: int) -> None:
        """One bus event, heard at `now` (ns). Events of other types are ignored."""
        if isinstance(msg, Fill):
            self._on_fill(msg, now)
        elif isinstance(msg, RiskState):
            self._on_state(msg)
        elif isinstance(msg, Alert):
            self._emit("alert", text.alert_text(msg))
        elif isinstance(msg, Heartbeat):
            self._on_heartbeat(msg, now)
        elif isinstance(msg, MdStatus):
            self._on_feed(msg, now)

    def poll(self, now: int) -> None:
        """Close the fill windows, and tell the silences and feed outages, due by `now`."""
        for symbol, batch in list(self._batches.items()):
            if now >= batch.opened + self.batch_ns:
                self._flush(symbol)
        for name, s in self.services.items():
            if s.last_ns is not None and s.silent_since is None and now - s.last_ns >= self.gap_ns:
                s.silent_since = s.last_ns
                self._emit("silent", text.silent_text(name, (now - s.last_ns) / NS, s.last_ns))
        for symbol, f in self._feeds.items():
            if not f.told and now - f.since >= self.md_grace_ns:
                f.told = True
                self._emit("feed", text.feed_down_text(symbol, f.state, f.detail, (now - f.since) / NS))

    def next_deadline(self) -> int | None:
        """The earliest time `poll` has work (None: none waits)."""
        times = [b.opened + self.batch_ns for b in self._batches.values()]
        times += [s.last_ns + self.gap_ns for s in self.services.values()
                  if s.last_ns is not None and s.silent_since is None]
        times += [f.since + self.md_grace_ns for f in self._feeds.values() if not f.told]
        return min(times, default=None)

    # -- out --------------------------------------------------------------------------

    def take_messages(self) -> list[Outgoing]:
        """The messages made since the last call, oldest first (call after on_event/poll)."""
        out, self._out = self._out, []
        return out

    def take_memory(self) -> dict | None:
        """What must outlive a restart (the last state told, each service's process), when it
        changed since the last call; else None. JSON-able."""
        if not self._changed:
            return None
        self._changed = False
        return {"state": self.state.value if self.state else None, "reason": self.reason,
                "services": {n: [s.pid, s.started_ts] for n, s in self.services.items()}}

    def _restore(self, memory: dict) -> None:
        try:
            self.state = TradingState(memory["state"]) if memory.get("state") else None
            self.reason = str(memory.get("reason") or "")
            for name, (pid, started) in dict(memory.get("services") or {}).items():
                self.services[str(name)] = _Service(int(pid), int(started))
        except (TypeError, ValueError, KeyError):  # a memory from another version: start without it
            self.state, self.reason, self.services = None, "", {}

    def _emit(self, kind: str, body: str) -> None:
        self._out.append(Outgoing(kind, text.clip(body)))

    # -- fills ------------------------------------------------------------------------

    def _on_fill(self, fill: Fill, now: int) -> None:
        if fill.fill_id in self._seen:
            return
        self._seen.add(fill.fill_id)
        self._seen_order.append(fill.fill_id)
        if len(self._seen_order) > SEEN_FILLS:
            self._seen.discard(self._seen_order.popleft())
        batch = self._batches.get(fill.symbol)
        if batch is None:
            batch = self._batches[fill.symbol] = _Batch(now)
        batch.fills.append(fill)
        if self.batch_ns <= 0 or len(batch.fills) >= MAX_BATCH:
            self._flush(fill.symbol)

    def _flush(self, symbol: str) -> None:
        batch = self._batches.pop(symbol)
        self._emit("fills", text.fills_text(symbol, batch.fills))

    # -- the trading state ----------------------------------------------------------------

    def _on_state(self, msg: RiskState) -> None:
        reason = msg.reason.strip()
        if msg.state is self.state and reason == self.reason:
            return
        previous, self.state, self.reason, self._changed = self.state, msg.state, reason, True
        if previous is None and msg.state is TradingState.ACTIVE:
            return  # the first state heard, and the usual one: no news
        self._emit("state", text.state_text(msg, previous))

    # -- services -----------------------------------------------------------------------

    def _on_heartbeat(self, hb: Heartbeat, now: int) -> None:
        s = self.services.get(hb.service)
        if s is None:
            if len(self.services) >= MAX_SERVICES:
                return
            self.services[hb.service] = _Service(hb.pid, hb.started_ts, now)
            self._changed = True
            return
        silent_s = (now - s.silent_since) / NS if s.silent_since is not None else None
        if (hb.pid, hb.started_ts) != (s.pid, s.started_ts):
            together = (s.last_ns is None and self.started_ns is not None
                        and abs(hb.started_ts - self.started_ns) <= STACK_START_NS)
            if not together:
                self._emit("restart", text.restart_text(hb.service, s.pid, hb.pid, hb.started_ts, silent_s))
            s.pid, s.started_ts, self._changed = hb.pid, hb.started_ts, True
        elif silent_s is not None:
            self._emit("back", text.back_text(hb.service, silent_s))
        s.last_ns, s.silent_since = now, None

    # -- market data ----------------------------------------------------------------------

    def _on_feed(self, msg: MdStatus, now: int) -> None:
        f = self._feeds.get(msg.symbol)
        done = f is not None and f.state in REPLAY_ENDS
        if msg.state == "SYNCED":
            if f is not None:
                del self._feeds[msg.symbol]
                if f.told and not done:
                    self._emit("feed", text.feed_back_text(msg.symbol, (now - f.since) / NS))
        elif msg.state in REPLAY_ENDS:  # repeated with every heartbeat: told once
            if not done:
                self._feeds[msg.symbol] = _Feed(msg.state, "", now, told=True)
                self._emit("replay", text.replay_done_text(msg.symbol) if msg.state == "REPLAY_DONE"
                           else text.replay_failed_text(msg.symbol, msg.detail))
        elif f is None or done:
            if len(self._feeds) < MAX_SERVICES * 4 or f is not None:
                self._feeds[msg.symbol] = _Feed(msg.state, msg.detail, now)
        else:
            f.state, f.detail = msg.state, msg.detail
