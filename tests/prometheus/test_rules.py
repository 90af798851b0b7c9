"""deploy/alerts.yml: valid rules (`promtool check rules`) that fire when deploy/alerts.test.yml says and
not otherwise (`promtool test rules`), loaded by both Prometheus configs, each rule with its cases."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.docker.config_files import load_yaml, tool

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RULES = DEPLOY / "alerts.yml"
RULE_TESTS = DEPLOY / "alerts.test.yml"
CONFIGS = (DEPLOY / "prometheus.yml", DEPLOY / "prometheus.local.yml")
PROMTOOL = tool("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool (Debian package prometheus, which "
                                    "`make sysdeps` installs) is not installed: the rules are not checked")


def promtool(*args: str) -> str:
    out = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120, cwd=DEPLOY)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


@needs_promtool
def test_the_rules_are_valid():
    assert "SUCCESS" in promtool("check", "rules", str(RULES))


@needs_promtool
def test_the_rules_fire_as_their_unit_tests_say():
    assert "SUCCESS" in promtool("test", "rules", str(RULE_TESTS))


@needs_promtool
@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_both_prometheus_configs_load_the_rules(config):
    out = promtool("check", "config", str(config))
    assert "1 rule files found" in out and "alerts.yml" in out


def test_every_alert_has_a_case_that_fires_it():
    rules = load_yaml(RULES)
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    cases = load_yaml(RULE_TESTS)
    fired = {t["alertname"] for case in cases["tests"] for t in case["alert_rule_test"] if t.get("exp_alerts")}
    assert alerts == fired
    for g in rules["groups"]:
        for r in g["rules"]:
            assert r["labels"]["severity"] in ("warning", "critical"), r["alert"]
            assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]


def test_the_local_config_has_the_compose_jobs_on_loopback():
    compose, local = (load_yaml(p) for p in CONFIGS)
    assert compose["rule_files"] == local["rule_files"] == ["alerts.yml"]

    def jobs(cfg: dict) -> dict[str, tuple[str, str]]:
        return {j["job_name"]: (j["static_configs"][0]["targets"][0], j["static_configs"][0]["labels"]["service"])
                for j in cfg["scrape_configs"]}
    ports = {"api": "8000", "marketdata": "9101", "risk": "9102", "broker": "9103", "strategy": "9104"}
    assert jobs(compose) == {f"quantumflow-{s}": (f"{s}:{p}", s) for s, p in ports.items()}
    assert jobs(local) == {f"quantumflow-{s}": (f"127.0.0.1:{p}", s) for s, p in ports.items()}
