"""fly.multi.toml, read offline: a process group per service on Fly's private network, CURVE keys where they belong, PostgreSQL, no shared volume."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from services.cli import SERVICE_HELP
from shared import config as qfconfig
from shared import curve
from tests.docker.config_files import dockerfile_stages

ROOT = Path(__file__).resolve().parents[2]
FLY_MULTI = ROOT / "fly.multi.toml"
GROUPS = ("marketdata", "strategy", "risk", "broker", "api", "notifier")
# socket setting -> (the group that binds it, its port), as in docker-compose.yml
SOCKETS = {"QF_MD_PUB": ("marketdata", 5555), "QF_RISK_REP": ("risk", 5556), "QF_BROKER_REP": ("broker", 5557),
           "QF_BROKER_PUB": ("broker", 5558), "QF_RISK_PUB": ("risk", 5559), "QF_STRATEGY_PUB": ("strategy", 5560)}


@pytest.fixture(scope="module")
def fly() -> dict:
    with FLY_MULTI.open("rb") as f:
        return tomllib.load(f)


def comments() -> str:
    return "\n".join(line for line in FLY_MULTI.read_text().splitlines() if line.lstrip().startswith("#"))


def test_each_service_is_a_process_group_of_its_own(fly):
    assert fly["processes"] == {g: g for g in GROUPS}
    assert set(fly["processes"].values()) <= set(SERVICE_HELP), "each command is a `qf` service"
    assert fly["build"]["dockerfile"] == "Dockerfile"
    assert fly["build"]["build-target"] in {name for name, _ in dockerfile_stages(ROOT / "Dockerfile")}
    assert fly["primary_region"] == "gru" and fly["kill_signal"] == "SIGTERM"
    # every group has a machine size and a restart policy, each exactly once
    sized = [g for vm in fly["vm"] for g in vm["processes"]]
    assert sorted(sized) == sorted(GROUPS)
    [restart] = fly["restart"]
    assert restart["policy"] == "on-failure" and sorted(restart["processes"]) == sorted(GROUPS)
    assert "--ha=false" in comments(), "one machine per group: a second broker on one database is refused"


def test_sockets_are_6pn_names_of_the_binding_group(fly):
    env, app = fly["env"], fly["app"]
    for var, (group, port) in SOCKETS.items():
        assert env[var] == f"tcp://{group}.process.{app}.internal:{port}", var
    assert "change it in the six QF_*_PUB/_REP endpoints" in comments()


def test_curve_is_on_with_each_secret_key_on_its_own_machine_only(fly):
    env = fly["env"]
    keys = env["QF_CURVE_KEYS"]
    files = {f["guest_path"]: f for f in fly["files"]}
    for party in curve.PARTIES:
        secret = files[str(curve.secret_path(keys, party))]
        assert secret["processes"] == [party], party  # no other machine gets it as a file
        assert "local_path" not in secret and "raw_value" not in secret, "a secret key comes from a Fly secret"
        name = secret["secret_name"]
        assert not name.startswith("QF_"), f"{name}: `qf` refuses unknown QF_ variables, and secrets are env"
        assert name == f"QUANTUMFLOW_CURVE_{party.upper()}"
        public = files[str(curve.public_path(keys, party))]
        assert "processes" not in public, "every machine gets every public key"
        assert public["local_path"] == f"data/curve/public/{party}.key"
    assert len(files) == 2 * len(curve.PARTIES)
    # how each secret is made, in the header: the base64 of the file `qf keys` wrote
    text = comments()
    assert "for p in " + " ".join(curve.PARTIES) + "; do" in text and "fly secrets set --stage" in text
    assert '"QUANTUMFLOW_CURVE_$(echo $p | tr a-z A-Z)=$(base64 -w0 data/curve/private/$p.key_secret)"' in text
    # the key directory flyctl reads is never committed, nor sent into an image
    assert "/data/" in (ROOT / ".gitignore").read_text().split()
    assert "!data" not in (ROOT / ".dockerignore").read_text()
    assert "qf keys data/curve" in comments()


def test_the_database_is_postgresql_from_a_secret_and_no_volume_is_shared(fly):
    env = fly["env"]
    assert "QF_DB" not in env, "QF_DB holds the database password: a secret"
    assert re.search(r"fly secrets set .*QF_DB='postgresql://", comments())
    secrets = {name for name, _, _ in qfconfig.all_settings() if "TOKEN" in name or "SECRET" in name}
    assert not secrets & set(env)
    mounts = fly["mounts"] if isinstance(fly["mounts"], list) else [fly["mounts"]]
    groups = [g for m in mounts for g in m["processes"]]
    assert all(len(m["processes"]) == 1 for m in mounts) and len(groups) == len(set(groups)), \
        "a Fly volume attaches to one machine: never shared across groups"
    assert len({m["source"] for m in mounts}) == len(mounts)
    [journal] = mounts
    assert journal["processes"] == ["broker"]
    # with QF_DB a URL the journal lives in QF_RUN_DIR (shared/journal.py): on the broker's volume
    assert env["QF_RUN_DIR"].startswith(journal["destination"].rstrip("/") + "/")


def test_only_the_api_is_public_and_its_health_is_checked(fly):
    http = fly["http_service"]
    assert http["processes"] == ["api"]
    assert fly["env"]["QF_API_BIND"] == f"0.0.0.0:{http['internal_port']}"
    assert [c["path"] for c in http["checks"]] == ["/health/live"]
    assert http["auto_stop_machines"] in (False, "off")
    assert [(c["path"], c["processes"]) for c in fly["checks"].values()] == [("/health", ["api"])]
    metrics = {tuple(m["processes"]): m["port"] for m in fly["metrics"]}
    assert metrics[("api",)] == http["internal_port"]
    for group, var in (("marketdata", "QF_MD_METRICS_BIND"), ("risk", "QF_RISK_METRICS_BIND"),
                       ("broker", "QF_BROKER_METRICS_BIND"), ("strategy", "QF_STRATEGY_METRICS_BIND")):
        assert fly["env"][var] == f"0.0.0.0:{metrics[(group,)]}"


def test_the_environment_loads_and_every_party_finds_its_sockets(fly, tmp_path):
    keys = tmp_path / "keys"
    curve.make_keys(keys)
    env = {**fly["env"], "QF_CURVE_KEYS": str(keys), "QF_DB": "postgresql://qf:pw@db.internal:5432/qf",
           "QF_RUN_DIR": str(tmp_path / "run")}
    cfg = qfconfig.load(env)  # every value valid, no unknown QF_ name
    for party in curve.PARTIES:
        ident = curve.load(cfg, party)
        assert set(ident.endpoints) == {env[var] for var in SOCKETS}
    assert "fly.toml is the other way: one machine" in FLY_MULTI.read_text()
