"""docker-compose.hosts.yml: every service as on a host of its own, CURVE on, trades end to end; the strategy reaches the broker's port but cannot order there."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from shared import curve
from tests.conftest import free_port
from tests.docker.base_image import ROOT, docker
from tests.docker.image import build_images
from tests.docker.stack import (APP_SERVICES, COMPOSE_FILES, TEST_OVERRIDE, ComposeStack, docker_unavailable, leftovers,
                                sweep_stale_projects, wait_until)
from tests.test_compose import CONNECT, api, explained, filled, results

# One stack start for the whole file (the suite's container budget); the last test takes it down.
pytestmark = [pytest.mark.docker, pytest.mark.timeout(900)]  # the first run may build the image

HOSTS_OVERRIDE = ROOT / "docker-compose.hosts.yml"
IMAGE_UID = 10001  # the image's `qf` user (Dockerfile): it must read its own secret key
STACK_BUDGET_S = 90  # up, healthy and trading

# Run inside a container: one order on the broker's ROUTER, as the container's own party (its
# secret key under /keys) or without CURVE. Prints "NO_REPLY" or the answer's type.
ORDER = """
import json, sys, time
from decimal import Decimal
import zmq
from shared import messages
from shared.curve import public_path, read_key_file, secret_path
from shared.enums import OrderKind, Side
endpoint, party, cid = sys.argv[1:4]
sock = zmq.Context.instance().socket(zmq.REQ)
sock.setsockopt(zmq.LINGER, 0)
if party != "none":
    sock.curve_publickey, sock.curve_secretkey = read_key_file(secret_path("/keys", party), True)
    sock.curve_serverkey = read_key_file(public_path("/keys", "broker"), False)[0]
sock.connect(endpoint)
sock.send(messages.encode(messages.OrderRequest(ts=time.time_ns(), client_order_id=cid, strategy="probe",
    symbol="BTCUSDT", side=Side.BUY, kind=OrderKind.MARKET, qty=Decimal("0.0001"))))
print(json.dumps(messages.decode(sock.recv(), messages.REQUESTS).TYPE if sock.poll(3000) else "NO_REPLY"))
"""


def _give_keys_to_the_image_user(private: Path, image: str) -> None:
    if os.geteuid() == 0:
        for f in private.iterdir():
            os.chown(f, IMAGE_UID, IMAGE_UID)
    else:  # a user in the docker group: the image itself, as root, hands them over
        docker("run", "--rm", "--user", "0", "--entrypoint", "chown", "-v", f"{private}:/k", image,
               "-R", f"{IMAGE_UID}:{IMAGE_UID}", "/k")


def _take_keys_back(private: Path, image: str) -> None:
    if os.geteuid() != 0:  # so that pytest can remove its temporary directory
        docker("run", "--rm", "--user", "0", "--entrypoint", "chown", "-v", f"{private}:/k", image,
               "-R", f"{os.getuid()}:{os.getgid()}", "/k", check=False)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    reason = docker_unavailable()
    if reason:
        pytest.skip(f"container tests need a Docker engine: {reason}")
    sweep_stale_projects()
    images = build_images()
    keys = tmp_path_factory.mktemp("curve") / "keys"
    curve.make_keys(keys)  # what `qf keys` does: made here at test time, never committed
    _give_keys_to_the_image_user(keys / "private", images.app)
    st = ComposeStack(images, api_port=free_port(), prometheus_port=free_port(),
                      env={"QUANTUMFLOW_CURVE_KEYS": str(keys)})
    st.files = [*COMPOSE_FILES, HOSTS_OVERRIDE, TEST_OVERRIDE]
    try:
        started = time.monotonic()
        st.up()
        st.wait_healthy(APP_SERVICES, STACK_BUDGET_S)
        st.started = started
        yield st
    finally:
        st.destroy()
        _take_keys_back(keys / "private", images.app)


def test_every_host_trades_over_curve(stack):
    with explained(stack):
        body = wait_until(lambda: (r := api(stack, "/api/v1/trades?limit=100"))[0] == 200 and r[1]["trades"]
                          and r[1], STACK_BUDGET_S, "fills through the API")
        assert time.monotonic() - stack.started < STACK_BUDGET_S + 30
        assert body["trades"] and filled(results(stack))
        wait_until(lambda: api(stack, "/health")[0] == 200, 30, "/health = 200: every heartbeat heard over CURVE")
        # each "host" on its own network, joined by exactly the services that talk to it
        expected = {"marketdata": {"marketdata-net"}, "broker": {"broker-net", "marketdata-net", "orders"},
                    "risk": {"risk-net", "marketdata-net", "broker-net", "orders"},
                    "strategy": {"strategy-net", "marketdata-net", "risk-net", "broker-net"},
                    "api": {"marketdata-net", "risk-net", "broker-net", "strategy-net"},
                    "notifier": {"marketdata-net", "risk-net", "broker-net", "strategy-net"}}
        for service, nets in expected.items():
            assert stack.networks_of(service) == nets | {"bus"}, service
            # its own secret only, and every public key (read from the mounts: the notifier may be
            # restarting, its outbox directory is not writable in the image, a matter of the base file)
            mounts = json.loads(stack.inspect(service, "{{json .Mounts}}"))
            keys = {m["Destination"]: m for m in mounts if m["Destination"].startswith("/keys")}
            assert set(keys) == {"/keys/public", f"/keys/private/{service}.key_secret"}, service
            assert not any(m["RW"] for m in keys.values()), "keys are mounted read-only"
        for service in APP_SERVICES:
            assert stack.restarts(service) == 0, service
        config = stack.events("broker", "config")[0]
        assert config["QF_CURVE_KEYS"] == "/keys" and config["QF_BROKER_REP"] == "tcp://*:5557"


def test_the_strategy_reaches_the_broker_port_but_cannot_order_there(stack):
    """No network keeps the strategy from port 5557 here (it reads the broker's fills on that host):
    the broker's CURVE key list does. Risk's key is heard; the strategy's, or none, is not."""
    with explained(stack):
        assert stack.python("strategy", CONNECT, "broker-host", "5557", "3") == "connected"
        tag = time.time_ns()
        cids = {who: f"hosts-{who}-{tag}" for who in ("strategy", "none", "risk")}
        endpoint = "tcp://broker-host:5557"
        assert stack.python("strategy", ORDER, endpoint, "strategy", cids["strategy"]) == "NO_REPLY"
        assert stack.python("strategy", ORDER, endpoint, "none", cids["none"]) == "NO_REPLY"
        assert stack.python("risk", ORDER, endpoint, "risk", cids["risk"]) == "ack"  # the one key it hears
        refused = stack.events("broker", "curve_refused")
        assert any(e.get("socket") == "broker_rep" and e.get("known_as") == "strategy" for e in refused), refused
        stored = {row[0] for row in stack.sql("select client_order_id from orders where client_order_id like ?",
                                              (f"hosts-%-{tag}",))}
        assert stored == {cids["risk"]}


def test_down_leaves_nothing(stack):
    stack.down()
    assert leftovers(stack.project) == {"containers": [], "networks": [], "volumes": []}
