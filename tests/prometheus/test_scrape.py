"""A real Prometheus (Debian's package, on a free port) scrapes marketdata, risk, the broker and the
strategy running as OS processes under `Stack` (what `qf up` runs) with their QF_*_METRICS_BIND set:
each target is up with its series, and every rule of deploy/alerts.yml evaluates on them (its
metrics exist). The jobs and rules are deploy/prometheus.yml's, pointed at loopback ports."""
from __future__ import annotations

import json
import re
import subprocess
import urllib.error
import urllib.parse
import urllib.request

import pytest

from services.supervisor import Stack
from tests.conftest import SPOT_CAPTURE, clean_environ, free_port, stop_process, tcp_env, wait_for
from tests.docker.config_files import load_yaml, tool
from tests.prometheus.test_rules import CONFIGS, RULES

pytestmark = pytest.mark.e2e
PROMETHEUS = tool("prometheus")
START_S = 60.0  # bound on processes starting, Prometheus starting and the first scrapes (1 s apart)
SERVICES = {"marketdata": "QF_MD_METRICS_BIND", "risk": "QF_RISK_METRICS_BIND",
            "broker": "QF_BROKER_METRICS_BIND", "strategy": "QF_STRATEGY_METRICS_BIND"}
# per service, a query that returns data only once the service has done its work
WORKING = {
    "marketdata": 'qf_md_books_published_total{job="quantumflow-marketdata"} > 0',
    "risk": 'qf_risk_trading_state{job="quantumflow-risk", state="ACTIVE"} == 1',
    "broker": 'qf_broker_store_available{job="quantumflow-broker"} == 1',
    "strategy": 'qf_strategy_decision_seconds_count{job="quantumflow-strategy"} > 0',
}


def prometheus_config(ports: dict[str, int]) -> dict:
    """deploy/prometheus.yml with its service jobs on 127.0.0.1:`ports` (the API's job left out: not
    started here), scraped and evaluated every second, the rules file by its absolute path."""
    cfg = load_yaml(CONFIGS[0])
    cfg["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"}
    cfg["rule_files"] = [str(RULES)]
    jobs = []
    for job in cfg["scrape_configs"]:
        service = job["static_configs"][0]["labels"]["service"]
        if service in ports:
            job["static_configs"][0]["targets"] = [f"127.0.0.1:{ports[service]}"]
            jobs.append(job)
    cfg["scrape_configs"] = jobs
    return cfg


class Prometheus:
    """`prometheus` on a free loopback port with `config`, its data in `tmp_path`."""

    def __init__(self, tmp_path, config: dict) -> None:
        path = tmp_path / "prometheus.yml"
        path.write_text(json.dumps(config))  # YAML is a superset of JSON
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = tmp_path / "prometheus.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([PROMETHEUS, f"--config.file={path}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                          f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                                         stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def get(self, path: str) -> dict | None:
        try:
            with urllib.request.urlopen(self.base + path, timeout=5) as resp:
                return json.loads(resp.read())
        except (OSError, ValueError):
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited with {self.proc.returncode}:\n{self.log.read_text()}")
            return None

    def query(self, expr: str) -> list:
        """The instant vector of `expr` (empty while Prometheus has nothing, or is not up yet)."""
        reply = self.get("/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        if reply is None:
            return []
        assert reply["status"] == "success", (expr, reply)
        return reply["data"]["result"]

    def stop(self) -> None:
        stop_process(self.proc)


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus (Debian package prometheus, which `make sysdeps` "
                                               "installs) is not installed")
def test_prometheus_scrapes_every_service_and_evaluates_every_rule(tmp_path):
    ports = {name: free_port() for name in SERVICES}
    settings = tcp_env(tmp_path, QF_FEED=f"replay:{SPOT_CAPTURE}", QF_REPLAY_SPEED="5", QF_REPLAY_LOOP="true",
                       QF_STRATEGY_KIND="ofi",
                       **{var: f"127.0.0.1:{ports[name]}" for name, var in SERVICES.items()})
    stack = Stack({**clean_environ(), **settings, "PYTHONUNBUFFERED": "1"}, services=tuple(SERVICES))
    prom = None
    try:
        stack.start()
        prom = Prometheus(tmp_path, prometheus_config(ports))

        def explained(what: str) -> str:
            return f"{what}; services' last lines: " + "; ".join(
                f"{c.name}: {c.tail[-1] if c.tail else '(none)'}" for c in stack.children)
        for name in SERVICES:
            wait_for(lambda: [r for r in prom.query(f'up{{job="quantumflow-{name}"}}') if r["value"][1] == "1"],
                     START_S, explained(f"prometheus to scrape {name}"), step=0.2)
        for name, expr in WORKING.items():
            wait_for(lambda: prom.query(expr), START_S, explained(f"{name}'s series: {expr}"), step=0.2)
        for name in SERVICES:  # the base every service exports
            for metric in ("process_start_time_seconds", "qf_heartbeat_age_seconds"):
                (got,) = prom.query(f'{metric}{{job="quantumflow-{name}"}}')
                assert got["metric"]["service"] == name
                assert float(got["value"][1]) >= 0, (name, metric, got)

        # every metric a rule reads is exported by some service
        exprs = [r["expr"] for g in load_yaml(RULES)["groups"] for r in g["rules"]]
        metrics = {m for e in exprs for m in re.findall(r"\b(qf_[a-z_]+|process_start_time_seconds|up)\b", e)}
        assert len(metrics) >= 9, metrics
        for metric in sorted(metrics):
            assert prom.query(f'count({{__name__="{metric}", job=~"quantumflow-.*"}})'), f"no series of {metric}"

        # and every rule has been evaluated on them without an error
        def evaluated():
            reply = prom.get("/api/v1/rules")
            rules = [r for g in (reply or {}).get("data", {}).get("groups", []) for r in g["rules"]]
            done = [r for r in rules if not r.get("lastEvaluation", "").startswith("0001-")]
            return rules if rules and len(done) == len(rules) else None
        rules = wait_for(evaluated, START_S, "every rule to be evaluated", step=0.2)
        assert {r["name"] for r in rules} == {r["alert"] for g in load_yaml(RULES)["groups"] for r in g["rules"]}
        assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
    finally:
        if prom is not None:
            prom.stop()
        codes = stack.stop()
    assert all(code == 0 for code in codes.values()), codes
