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


def sent(link: BrokerLink, payload: bytes, got: list) -> None:
    """Send once the link is connected (IMMEDIATE refuses a send before)."""
    wait_for(lambda: link.send(payload, got.append), WAIT_S, "the link to connect")


def test_an_answer_waiting_at_the_deadline_is_delivered_not_timed_out(router):
    # timeout 0: every request is past its deadline by the time expire() looks at it
    link = BrokerLink(router.getsockopt_string(zmq.LAST_ENDPOINT), timeout_ms=0)
    got: list = []
    try:
        sent(link, b"order", got)
        assert router.poll(int(WAIT_S * 1000)), "the request did not reach the router"
        ident, reqid, empty, payload = recv_frames(router)
        assert payload == b"order"
        send_frames(router, (ident, reqid, empty, b"ack"))
        assert link.sock.poll(int(WAIT_S * 1000)), "the answer did not reach the link"
        assert link.expire() == 0
        assert got == [b"ack"]
        assert link.stats["timeouts"] == 0 and not link.pending
    finally:
        link.sock.close(0)


def test_a_request_nobody_answers_times_out_once(router):
    link = BrokerLink(router.getsockopt_string(zmq.LAST_ENDPOINT), timeout_ms=0)
    got: list = []
    try:
        sent(link, b"order", got)
        assert router.poll(int(WAIT_S * 1000)), "the request did not reach the router"
        ident, reqid, empty, _ = recv_frames(router)
        assert link.expire() == 1
        assert got == [None] and link.stats["timeouts"] == 1
        assert link.expire() == 0 and got == [None]
    finally:
        link.sock.close(0)
