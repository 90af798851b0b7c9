"""docker-compose.hosts.yml as Compose reads it (no engine needed): CURVE on, one network per serving host, each container its own secret key."""
from __future__ import annotations

from pathlib import Path

import pytest

from shared import config as qfconfig
from shared import curve
from tests.docker.config_files import Compose, env_of, networks_of, volume_targets
from tests.docker.stack import compose_command

ROOT = Path(__file__).resolve().parents[2]
FILES = [ROOT / "docker-compose.yml", ROOT / "docker-compose.replay.yml", ROOT / "docker-compose.hosts.yml"]
SERVICES = ("marketdata", "strategy", "risk", "broker", "api", "notifier")
# the network of each serving "host", its alias there, and who joins it (docs/architecture.md's sockets)
HOSTS = {"marketdata-net": ("marketdata", {"strategy", "risk", "broker", "api", "notifier"}),
         "risk-net": ("risk", {"strategy", "api", "notifier"}),
         "broker-net": ("broker", {"risk", "strategy", "api", "notifier"}),
         "strategy-net": ("strategy", {"api", "notifier"})}
BINDS = {"marketdata": {"QF_MD_PUB": "tcp://*:5555"},
         "risk": {"QF_RISK_REP": "tcp://*:5556", "QF_RISK_PUB": "tcp://*:5559"},
         "broker": {"QF_BROKER_REP": "tcp://*:5557", "QF_BROKER_PUB": "tcp://*:5558"},
         "strategy": {"QF_STRATEGY_PUB": "tcp://*:5560"}}
CONNECTS = {"QF_MD_PUB": "tcp://marketdata-host:5555", "QF_RISK_REP": "tcp://risk-host:5556",
            "QF_RISK_PUB": "tcp://risk-host:5559", "QF_BROKER_REP": "tcp://broker-host:5557",
            "QF_BROKER_PUB": "tcp://broker-host:5558", "QF_STRATEGY_PUB": "tcp://strategy-host:5560"}


@pytest.fixture(scope="module")
def hosts(tmp_path_factory) -> dict:
    cmd = compose_command()
    if cmd is None:
        pytest.skip("neither `docker compose` (v2) nor `docker-compose` (v1) is installed")
    keys = tmp_path_factory.mktemp("hosts") / "keys"
    curve.make_keys(keys)
    cfg = Compose(cmd).config(FILES, QUANTUMFLOW_CURVE_KEYS=str(keys))
    cfg["keys"] = keys
    return cfg


def test_every_service_speaks_curve_with_its_own_secret_only(hosts):
    keys = hosts["keys"]
    for name in SERVICES:
        svc = hosts["services"][name]
        assert env_of(svc)["QF_CURVE_KEYS"] == "/keys", name
        mounts = {target: src for target, src in volume_targets(svc).items() if target.startswith("/keys")}
        assert mounts == {"/keys/public": str(keys / "public"),
                          f"/keys/private/{name}.key_secret": str(curve.secret_path(keys, name))}, name
        assert all(read_only(svc, target) for target in mounts), name


def read_only(svc: dict, target: str) -> bool:
    """Whether the mount at `target` is read-only (v1 prints `src:target:ro`, v2 `read_only`)."""
    for v in svc["volumes"]:
        if isinstance(v, str) and v.split(":")[1] == target:
            return v.endswith(":ro")
        if isinstance(v, dict) and v["target"] == target:
            return bool(v.get("read_only"))
    return False


def test_each_serving_host_has_a_network_joined_by_its_clients_only(hosts):
    services = hosts["services"]
    for net, (owner, clients) in HOSTS.items():
        members = {name for name in SERVICES if net in networks_of(services[name])}
        assert members == clients | {owner}, net
        assert services[owner]["networks"][net]["aliases"] == [f"{owner}-host"]
        assert hosts["networks"][net].get("internal") is True
    # the base file's `bus` stays (an override cannot remove it) but carries no container traffic
    assert hosts["networks"]["bus"]["driver_opts"] == {"com.docker.network.bridge.enable_icc": "false"}


def test_tcp_endpoints_by_name_and_each_config_loads(hosts, tmp_path):
    for name in SERVICES:
        env = env_of(hosts["services"][name])
        expected = {**CONNECTS, **BINDS.get(name, {})}
        assert {k: env[k] for k in CONNECTS} == expected, name
        settings = {k: v for k, v in env.items() if k.startswith("QF_")}
        # the host's key directory and run dir for the container's; the capture is the image's
        settings.update(QF_CURVE_KEYS=str(hosts["keys"]), QF_RUN_DIR=str(tmp_path), QF_FEED="live")
        cfg = qfconfig.load(settings)  # no unknown or bad QF_ value
        assert curve.load(cfg, name).party == name


def test_without_keys_compose_refuses_to_start(hosts):
    out = Compose(compose_command()).run(FILES, ["config"])
    assert out.returncode != 0 and "set QUANTUMFLOW_CURVE_KEYS to the directory qf keys made" in out.stderr
