"""`qf notifier` as a real process: killed with messages pending, it sends them after its restart;
no token, it says so once and idles; the token is in none of its output, even on errors."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys

import pytest

from services.notifier.outbox import FILE
from shared.enums import Side, TradingState
from tests.conftest import ROOT, clean_environ, stop_process, tcp_env, wait_for
from tests.services.notifier.conftest import SECRET, TOKEN, FakeStack, fill, risk_state

WAIT_S = 20.0  # a process start (imports, matplotlib not among them) plus a few messages at 1/s


class Notifier:
    """One `qf notifier` process, its output (stdout and stderr) in a file."""

    def __init__(self, env: dict[str, str], out_path) -> None:
        self.out_path = out_path
        self.out = open(out_path, "a")
        self.proc = subprocess.Popen([sys.executable, "-m", "services.cli", "notifier"], env=env, cwd=ROOT,
                                     stdout=self.out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def text(self) -> str:
        with open(self.out_path) as fh:
            return fh.read()

    def lines(self, event: str) -> list[str]:
        return [line for line in self.text().splitlines() if f"event={event} " in line + " "]

    def close(self) -> int:
        code = stop_process(self.proc)
        self.out.close()
        return code


@pytest.fixture
def env(tmp_path, fake_api):
    return {**clean_environ(), **tcp_env(tmp_path), "QF_TELEGRAM_TOKEN": TOKEN, "QF_TELEGRAM_CHAT_IDS": "42",
            "QF_TELEGRAM_API_URL": fake_api.url, "QF_NOTIFIER_BATCH_MS": "300", "QF_NOTIFIER_REPORT_AT": "",
            "PYTHONUNBUFFERED": "1"}


def pending(run_dir: str) -> int:
    path = os.path.join(run_dir, FILE)
    if not os.path.exists(path):
        return 0
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as con:
        return con.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]


def test_killed_with_messages_pending_it_resends_them_after_the_restart(env, fake_api, tmp_path):
    fake_api.default = ("500",)  # Telegram is down: nothing leaves the outbox
    stack = FakeStack(env)
    stack.beat_state = risk_state(TradingState.ACTIVE)
    out = tmp_path / "notifier.out"
    first = Notifier(env, out)
    try:
        wait_for(lambda: len(first.lines("bus_heard")) >= 2, WAIT_S, "the notifier to hear broker and risk")
        for n, side in enumerate((Side.BUY, Side.BUY, Side.SELL)):
            stack.publish("QF_BROKER_PUB", "fill.BTCUSDT", fill(n, side))
        stack.beat_state = risk_state(TradingState.HALTED, "manual stop [by api]")
        wait_for(lambda: pending(env["QF_RUN_DIR"]) == 3, WAIT_S, "hello, the fills and the halt queued")
        wait_for(lambda: fake_api.sends(None), WAIT_S, "a first attempt at Telegram")
        first.proc.send_signal(signal.SIGKILL)
        assert first.proc.wait(10) == -9
        first.close()
        assert fake_api.sends() == [] and pending(env["QF_RUN_DIR"]) == 3

        fake_api.default = "ok"
        second = Notifier(env, out)
        try:
            wait_for(lambda: len(fake_api.sends()) >= 3, WAIT_S, "the three pending messages sent")
            wait_for(lambda: pending(env["QF_RUN_DIR"]) == 0, WAIT_S, "the outbox emptied")
        finally:
            assert second.close() == 0  # SIGTERM: a clean stop
    finally:
        stack.close()
    texts = fake_api.texts()
    assert len(texts) == 3 and texts[0].startswith("👋") and texts[1].startswith("⛔ Trading halted")
    assert texts[2].startswith("🔁 3 fills BTCUSDT")
    output = first.text()
    assert "event=telegram_unavailable" in output and "event=sent" in output
    assert SECRET not in output


def test_without_a_token_it_says_once_that_it_is_off_and_idles_until_stopped(env, fake_api, tmp_path):
    env = {**env, "QF_TELEGRAM_TOKEN": ""}
    proc = Notifier(env, tmp_path / "notifier.out")
    alive = os.path.join(env["QF_RUN_DIR"], "notifier.alive")
    try:
        wait_for(lambda: proc.lines("notifier_off"), WAIT_S, "the notifier to say it is off")
        wait_for(lambda: os.path.exists(alive), WAIT_S, "its liveness file (qf health notifier)")
        health = subprocess.run([sys.executable, "-m", "services.cli", "health", "notifier"], env=env, cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
        assert health.returncode == 0, health.stdout + health.stderr
        assert proc.proc.poll() is None  # idles: `qf up` would restart a child that exits
    finally:
        assert proc.close() == 0
    (line,) = proc.lines("notifier_off")
    assert 'reason="QF_TELEGRAM_TOKEN is not set"' in line
    assert fake_api.requests == []


def test_a_token_telegram_refuses_is_said_without_the_token(env, fake_api, tmp_path):
    wrong = "555000111:AAGwrongwrongwrongwrongwrongwrong12"
    proc = Notifier({**env, "QF_TELEGRAM_TOKEN": wrong}, tmp_path / "notifier.out")
    try:
        wait_for(lambda: proc.lines("telegram_token_rejected"), WAIT_S, "the notifier to say the token was refused")
    finally:
        assert proc.close() == 0
    output = proc.text()
    assert wrong.partition(":")[2] not in output and "QF_TELEGRAM_TOKEN=***" in output
    assert [r.status for r in fake_api.requests] == [404]  # getMe, then it waits (TOKEN_RETRY_S)
