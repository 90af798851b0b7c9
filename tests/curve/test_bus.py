"""shared/bus.py's helpers with CURVE: a PUB heard by listed keys only, a ROUTER naming its peers, IPv6 endpoints."""
from __future__ import annotations

import dataclasses
import socket

import pytest
import zmq

from shared import config as qfconfig
from shared import curve, messages
from shared.bus import LazyPirateClient, NoReply, Publisher, Server, Subscriber, connect
from shared.messages import Heartbeat
from tests.conftest import free_port, ipc_env, tcp_env, wait_for


@pytest.fixture
def ctx():
    context = zmq.Context()
    try:
        yield context
    finally:
        curve.stop_gate(context)
        context.destroy(linger=0)


def identities(tmp_path, transport: str) -> tuple[qfconfig.Config, dict[str, curve.Curve]]:
    keys = tmp_path / "keys"
    curve.make_keys(keys)
    cfg = qfconfig.load((tcp_env if transport == "tcp" else ipc_env)(tmp_path, QF_CURVE_KEYS=str(keys)))
    return cfg, {party: curve.load(cfg, party) for party in curve.PARTIES}


def impostor(of: curve.Curve) -> curve.Curve:
    """`of` with a key pair of its own: it knows the servers' public keys, not the secret it claims."""
    public, secret = zmq.curve_keypair()
    return dataclasses.replace(of, public=public, secret=secret)


@pytest.mark.parametrize("transport", ["tcp", "ipc"])
def test_a_pub_is_heard_by_its_listed_subscribers_only(tmp_path, ctx, transport):
    cfg, ids = identities(tmp_path, transport)
    md = Publisher(cfg.bus.md_pub, 1000, ctx, ids["marketdata"])
    risk = Publisher(cfg.bus.risk_pub, 1000, ctx, ids["risk"])
    listed = [Subscriber(cfg.bus.md_pub, ["heartbeat."], 1000, ctx, ids["strategy"]),
              Subscriber(cfg.bus.risk_pub, ["heartbeat."], 1000, ctx, ids["notifier"])]
    strangers = [Subscriber(cfg.bus.md_pub, ["heartbeat."], 1000, ctx, impostor(ids["strategy"])),
                 Subscriber(cfg.bus.md_pub, ["heartbeat."], 1000, ctx),  # no CURVE at all
                 # the broker reads market data, not risk's states: listed on the one PUB, not the other
                 Subscriber(cfg.bus.risk_pub, ["heartbeat."], 1000, ctx, ids["broker"])]
    beat = Heartbeat(ts=1, service="x", pid=1, started_ts=1, status="ok")

    def publish() -> None:
        md.publish("heartbeat.marketdata", beat)
        risk.publish("heartbeat.risk", beat)
    try:
        for sub in listed:
            def heard(sub=sub):
                publish()
                return sub.sock.poll(20) and sub.recv()[1]
            assert wait_for(heard, 10, f"a listed subscriber to hear {sub.endpoint}").service == "x"
        for _ in range(20):  # published while the strangers had every chance to be connected
            publish()
        assert all(not s.sock.poll(300) for s in strangers)
        assert curve.gate(ctx).refused >= 2  # the impostor's and the broker's (a plain client never reaches ZAP)
    finally:
        for s in (md, risk, *listed, *strangers):
            s.close()


def test_a_router_names_each_request_by_its_party(tmp_path, ctx):
    cfg, ids = identities(tmp_path, "tcp")
    server = Server(cfg.bus.risk_rep, ctx, ids["risk"])
    assert server.peer is None
    seen = []
    try:
        for party in ("strategy", "api"):
            client = ctx.socket(zmq.REQ)
            connect(client, cfg.bus.risk_rep, ids[party])
            ask = messages.encode(messages.Control(ts=1, action="STATE", by=party))
            client.send(ask)
            assert server.sock.poll(5000)
            envelope, payload = server.recv()
            seen.append(server.peer)
            assert payload == ask
            server.reply(envelope, b"ok")
            assert client.poll(5000) and client.recv() == b"ok"
            client.close(linger=0)
        assert seen == ["strategy", "api"]
        stranger = LazyPirateClient(cfg.bus.risk_rep, 300, 2, ctx, impostor(ids["api"]))
        with pytest.raises(NoReply):
            stranger.request(b"x")
        assert not server.sock.poll(0)
    finally:
        server.close()


def test_a_party_cannot_bind_anothers_socket_nor_an_endpoint_outside_the_bus(tmp_path, ctx):
    cfg, ids = identities(tmp_path, "tcp")
    with pytest.raises(curve.ConfigError, match="strategy cannot bind .*the broker's socket"):
        Server(cfg.bus.broker_rep, ctx, ids["strategy"])
    with pytest.raises(curve.ConfigError, match="none of the bus endpoints"):
        Subscriber(f"tcp://127.0.0.1:{free_port()}", [""], 1000, ctx, ids["api"])


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def _heard(pub: Publisher, sub: Subscriber, what: str) -> None:
    """Publish a heartbeat until `sub` has one waiting (a SUB misses what precedes its joining); bounded."""
    beat = Heartbeat(ts=1, service="x", pid=1, started_ts=1, status="ok")

    def heard():
        pub.publish("heartbeat.x", beat)
        return sub.sock.poll(20)
    wait_for(heard, 10, what)


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback in this environment")
def test_an_ipv6_endpoint_turns_the_sockets_ipv6_option_on(ctx):
    """Fly's private network is IPv6 only: `tcp://[::]:PORT` binds there (fly.multi.toml)."""
    port = free_port()
    pub = Publisher(f"tcp://[::]:{port}", 1000, ctx)
    sub = Subscriber(f"tcp://[::1]:{port}", [""], 1000, ctx)
    try:
        assert pub.sock.getsockopt(zmq.IPV6) == 1 and sub.sock.getsockopt(zmq.IPV6) == 1
        _heard(pub, sub, "a subscriber over IPv6")
    finally:
        pub.close()
        sub.close()
    plain = Subscriber(f"tcp://127.0.0.1:{port}", [""], 1000, ctx)
    assert plain.sock.getsockopt(zmq.IPV6) == 0
    plain.close()


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback in this environment")
def test_a_fly_private_name_is_bound_as_every_ipv6_address(ctx):
    """fly.multi.toml gives both ends one endpoint: `<group>.process.<app>.internal` is what the
    others resolve, and what the group's own machine binds as [::] (ZeroMQ binds no DNS name)."""
    port = free_port()
    pub = Publisher(f"tcp://broker.process.quantumflow-multi.internal:{port}", 1000, ctx)
    sub = Subscriber(f"tcp://[::1]:{port}", [""], 1000, ctx)
    try:
        assert pub.sock.getsockopt(zmq.LAST_ENDPOINT).decode() == f"tcp://[::]:{port}"
        _heard(pub, sub, "a subscriber of the name-bound PUB")
    finally:
        pub.close()
        sub.close()
