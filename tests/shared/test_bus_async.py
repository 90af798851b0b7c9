"""AsyncClient: a DEALER with many requests in flight against a real ROUTER (shared.bus.Server)."""
import contextlib

import zmq

from shared import bus
from tests.conftest import free_port, wait_for

MS = 1_000_000


def _serve_one(server: bus.Server, answer=lambda p: b"re:" + p) -> bytes:
    env, payload = server.recv()
    server.reply(env, answer(payload))
    return payload


def _reply(client: bus.AsyncClient, what: str = "an answer"):
    got = []
    wait_for(lambda: got.append(client.recv()) or got[-1] is not None, 5.0, what)
    return got[-1]


@contextlib.contextmanager
def connected(timeout_ms: int, retries: int):
    """A Server on a free port and an AsyncClient connected to it; both closed after."""
    ep = f"tcp://127.0.0.1:{free_port()}"
    server = bus.Server(ep)
    client = bus.AsyncClient(ep, timeout_ms=timeout_ms, retries=retries)
    try:
        wait_for(lambda: client.sock.poll(0, zmq.POLLOUT), 5.0, "the connection")
        yield server, client
    finally:
        client.close()
        server.close()


def test_answers_are_matched_to_their_request_whatever_the_order():
    with connected(timeout_ms=5000, retries=2) as (server, client):
        client.send("a", b"1")
        client.send("b", b"2")
        assert client.in_flight("a") and len(client) == 2
        envs = []
        for _ in range(2):
            wait_for(lambda: server.sock.poll(0), 5.0, "a request")
            envs.append(server.recv())
        for env, payload in reversed(envs):  # answered in the other order
            server.reply(env, b"re:" + payload)
        got = {_reply(client), _reply(client)}
        assert got == {("a", b"re:1"), ("b", b"re:2")}
        assert len(client) == 0 and client.next_deadline() is None


def test_silence_resends_the_same_payload_then_gives_up_and_a_late_answer_is_dropped():
    with connected(timeout_ms=50, retries=2) as (server, client):
        t0 = 1_000 * MS
        client.send("x", b"order-x", now_ns=t0)
        wait_for(lambda: server.sock.poll(0), 5.0, "the first attempt")
        first_env, first = server.recv()
        assert client.expired(t0 + 10 * MS) == []  # not yet due
        assert client.expired(t0 + 60 * MS) == []  # due: resent, one attempt left
        assert client.stats["resent"] == 1
        wait_for(lambda: server.sock.poll(0), 5.0, "the second attempt")
        _, second = server.recv()
        assert first == second == b"order-x"
        assert client.expired(t0 + 200 * MS) == ["x"]  # both attempts unanswered
        assert not client.in_flight("x") and client.stats["expired"] == 1 and client.stats["resets"] == 1
        server.reply(first_env, b"late")  # to the old socket: it is gone, nothing can arrive
        assert client.recv() is None


def test_a_send_while_no_server_listens_is_not_queued_for_later():
    ep = f"tcp://127.0.0.1:{free_port()}"
    client = bus.AsyncClient(ep, timeout_ms=20, retries=1)
    server = None
    try:
        client.send("x", b"stale", now_ns=0)
        assert client.expired(100 * MS) == ["x"]
        server = bus.Server(ep)
        wait_for(lambda: client.sock.poll(0, zmq.POLLOUT), 5.0, "the connection")
        client.send("y", b"fresh")
        wait_for(lambda: server.sock.poll(0), 5.0, "the fresh request")
        assert _serve_one(server) == b"fresh"  # the given-up request never reached it
        assert _reply(client) == ("y", b"re:fresh")
        assert not server.sock.poll(50)
    finally:
        client.close()
        if server is not None:
            server.close()


def test_one_request_per_key():
    client = bus.AsyncClient(f"tcp://127.0.0.1:{free_port()}", timeout_ms=1000, retries=1)
    try:
        client.send("k", b"1")
        try:
            client.send("k", b"2")
        except ValueError as exc:
            assert "already in flight" in str(exc)
        else:
            raise AssertionError("a second request under one key was accepted")
    finally:
        client.close()


def test_an_answer_waiting_unread_past_its_deadline_is_read_not_given_up():
    with connected(timeout_ms=50, retries=1) as (server, client):
        t0 = 1_000 * MS
        client.send("x", b"order-x", now_ns=t0)
        client.send("y", b"order-y", now_ns=t0)
        wait_for(lambda: server.sock.poll(0), 5.0, "the request")
        assert _serve_one(server) == b"order-x"  # y stays unanswered
        assert client.sock.poll(5000), "the answer did not arrive"
        # the loop comes back late (60 ms > 50): an answer waits, so nobody is called silent yet
        assert client.expired(t0 + 60 * MS) == [] and client.stats["expired"] == 0
        assert client.recv() == ("x", b"re:order-x")
        assert client.expired(t0 + 60 * MS) == ["y"]  # the socket empty: y's silence is real


def test_a_peer_that_never_stops_sending_cannot_hold_a_request_forever():
    with connected(timeout_ms=50, retries=1) as (server, client):
        t0 = 1_000 * MS
        client.send("x", b"order-x", now_ns=t0)
        wait_for(lambda: server.sock.poll(0), 5.0, "the request")
        env, _ = server.recv()
        server.reply([env[0], b"\x00" * 8, b""], b"not an answer to x")  # always something unread
        assert client.sock.poll(5000), "the stray frame did not arrive"
        assert client.expired(t0 + 60 * MS) == []  # within the grace: it could be x's answer
        assert client.expired(t0 + 101 * MS) == ["x"]  # one timeout past the deadline: given up
