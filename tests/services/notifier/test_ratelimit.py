"""Telegram's limits as the notifier keeps them: 1 message/s per chat, 20/min per group, holds for 429."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from services.notifier.ratelimit import CHAT_GAP_NS, GLOBAL_PER_S, GROUP_PER_MIN, ChatLimits, Head

NS = 1_000_000_000


def test_one_message_a_second_to_a_chat_and_twenty_a_minute_to_a_group():
    lim, t = ChatLimits(), 0
    assert lim.ready_at(42, t) == t
    lim.sent(42, t)
    assert lim.ready_at(42, t) == CHAT_GAP_NS and lim.ready_at(43, t) == t  # chats are apart
    for i in range(GROUP_PER_MIN):
        lim.sent(-100, i * NS)
    assert lim.ready_at(-100, 20 * NS) == 60 * NS  # the 21st waits for the first to leave the minute
    for i in range(25):  # a private chat has no minute budget
        lim.sent(7, i * NS)
    assert lim.ready_at(7, 25 * NS) == 25 * NS


def test_retry_after_holds_its_chat_and_an_outage_holds_all():
    lim = ChatLimits()
    lim.hold(42, 5 * NS)
    assert lim.ready_at(42, 0) == 5 * NS and lim.ready_at(43, 0) == 0
    lim.hold_all(3 * NS)
    assert lim.ready_at(43, 0) == 3 * NS and lim.ready_at(42, 0) == 5 * NS


def test_choose_takes_the_chat_ready_first_or_says_when():
    lim = ChatLimits()
    lim.sent(1, 0)
    heads = [Head(1, "a"), Head(2, "b", not_before=NS // 2)]
    assert lim.choose(heads, 0) == (None, NS // 2)
    head, _ = lim.choose(heads, NS // 2)
    assert head.item == "b"
    assert lim.choose([], 0) == (None, None)


@settings(max_examples=150, deadline=None)
@given(chats=st.lists(st.sampled_from([11, 12, -100, -200]), min_size=1, max_size=120),
       delays=st.lists(st.integers(0, 3 * NS), min_size=120, max_size=120),
       holds=st.lists(st.tuples(st.integers(0, 119), st.integers(0, 5)), max_size=5))
def test_sends_at_ready_times_never_break_a_limit(chats, delays, holds):
    """A sender that always waits until ready_at (and honours 429 holds) never puts two messages to
    one chat within a second, more than 20 to a group within a minute, more than 30 in a second in
    all, nor a message to a held chat before its retry_after is over."""
    lim, now = ChatLimits(), 0
    sent: list[tuple[int, int]] = []
    held: dict[int, int] = {}
    holds = dict(holds)
    for i, chat in enumerate(chats):
        now += delays[i]
        at = lim.ready_at(chat, now)
        assert at >= now
        if i in holds:  # a 429 instead of a send: the chat waits retry_after seconds
            held[chat] = at + holds[i] * NS
            lim.hold(chat, held[chat])
            continue
        assert at >= held.get(chat, 0)
        now = at
        lim.sent(chat, now)
        sent.append((chat, now))
    for chat in set(c for c, _ in sent):
        times = [t for c, t in sent if c == chat]
        assert all(b - a >= CHAT_GAP_NS for a, b in zip(times, times[1:]))
        if chat < 0:
            assert all(times[i + GROUP_PER_MIN] - times[i] >= 60 * NS for i in range(len(times) - GROUP_PER_MIN))
    every = sorted(t for _, t in sent)
    assert all(every[i + GLOBAL_PER_S] - every[i] >= NS for i in range(len(every) - GLOBAL_PER_S))
