"""Symbols split over two marketdata and two strategy processes (QF_SYMBOLS groups under `qf up`),
risk still the single gate and the single holder of positions."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from bench.common import free_port
from services.supervisor import Stack, StatusMonitor, listener_env
from shared import config as qfconfig
from tests.conftest import SPOT_CAPTURE, all_up, clean_environ, ipc_env, renamed_capture, running, tcp_env, wait_for
from tests.test_e2e import _db_rows, _get

pytestmark = pytest.mark.e2e

SYMBOLS = ("BTCUSDT", "ETHUSDT")


def _health(bind: str) -> tuple[int, dict | None]:
    """/health's status and body, a 503 included (urllib raises it)."""
    try:
        with urllib.request.urlopen(f"http://{bind}/health", timeout=2) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")
    except OSError:
        return 0, None


def _settings(tmp_path, transport: str) -> dict[str, str]:
    other = renamed_capture(SPOT_CAPTURE, tmp_path / "ethusdt.jsonl.gz", "ETHUSDT")
    extra = dict(QF_FEED=f"replay:{SPOT_CAPTURE},{other}", QF_REPLAY_SPEED="20", QF_REPLAY_LOOP="true",
                 QF_SYMBOLS="btcusdt;ethusdt", QF_STRATEGY_COOLDOWN_MS="100", QF_RISK_MAX_POSITION="0.002")
    if transport == "tcp":  # one endpoint per group, as a user gives them (the ipc ones are derived)
        extra["QF_MD_PUB"] = ",".join(f"tcp://127.0.0.1:{free_port()}" for _ in SYMBOLS)
        extra["QF_STRATEGY_PUB"] = ",".join(f"tcp://127.0.0.1:{free_port()}" for _ in SYMBOLS)
    return (tcp_env if transport == "tcp" else ipc_env)(tmp_path, **extra)


@pytest.mark.parametrize("transport", ["tcp", "ipc"])
def test_two_marketdata_and_two_strategies_trade_through_one_risk(tmp_path, transport):
    settings = _settings(tmp_path, transport)
    env = {**clean_environ(), **settings, "PYTHONUNBUFFERED": "1"}
    cfg = qfconfig.load(settings)
    stack = Stack(env, restart=False)
    names = [c.name for c in stack.children]
    assert names == ["broker", "risk", "api", "strategy.1", "strategy.2", "notifier", "marketdata.1",
                     "marketdata.2"]
    assert [stack.child(f"marketdata.{i}").env["QF_SYMBOLS"] for i in (1, 2)] == ["btcusdt", "ethusdt"]
    monitor = StatusMonitor(qfconfig.load(listener_env(cfg, settings)))
    with running(stack, monitor) as codes:
        bind = cfg.api.bind
        wait_for(lambda: _health(bind)[0] == 200, 40, "api /health = 200")

        def traded():
            rows = _db_rows(cfg.common.db, "select distinct symbol from fills")
            return {s for s, in rows} == set(SYMBOLS) or None
        wait_for(traded, 90, "fills of both symbols, each from its own strategy")
        # each strategy ordered its own group's symbol only: the orders' ids say whose they are
        orders = _db_rows(cfg.common.db, "select client_order_id, symbol from orders")
        prefixes = {}
        for coid, symbol in orders:
            prefixes.setdefault(coid.rsplit("-", 1)[0], set()).add(symbol)
        assert sorted(map(sorted, prefixes.values())) == [["BTCUSDT"], ["ETHUSDT"]], prefixes

        def risk_counts():  # one risk approved every order both strategies sent
            monitor.drain()
            stats = monitor.stats.get("risk", {})
            return stats if stats.get("approved", 0) >= len(orders) else None
        wait_for(risk_counts, 10, "risk heartbeat counting the approved orders")
        status, body = _get(bind, "/api/v1/status")
        assert status == 200
        md = body["services"]["marketdata"]
        assert md["fresh"] and set(md["instances"]) == {"marketdata.1", "marketdata.2"}
        assert set(body["services"]["strategy"]["instances"]) == {"strategy.1", "strategy.2"}
        assert all(body["feeds"][s]["synced"] for s in SYMBOLS)
        assert set(body["positions"]) <= set(SYMBOLS)
        wait_for(lambda: monitor.drain() or {"marketdata.1", "marketdata.2"} <= set(monitor.status), 10,
                 "both marketdata heartbeats on the status line")
        assert " | feed ok (2 processes) | " in monitor.line(8, 8) or "marketdata.2 " in monitor.line(8, 8)

        # one marketdata process gone: its symbol's feed is not synced, so /health says so
        stack.kill("marketdata.2")
        _, body = wait_for(lambda: (h := _health(bind))[0] == 503 and h, 15, "/health = 503 with marketdata.2 dead")
        assert not body["services"]["marketdata"]["fresh"]
        assert body["services"]["marketdata"]["instances"]["marketdata.1"]["fresh"]
        assert body["feeds"]["BTCUSDT"]["synced"] and not body["feeds"]["ETHUSDT"]["synced"]
        assert any(p.startswith("marketdata: last heartbeat") for p in body["problems"]), body["problems"]
        all_up(stack, but=("marketdata.2",))
    codes.pop("marketdata.2")
    assert codes == {name: 0 for name in codes}, codes
