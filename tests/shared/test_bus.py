"""ZeroMQ helpers over real sockets: topics, sequence gaps, Lazy Pirate."""
import threading
import time

import zmq

from shared import bus, messages as m
from tests.conftest import free_port, wait_for


def _hb(n: int) -> m.Heartbeat:
    return m.Heartbeat(ts=n, service="t", pid=1, started_ts=0, status="ok")


def test_pub_sub_topics_and_sequence():
    ep = f"tcp://127.0.0.1:{free_port()}"
    pub = bus.Publisher(ep, 100_000)
    sub = bus.Subscriber(ep, ["heartbeat."], 100_000)
    try:
        # slow joiner: publish probes until the subscription is live (bounded)
        got = []

        def probe():
            pub.publish("heartbeat.t", _hb(0))
            try:
                got.append(sub.recv(zmq.NOBLOCK))
            except zmq.Again:
                return False
            return True
        wait_for(probe, 5, "subscription to connect")
        pub.publish("other.x", _hb(1))  # not subscribed: never seen, and not a gap
        pub.seqs["heartbeat.t"] += 5  # simulate five messages the subscriber missed
        pub.publish("heartbeat.t", _hb(2))
        topic, msg = sub.recv()
        while msg.ts == 0:  # probes still in flight when the first one arrived
            topic, msg = sub.recv()
        assert topic == "heartbeat.t" and msg.ts == 2
        assert sub.missed == 5
    finally:
        sub.close(), pub.close()


def test_lazy_pirate_retries_with_same_payload_then_gives_up():
    ep = f"tcp://127.0.0.1:{free_port()}"
    server = bus.Server(ep)
    seen = []
    stop = threading.Event()

    def serve():
        poller = zmq.Poller()
        poller.register(server.sock, zmq.POLLIN)
        while not stop.is_set():
            if poller.poll(20):
                env, payload = server.recv()
                seen.append(payload)
                if len(seen) >= 2:  # ignore the first attempt, answer the retry
                    server.reply(env, b"pong:" + payload)
    t = threading.Thread(target=serve)
    t.start()
    client = bus.LazyPirateClient(ep, timeout_ms=200, retries=3)
    try:
        assert client.request(b"ping") == b"pong:ping"
        assert seen == [b"ping", b"ping"] and client.timeouts == 1
    finally:
        stop.set(), t.join(5), client.close(), server.close()


def test_lazy_pirate_fails_closed_when_nobody_answers():
    client = bus.LazyPirateClient(f"tcp://127.0.0.1:{free_port()}", timeout_ms=50, retries=2)
    start = time.monotonic()
    try:
        client.request(b"x")
    except bus.NoReply as exc:
        assert "2 attempt" in str(exc)
    else:
        raise AssertionError("expected NoReply")
    finally:
        client.close()
    assert time.monotonic() - start < 2.0
