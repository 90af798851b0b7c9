"""The whole pipeline with CURVE on over tcp: every service as a process, keys from `qf keys`, trades end to end."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from services.control.risk import ask_risk
from services.supervisor import Stack, StatusMonitor
from shared import config as qfconfig
from shared import curve
from shared.bus import Subscriber
from shared.enums import ControlAction
from tests.conftest import ROOT, SPOT_CAPTURE, all_up, clean_environ, running, tcp_env, wait_for
from tests.test_e2e import _db_rows, _get

pytestmark = pytest.mark.e2e


def test_replay_trades_end_to_end_with_curve_on(tmp_path):
    keys = tmp_path / "keys"
    assert subprocess.run([sys.executable, "-m", "services.cli", "keys", str(keys)], cwd=ROOT,
                          capture_output=True, timeout=60).returncode == 0
    settings = tcp_env(tmp_path, QF_FEED=f"replay:{SPOT_CAPTURE}", QF_REPLAY_SPEED="20", QF_REPLAY_LOOP="true",
                       QF_STRATEGY_COOLDOWN_MS="100", QF_RISK_MAX_POSITION="0.002", QF_CURVE_KEYS=str(keys))
    cfg = qfconfig.load(settings)
    stack = Stack({**clean_environ(), **settings, "PYTHONUNBUFFERED": "1"})
    monitor = StatusMonitor(cfg)  # as `qf up` runs it: the API's key
    outsider = Subscriber(cfg.bus.md_pub, ["book."], 1000)  # no key: it must hear nothing
    with running(stack, monitor, outsider) as codes:
        bind = cfg.api.bind
        wait_for(lambda: _get(bind, "/health")[0] == 200, 30, "api /health = 200 (every heartbeat heard over CURVE)")
        fills = wait_for(lambda: _db_rows(cfg.common.db, "select fill_id, qty from fills"), 60, "fills in the database")
        orders = _db_rows(cfg.common.db, "select client_order_id from orders")

        def risk_counts():
            monitor.drain()
            stats = monitor.stats.get("risk", {})
            return stats if stats.get("approved", 0) >= len(orders) else None
        stats = wait_for(risk_counts, 10, "risk heartbeat counting the approved orders")
        assert stats["forbidden"] == 0 and stats["curve_refused"] == 0
        assert monitor.stats["broker"]["curve_refused"] == 0
        status, trades = _get(bind, "/api/v1/trades?limit=1000")
        assert status == 200 and {fid for fid, _ in fills} <= {t["fill_id"] for t in trades["trades"]}
        # control through the API's key (the CLI's control layer: services/control/risk.py)
        assert ask_risk(cfg, ControlAction.STATE, "test", "curve e2e")["state"] == "ACTIVE"
        assert outsider.sock.poll(0) == 0 and not outsider.sock.poll(500)  # books flow, but not to it
        all_up(stack)
    assert codes == {name: 0 for name in codes}, codes


def test_qf_up_names_a_missing_key_once_and_starts_nothing(tmp_path):
    keys = tmp_path / "keys"
    curve.make_keys(keys)
    curve.secret_path(keys, "api").unlink()
    env = {**clean_environ(), **tcp_env(tmp_path, QF_CURVE_KEYS=str(keys)), "PYTHONUNBUFFERED": "1"}
    out = subprocess.run([sys.executable, "-m", "services.cli", "up", "--feed", f"replay:{SPOT_CAPTURE}"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stdout[-2000:]
    problem = [line for line in out.stdout.splitlines() if "QF_CURVE_KEYS" in line]
    assert problem == [f"qf up      | QF_CURVE_KEYS: {curve.secret_path(keys, 'api')}: no such file "
                       "(`qf keys DIR` makes the keys)"], out.stdout
    assert not re.search(r"^broker\s+\|", out.stdout, re.MULTILINE), out.stdout  # no service was started
