"""With QF_CURVE_KEYS, only risk's key places orders on the broker and only the API's key controls risk: real processes, tcp and ipc."""
from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import zmq

from services.supervisor import Stack
from shared import config as qfconfig
from shared import curve
from shared.bus import Subscriber
from shared.runtime import is_alive
from tests.conftest import clean_environ, ipc_env, journal_stored, tcp_env, wait_for

PEER = str(Path(__file__).resolve().parent / "peer.py")
ROOT = str(Path(__file__).resolve().parents[2])
SILENCE_MS = 1500  # a refused client's bounded wait: the accepted ones answer in milliseconds


@pytest.fixture
def keys(tmp_path) -> str:
    directory = tmp_path / "keys"
    curve.make_keys(directory)
    return str(directory)


def start(settings: dict[str, str], *services: str) -> tuple[Stack, list[str]]:
    """`services` as real processes (no restarts), every output line collected, once each one is alive."""
    lines: list[str] = []
    stack = Stack({**clean_environ(), **settings, "PYTHONUNBUFFERED": "1"}, services=services,
                  on_line=lambda name, line: lines.append(f"{name} | {line}"), restart=False)
    stack.start()
    try:
        wait_for(lambda: all(is_alive(settings["QF_RUN_DIR"], s) for s in services), 20,
                 f"{', '.join(services)} to run")
    except AssertionError:
        stack.stop()
        raise AssertionError("\n".join(lines[-40:])) from None
    return stack, lines


def peers(runs: dict[str, list[str]]) -> dict[str, dict]:
    """Run tests/curve/peer.py once per entry, all at once, each in its own process: name -> its answer."""
    procs = {name: subprocess.Popen([sys.executable, PEER, *args], cwd=ROOT, env=clean_environ(),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, args in runs.items()}
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 0, (name, stderr[-2000:])
        out[name] = json.loads(stdout.strip().splitlines()[-1])
    return out


def orders_of(db: str) -> set[str]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
        return {cid for (cid,) in con.execute("select client_order_id from orders")}


@pytest.mark.parametrize("transport", ["tcp", "ipc"])
def test_only_risks_key_reaches_the_broker_and_only_the_apis_controls_risk(tmp_path, keys, transport):
    settings = (tcp_env if transport == "tcp" else ipc_env)(tmp_path, QF_CURVE_KEYS=keys)
    bus = qfconfig.load(settings).bus
    stack, lines = start(settings, "broker", "risk")
    try:
        as_ = {party: f"{keys}:{party}" for party in curve.PARTIES}
        broker, risk = (bus.broker_rep, as_["broker"]), (bus.risk_rep, as_["risk"])
        got = peers({
            # on the broker's order port: only risk's key is heard
            "fresh": [broker[0], "fresh", broker[1], "order", "cid-fresh", str(SILENCE_MS)],
            "plain": [broker[0], "none", broker[1], "order", "cid-plain", str(SILENCE_MS)],
            "strategy": [broker[0], as_["strategy"], broker[1], "order", "cid-strategy", str(SILENCE_MS)],
            "api": [broker[0], as_["api"], broker[1], "order", "cid-api", str(SILENCE_MS)],
            "risk": [broker[0], as_["risk"], broker[1], "order", "cid-risk", "10000"],
            # on risk's ROUTER: control from the API, orders from the strategies, nothing from strangers
            "api halt": [risk[0], as_["api"], risk[1], "control", "HALT", "10000"],
            "strategy halt": [risk[0], as_["strategy"], risk[1], "control", "HALT", "10000"],
            "strategy state": [risk[0], as_["strategy"], risk[1], "control", "STATE", "10000"],
            "api order": [risk[0], as_["api"], risk[1], "order", "cid-api-at-risk", "10000"],
            "strategy order": [risk[0], as_["strategy"], risk[1], "order", "cid-strategy-at-risk", "10000"],
            "fresh state": [risk[0], "fresh", risk[1], "control", "STATE", str(SILENCE_MS)],
            "plain state": [risk[0], "none", risk[1], "control", "STATE", str(SILENCE_MS)],
        })
        for name in ("fresh", "plain", "strategy", "api", "fresh state", "plain state"):
            assert got[name]["answer"] == "NO_REPLY", (name, got[name])
        assert got["risk"]["answer"] == "ack", got["risk"]  # no book yet: REJECTED NO_BOOK, but heard
        assert got["api halt"] == {"answer": "control_reply", "detail": "HALTED"}
        assert got["strategy halt"] == {"answer": "error", "detail": "FORBIDDEN"}
        assert got["strategy state"]["answer"] == "control_reply", got["strategy state"]
        assert got["api order"] == {"answer": "error", "detail": "FORBIDDEN"}
        assert got["strategy order"]["answer"] == "decision", got["strategy order"]

        # the broker counts the handshakes its key lists refused, and says so in its heartbeat
        api = curve.load(qfconfig.load(settings), "api")
        beats = Subscriber(bus.broker_pub, ["heartbeat.broker"], 1000, curve=api)
        try:
            def refused():
                try:
                    _, beat = beats.recv(zmq.NOBLOCK)
                except zmq.Again:
                    return None
                return beat.stats.get("curve_refused", 0) >= 3 and beat.stats  # fresh, strategy, api
            wait_for(refused, 10, "a broker heartbeat counting the refused handshakes")
        finally:
            beats.close()
    finally:
        codes = stack.stop(timeout=15)
    text = "\n".join(lines)
    assert codes == {"broker": 0, "risk": 0}, (codes, text[-3000:])
    assert "event=curve_refused socket=broker_rep" in text, text[-3000:]
    assert "event=forbidden" in text and "peer=strategy" in text, text[-3000:]
    journal_stored(settings["QF_DB"])
    stored = orders_of(settings["QF_DB"])
    assert "cid-risk" in stored  # the one order that reached the broker
    assert not stored & {"cid-fresh", "cid-plain", "cid-strategy", "cid-api", "cid-api-at-risk"}, stored


def test_a_missing_key_stops_a_service_with_one_line_naming_the_file(tmp_path, keys):
    Path(curve.secret_path(keys, "broker")).unlink()
    Path(curve.public_path(keys, "notifier")).write_text("curve\n    public-key = \"not-a-key\"\n")
    settings = tcp_env(tmp_path, QF_CURVE_KEYS=keys)
    env = {**clean_environ(), **settings}
    runs = {name: subprocess.run([sys.executable, "-m", "services.cli", name], cwd=ROOT, env=env, capture_output=True,
                                 text=True, timeout=60) for name in ("broker", "risk")}
    broker, risk = runs["broker"], runs["risk"]
    assert broker.returncode == 2
    assert broker.stderr.strip() == (f"qf broker: QF_CURVE_KEYS: {curve.secret_path(keys, 'broker')}: no such file "
                                     "(`qf keys DIR` makes the keys)")
    assert risk.returncode == 2  # risk serves the notifier on its PUB: it needs that public key
    [line] = risk.stderr.strip().splitlines()
    assert str(curve.public_path(keys, "notifier")) in line and "no valid public-key line" in line
    assert "not-a-key" not in line  # never what the file holds
