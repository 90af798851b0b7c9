"""Risk's BrokerLink over a real ROUTER on loopback: an answer already waiting in the socket when
its deadline passes (risk held up by a slow disk or a busy machine) is delivered, not called a
silence; a request nobody answers still times out, once."""
from __future__ import annotations

import pytest
import zmq

from services.risk.link import BrokerLink
from shared.bus import recv_frames, send_frames
from tests.conftest import wait_for

WAIT_S = 5.0


@pytest.fixture
def router():
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind("tcp://127.0.0.1:*")  # the port chosen as bound
    try:
        yield sock
    finally:
        sock.close(0)


@pytest.fixture
def link(router):
    """A BrokerLink to `router` with timeout 0 (every request is past its deadline by the time
    expire() looks at it), connected (IMMEDIATE refuses a send before)."""
    link = BrokerLink(router.getsockopt_string(zmq.LAST_ENDPOINT), timeout_ms=0)
    try:
        yield link
    finally:
        link.sock.close(0)


def requested(link: BrokerLink, router: zmq.Socket, got: list) -> list:
    """Send one order through `link`; the frames the router read of it."""
    wait_for(lambda: link.send(b"order", got.append), WAIT_S, "the link to connect")
    assert router.poll(int(WAIT_S * 1000)), "the request did not reach the router"
    frames = recv_frames(router)
    assert frames[-1] == b"order"
    return frames


def test_an_answer_waiting_at_the_deadline_is_delivered_not_timed_out(link, router):
    got: list = []
    ident, reqid, empty, _ = requested(link, router, got)
    send_frames(router, (ident, reqid, empty, b"ack"))
    assert link.sock.poll(int(WAIT_S * 1000)), "the answer did not reach the link"
    assert link.expire() == 0
    assert got == [b"ack"]
    assert link.stats["timeouts"] == 0 and not link.pending


def test_a_request_nobody_answers_times_out_once(link, router):
    got: list = []
    requested(link, router, got)
    assert link.expire() == 1
    assert got == [None] and link.stats["timeouts"] == 1
    assert link.expire() == 0 and got == [None]
