"""QF_SYMBOLS groups: how `qf up` splits symbols over marketdata and strategy processes, how one
service in several processes is heard (`/health`, `qf status`, the status line), and what a
setting that cannot serve it says."""
from __future__ import annotations

import subprocess
import sys

import pytest

from services.control.watch import Seen, Snapshot, feeds_view, services_view
from services.supervisor import Stack, StatusMonitor, listener_env, processes
from shared import config as qfconfig
from shared.bus import Publisher
from shared.errors import ConfigError
from shared.messages import Heartbeat
from tests.conftest import SPOT_CAPTURE, clean_environ, ipc_env, tcp_env


def plan(env: dict) -> dict[str, dict]:
    return {name: own for name, _, own in processes(qfconfig.load(env), env)}


def test_groups_are_parsed_checked_and_their_union_is_the_symbols():
    assert qfconfig.symbol_groups("btcusdt, ethusdt;usdm:solusdt") == (("BTCUSDT", "ETHUSDT"), ("USDM:SOLUSDT",))
    assert qfconfig.load({"QF_SYMBOLS": "btcusdt;ethusdt"}).md.symbols == ("BTCUSDT", "ETHUSDT")
    for bad, why in (("btcusdt;;ethusdt", "a ';'-separated group is empty"),
                     ("btcusdt;BTCUSDT", "a symbol is in two groups")):
        with pytest.raises(ConfigError, match=why):
            qfconfig.load({"QF_SYMBOLS": bad})


def test_tcp_ports_are_derived_per_group_and_listeners_hear_every_group(tmp_path):
    env = {**tcp_env(tmp_path), "QF_MD_PUB": "tcp://127.0.0.1:5555", "QF_STRATEGY_PUB": "tcp://127.0.0.1:5560",
           "QF_MD_METRICS_BIND": "127.0.0.1:9101", "QF_STRATEGY_METRICS_BIND": "127.0.0.1:0",
           "QF_MD_RECORD": str(tmp_path / "cap.jsonl.gz"), "QF_SYMBOLS": "btcusdt,ethusdt;solusdt;bnbusdt"}
    p = plan(env)
    assert list(p) == ["broker", "risk", "api", "strategy.1", "strategy.2", "strategy.3", "notifier",
                       "marketdata.1", "marketdata.2", "marketdata.3"]
    md2, st3 = p["marketdata.2"], p["strategy.3"]
    assert (md2["QF_SYMBOLS"], md2["QF_INSTANCE"], md2["QF_MD_PUB"]) == ("solusdt", "2", "tcp://127.0.0.1:5565")
    assert md2["QF_MD_METRICS_BIND"] == "127.0.0.1:9111" and md2["QF_MD_RECORD"] == str(tmp_path / "cap-2.jsonl.gz")
    # a strategy hears its own group's marketdata; port 0 stays "any free port"
    assert (st3["QF_MD_PUB"], st3["QF_STRATEGY_PUB"], st3["QF_STRATEGY_METRICS_BIND"]) == (
        "tcp://127.0.0.1:5575", "tcp://127.0.0.1:5580", "127.0.0.1:0")
    for name in ("broker", "risk", "api", "notifier"):
        assert p[name]["QF_MD_PUB"] == "tcp://127.0.0.1:5555,tcp://127.0.0.1:5565,tcp://127.0.0.1:5575"
        assert p[name]["QF_SYMBOLS"] == env["QF_SYMBOLS"] and "QF_INSTANCE" not in p[name]
    assert listener_env(qfconfig.load(env), env)["QF_STRATEGY_PUB"] == p["api"]["QF_STRATEGY_PUB"]


def test_ipc_paths_are_derived_and_one_group_changes_nothing(tmp_path):
    env = ipc_env(tmp_path, QF_SYMBOLS="btcusdt;ethusdt")
    md = env["QF_MD_PUB"]
    assert plan(env)["marketdata.2"]["QF_MD_PUB"] == md.replace("md.sock", "md-2.sock")
    single = ipc_env(tmp_path, QF_SYMBOLS="btcusdt,ethusdt")
    assert plan(single) == {name: single for name in ("broker", "risk", "api", "strategy", "notifier", "marketdata")}


@pytest.mark.parametrize("extra, why", [
    ({"QF_MD_PUB": "tcp://127.0.0.1:1,tcp://127.0.0.1:2,tcp://127.0.0.1:3"},
     "QF_MD_PUB lists 3 endpoints for 2 QF_SYMBOLS groups"),
    ({"QF_STRATEGY_PUB": "inproc://strategy"}, "over tcp:// or ipc:// only"),
    ({"QF_LOCKSTEP": "tcp://127.0.0.1:7000"}, "a lock-step replay runs one marketdata process"),
])
def test_a_grouping_the_settings_cannot_serve_is_one_clear_error(tmp_path, extra, why):
    env = {**tcp_env(tmp_path), "QF_SYMBOLS": "btcusdt;ethusdt", **extra}
    with pytest.raises(ConfigError, match=why):
        Stack(env)


