"""/health and /api/v1/status under real gunicorn, hearing real heartbeats over TCP: 200 only while
every service beats and every book is synced; 503 naming what is wrong otherwise."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from shared.config import load
from tests.conftest import free_port, stop_process, wait_for
from tests.services.api.conftest import Beats
from tests.services.api.test_gunicorn import REPO, get

START_S = 30.0


def test_health_follows_heartbeats_and_feeds_across_processes(tmp_path, db, api_config, add_fill):
    add_fill("BTCUSDT", "BUY", "0.002", "61837.63")
    endpoints = {f"QF_{k}_PUB": f"tcp://127.0.0.1:{free_port()}" for k in ("MD", "BROKER", "RISK", "STRATEGY")}
    settings = {"QF_DB": api_config.common.db, "QF_RUN_DIR": str(tmp_path / "run"), "QF_SHABBAT_PAUSE": "false",
                "QF_HEARTBEAT_MS": "100", "QF_SYMBOLS": "BTCUSDT,ETHUSDT", **endpoints}
    beats = Beats(load(settings))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("QF_")}
    env.update(settings, QF_API_BIND=f"127.0.0.1:{port}", QF_API_WORKERS="2", PYTHONUNBUFFERED="1")
    base = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "api.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "services.api"], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: proc.poll() is not None or _status(base + "/health/live")[0] == 200, START_S,
                 "the api to start")
        assert proc.poll() is None, log_path.read_text()

        def health(**beat):
            beats.beat(**beat)
            return _status(base + "/health")

        # everything beats, both books synced: 200 from every worker (several answers in a row)
        wait_for(lambda: all(health()[0] == 200 for _ in range(4)), 15, "/health = 200 from every worker")
        status, body = health()
        assert status == 200 and body["problems"] == [] and "error" not in body
        assert {n: s["fresh"] for n, s in body["services"].items()} == \
            {"marketdata": True, "strategy": True, "risk": True, "broker": True}
        assert body["feeds"]["ETHUSDT"] == {"state": "SYNCED", "detail": "", "synced": True}

        # one book resyncing: 503 naming the symbol and its state (marketdata's own words)
        syncing = {"BTCUSDT": "SYNCED", "ETHUSDT": "SYNCING"}

        # (on a loaded machine a heartbeat may also be late now and then: the answer that names
        # the feed alone is waited for, as the broker's below)
        def eth_syncing():
            beats.md_status("ETHUSDT", "SYNCING", "gap in the diff stream: resyncing")
            status, body = health(symbols=syncing)
            return status == 503 and body.get("problems") == [
                "ETHUSDT: feed SYNCING (gap in the diff stream: resyncing)"] and body
        body = wait_for(eth_syncing, 15, "/health = 503 naming ETHUSDT's feed alone")
        assert body["error"]["code"] == "unhealthy"
        assert body["feeds"]["ETHUSDT"]["synced"] is False and body["feeds"]["BTCUSDT"]["synced"] is True

        # the broker falls silent (the rest beats on): 503 once its heartbeat is 3 periods old
        wait_for(lambda: health()[0] == 200, 15, "/health = 200 again")
        # (a worker that booted late may still be in its first heartbeat period: it waits for the
        # broker's first beat and then names everyone as late; the next answers say it right)
        def broker_silent():
            status, body = health(services=("marketdata", "strategy", "risk"))
            problems = body.get("problems", [])
            return status == 503 and len(problems) == 1 and problems[0].startswith("broker: last heartbeat ") \
                and body
        body = wait_for(broker_silent, 15, "/health = 503 naming only the silent broker")
        assert body["services"]["broker"]["fresh"] is False and body["services"]["broker"]["age_s"] >= 0.3

        # /status: each service's heartbeat age, each symbol's feed, risk's live state
        beats.risk_state("HALTED", "operator")

        def halted():
            beats.risk_state("HALTED", "operator")
            status, body = _status(base + "/api/v1/status", beat=lambda: beats.beat())
            return status == 200 and body["trading_state"] == "HALTED" and body
        body = wait_for(halted, 15, "/api/v1/status to show risk's live HALTED")
        assert body["fills"] == 1 and set(body["services"]) == {"marketdata", "strategy", "risk", "broker"}
        assert set(body["feeds"]) == {"BTCUSDT", "ETHUSDT"}
        assert body["risk_state"]["state"] == "ACTIVE"  # the stored one: risk never wrote a change here
    finally:
        assert stop_process(proc) == 0, log_path.read_text()
        beats.close()


def _status(url: str, beat=None) -> tuple[int, dict]:
    if beat is not None:
        beat()
    try:
        status, _, body = get(url)
    except OSError:
        return 0, {}
    return status, json.loads(body)
