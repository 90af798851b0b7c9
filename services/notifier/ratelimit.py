"""Telegram's flood limits as data: when may the next message to a chat go. Pure; time is an argument.

Telegram's published limits for a bot (core.telegram.org/bots/faq, "My bot is hitting
limits"): about one message per second to a chat, at most 20 messages a minute to a
group, about 30 messages a second in all. Beyond them it answers 429 with
`parameters.retry_after` (seconds), which `hold` honours for the chat it was about, and
`hold_all` stands for a server that cannot take anything now (a timeout, a 5xx)."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Generic, Iterable, TypeVar

NS = 1_000_000_000
CHAT_GAP_NS = 1 * NS  # one message a second to one chat
GROUP_PER_MIN = 20  # a group (negative chat id) takes at most 20 a minute
GLOBAL_PER_S = 30  # the whole bot, across chats

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Head(Generic[T]):
    """The oldest message waiting for `chat` (`item` is the caller's), not to go before `not_before`."""
    chat: int
    item: T
    not_before: int = 0


class ChatLimits:
    """Per-chat spacing, per-group minute budget, a global budget and holds (429 or an outage).

    Use: `choose(heads, now)` → the message to send now (or None and when to look again);
    after Telegram accepted it, `sent(chat, now)`; on 429, `hold(chat, now + retry_after)`."""

    def __init__(self) -> None:
        self.last: dict[int, int] = {}  # chat -> when its last message went
        self.minute: dict[int, deque[int]] = {}  # group chat -> its sends in the last minute
        self.second: deque[int] = deque()  # every send in the last second
        self.held: dict[int, int] = {}  # chat -> not before (a 429's retry_after)
        self.held_all = 0  # no chat before this (the server failed)

    def ready_at(self, chat: int, now: int) -> int:
        """The earliest time (ns, >= now) a message to `chat` may go."""
        at = max(now, self.held_all, self.held.get(chat, 0))
        last = self.last.get(chat)
        if last is not None:
            at = max(at, last + CHAT_GAP_NS)
        sends = self.minute.get(chat)
        if chat < 0 and sends is not None and len(sends) >= GROUP_PER_MIN:
            at = max(at, sends[-GROUP_PER_MIN] + 60 * NS)
        if len(self.second) >= GLOBAL_PER_S:
            at = max(at, self.second[-GLOBAL_PER_S] + NS)
        return at

    def choose(self, heads: Iterable[Head[T]], now: int) -> tuple[Head[T] | None, int | None]:
        """The head that may go now (the longest-waiting chat first: the smallest ready time),
        else None and the time the first becomes ready (None: nothing waits)."""
        best, best_at = None, None
        for h in heads:
            at = max(self.ready_at(h.chat, now), h.not_before)
            if best_at is None or at < best_at:
                best, best_at = h, at
        if best is None:
            return None, None
        return (best, best_at) if best_at <= now else (None, best_at)

    def sent(self, chat: int, now: int) -> None:
        """A message to `chat` was accepted at `now`."""
        self.last[chat] = now
        self.held.pop(chat, None)
        self.second.append(now)
        while self.second and self.second[0] <= now - NS:
            self.second.popleft()
        if chat < 0:
            sends = self.minute.setdefault(chat, deque())
            sends.append(now)
            while sends and sends[0] <= now - 60 * NS:
                sends.popleft()

    def hold(self, chat: int, until: int) -> None:
        """Nothing to `chat` before `until` (a 429's retry_after)."""
        self.held[chat] = max(self.held.get(chat, 0), until)

    def hold_all(self, until: int) -> None:
        """Nothing to anyone before `until` (the server timed out or failed)."""
        self.held_all = max(self.held_all, until)