def test_a_publisher_given_several_endpoints_refuses_to_start(tmp_path):
    with pytest.raises(ConfigError, match="a publishing process binds one"):
        Publisher("tcp://127.0.0.1:1,tcp://127.0.0.1:2", 1000)
    env = {**clean_environ(), **tcp_env(tmp_path, QF_MD_PUB="tcp://127.0.0.1:1,tcp://127.0.0.1:2",
                                        QF_FEED=f"replay:{SPOT_CAPTURE}")}
    out = subprocess.run([sys.executable, "-m", "services.cli", "marketdata"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2, out.stderr[-2000:]
    said = out.stdout + out.stderr
    assert "a publishing process binds one" in said and "Traceback" not in said, said[-2000:]


def beat(service: str, status: str = "ok", symbols: dict | None = None) -> Heartbeat:
    return Heartbeat(ts=1, service=service, pid=100, started_ts=5, status=status,
                     stats={"symbols": symbols} if symbols else None)


def test_a_service_in_several_processes_is_fresh_only_while_all_are():
    now = 100.0
    snap = Snapshot(now, 0.0, beats={"marketdata.1": Seen(now - 0.1, beat("marketdata.1")),
                                     "marketdata.2": Seen(now - 9.0, beat("marketdata.2", "reconnecting")),
                                     "risk": Seen(now - 0.2, beat("risk"))},
                    feeds={"BTCUSDT": ("SYNCED", ""), "ETHUSDT": ("SYNCED", "")},
                    feed_from={"BTCUSDT": "marketdata.1", "ETHUSDT": "marketdata.2"})
    view = services_view(snap, ("marketdata", "strategy", "risk"), stale_s=3.0)
    md = view["marketdata"]
    assert (md["fresh"], md["age_s"], md["status"]) == (False, 9.0, "marketdata.2 reconnecting")
    assert md["instances"]["marketdata.1"]["fresh"] and not md["instances"]["marketdata.2"]["fresh"]
    assert view["strategy"]["status"] == "no heartbeat" and "instances" not in view["risk"]
    feeds = feeds_view(snap, ("BTCUSDT", "ETHUSDT"), stale_s=3.0)
    assert feeds["BTCUSDT"]["synced"] and not feeds["ETHUSDT"]["synced"]  # its process went quiet


def test_the_status_line_names_each_marketdata_process_and_sums_their_books(tmp_path):
    env = tcp_env(tmp_path, QF_SYMBOLS="btcusdt;ethusdt")
    monitor = StatusMonitor(qfconfig.load(listener_env(qfconfig.load(env), env)))
    try:
        monitor.status.update({"marketdata.1": "ok", "marketdata.2": "resyncing", "strategy.1": "ok",
                               "strategy.2": "risk_silent"})
        monitor.stats.update({"marketdata.1": {"book_events": 10}, "marketdata.2": {"book_events": 5},
                              "strategy.1": {"signals": 3}, "strategy.2": {"signals": 4}})
        monitor.drain()
        line = monitor.line(8, 8)
        assert line.startswith("services 8/8 up (strategy.2 risk_silent) | feed marketdata.1 ok, marketdata.2 "
                               "resyncing | ")
        assert " | signals 7 | " in line
        assert monitor._rate_ref[1] == 15
        monitor.status["marketdata.2"] = "ok"
        assert " | feed ok (2 processes) | " in monitor.line(8, 8)
    finally:
        monitor.close()


def test_a_second_process_of_a_service_beats_under_its_own_name(tmp_path):
    """QF_INSTANCE names the heartbeat's topic and service and the liveness file (`qf health`)."""
    from shared.runtime import HeartbeatMaker, identity, liveness_path
    name = identity("marketdata", qfconfig.load({"QF_INSTANCE": "2"}).common.instance)
    maker = HeartbeatMaker(name)
    assert (maker.topic, maker.make("ok").service) == ("heartbeat.marketdata.2", "marketdata.2")
    assert liveness_path(str(tmp_path), name).name == "marketdata.2.alive"
    liveness_path(str(tmp_path), name).touch()
    env = {**clean_environ(), "QF_RUN_DIR": str(tmp_path), "QF_INSTANCE": "2"}
    out = subprocess.run([sys.executable, "-m", "services.cli", "health", "marketdata"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout == "marketdata: healthy\n"
    env["QF_INSTANCE"] = "3"
    assert subprocess.run([sys.executable, "-m", "services.cli", "health", "marketdata"], env=env,
                          capture_output=True, timeout=60).returncode == 1
    with pytest.raises(ConfigError, match="QF_INSTANCE"):
        qfconfig.load({"QF_INSTANCE": "a b"})


def test_a_young_watcher_waits_its_grace_for_every_process_of_a_split_service(tmp_path):
    """`qf status` and /health ask a fresh watcher: with one service in several processes it must
    not answer before each has beaten (it once listed strategy.2 alone)."""
    import threading
    import time

    from services.control.watch import BusWatch
    env = tcp_env(tmp_path, QF_SYMBOLS="btcusdt;ethusdt")
    cfg = qfconfig.load(listener_env(qfconfig.load(env), env))
    md1, md2 = (Publisher(ep, 1000) for ep in cfg.bus.md_pub.split(","))
    others = {name: Publisher(getattr(cfg.bus, f"{name}_pub"), 1000) for name in ("broker", "risk")}
    strategy = Publisher(cfg.bus.strategy_pub.split(",")[0], 1000)
    done = threading.Event()

    def beats():
        start = time.monotonic()
        while not done.wait(0.01):
            for pub, name in ((md1, "marketdata.1"), (others["broker"], "broker"), (others["risk"], "risk"),
                              (strategy, "strategy.1")):
                pub.publish(f"heartbeat.{name}", beat(name))
            if time.monotonic() - start > 0.1:  # the second marketdata process beats late
                md2.publish("heartbeat.marketdata.2", beat("marketdata.2"))
    thread = threading.Thread(target=beats, daemon=True)
    watch = BusWatch(cfg).start()
    thread.start()
    try:
        snap = watch.snapshot(wait=True)
        assert {"marketdata.1", "marketdata.2", "strategy.1", "risk", "broker"} <= set(snap.beats)
    finally:
        done.set()
        thread.join(5)
        watch.close()
        for pub in (md1, md2, strategy, *others.values()):
            pub.close()
