"""The notifier service in a thread: real ZeroMQ PUBs in, the fake Bot API on loopback out."""
from __future__ import annotations

import logging
import threading
import time

from decimal import Decimal

import pytest

from services.notifier.report import DAY_NS, slot_before
from services.notifier.service import NotifierService
from shared.db import EquitySnapshot, FillRow, database, init_db
from shared.config import load
from shared.enums import Side, TradingState
from shared.runtime import liveness_path
from tests.services.conftest import endpoints, wait_until
from tests.services.notifier.conftest import NS, SECRET, TOKEN, FakeStack, fill, risk_state

WAIT_S = 15.0  # three messages to one chat take two seconds (1 message/s)


@pytest.fixture
def env(tmp_path, fake_api):
    return {**endpoints(), "QF_RUN_DIR": str(tmp_path / "run"), "QF_DB": str(tmp_path / "qf.db"),
            "QF_TELEGRAM_TOKEN": TOKEN, "QF_TELEGRAM_CHAT_IDS": "42", "QF_TELEGRAM_API_URL": fake_api.url,
            "QF_NOTIFIER_BATCH_MS": "300", "QF_NOTIFIER_REPORT_AT": "", "QF_HEARTBEAT_MS": "100"}


class Running:
    def __init__(self, env: dict, clock=time.time_ns, **options) -> None:
        self.service = NotifierService(load(env), clock, sender_options={"read_timeout_s": 0.5, **options})
        self.thread = threading.Thread(target=self.service.run, daemon=True, name="notifier")
        self.thread.start()

    def stop(self, within_s: float = 8.0) -> float:
        started = time.monotonic()
        self.service.stop()
        self.thread.join(within_s)
        assert not self.thread.is_alive(), f"the notifier did not stop within {within_s}s"
        return time.monotonic() - started


@pytest.fixture
def stack(env):
    s = FakeStack(env)
    s.beat_state = risk_state(TradingState.ACTIVE)
    yield s
    s.close()


def heard_all(svc: NotifierService, env: dict) -> bool:
    return {env["QF_BROKER_PUB"], env["QF_RISK_PUB"]} <= svc.heard


def test_a_burst_of_fills_is_one_message_and_a_halt_another(env, stack, fake_api):
    run = Running(env)
    try:
        wait_until(lambda: heard_all(run.service, env), "the notifier to hear broker and risk", WAIT_S)
        for n, (side, price) in enumerate([(Side.BUY, "61234.5"), (Side.BUY, "61235"), (Side.SELL, "61240.1")]):
            stack.publish("QF_BROKER_PUB", "fill.BTCUSDT", fill(n, side, price))
        stack.beat_state = risk_state(TradingState.HALTED, "daily loss 2.1% [by risk]", "9790.12", "0.021")
        wait_until(lambda: len(fake_api.sends()) >= 3, "three messages at the fake Bot API", WAIT_S)
        stack.broker_pid = 1001  # the broker came back as another process
        wait_until(lambda: len(fake_api.sends()) >= 4, "the restart message", WAIT_S)
    finally:
        assert run.stop() < 5
    texts = fake_api.texts()
    assert texts[0].startswith("👋 QuantumFlow notifier is on.")
    assert [t for t in texts if "fill" in t.split("\n")[0]] == [
        "🔁 3 fills BTCUSDT\n🟢 BUY 0.001 @ 61,234.50 (taker)\n🟢 BUY 0.001 @ 61,235.00 (taker)\n"
        "🔴 SELL 0.001 @ 61,240.10 (taker)\nBought 0.002 @ avg 61,234.75 · sold 0.001 @ avg 61,240.10\n"
        "Fees 0.1837035 USDT"]
    assert [t for t in texts if t.startswith("⛔")] == [
        "⛔ Trading halted (was ACTIVE)\ndaily loss 2.1% [by risk]\nEquity 9,790.12 · drawdown 2.10%"]
    assert texts[3].startswith("🔄 broker restarted (pid 1000 → 1001")
    sends = fake_api.sends()
    assert all(b.at - a.at >= 0.99 for a, b in zip(sends, sends[1:])), "one message a second to a chat"


def test_a_429_is_honoured_before_the_next_try(env, stack, fake_api):
    fake_api.script.append(("429", 2))
    run = Running(env)
    try:
        wait_until(lambda: fake_api.sends(), "the hello to get through after the flood wait", WAIT_S)
    finally:
        run.stop()
    flood, again = fake_api.sends(None)[:2]
    assert flood.status == 429 and again.status == 200 and flood.text == again.text
    assert again.at - flood.answered_at >= 2.0, "the next try waits at least retry_after"


def test_timeouts_and_5xx_are_retried_with_backoff(env, stack, fake_api):
    fake_api.script.extend([("500",), ("slow", 3), ("500",)])
    run = Running(env)
    try:
        wait_until(lambda: len(tries := fake_api.sends(None)) >= 4 and tries[3].status == 200,
                   "the hello after a 500, a timeout and a 500", WAIT_S)
    finally:
        run.stop()
    tries = fake_api.sends(None)
    assert [tries[0].status, tries[2].status] == [500, 500] and len({r.text for r in tries}) == 1
    # the slow one was answered after the client had given up (0.5 s): it counts as lost, and is
    # resent — at least once, so Telegram may show such a message twice
    gaps = [b.at - a.at for a, b in zip(tries, tries[1:])]
    assert gaps[0] >= 1.0 and gaps[1] >= 0.5 + 2.0 and gaps[2] >= 4.0  # 1 s, then 2 s after the timeout, 4 s


def test_what_was_pending_at_a_stop_is_sent_after_the_restart(env, stack, fake_api):
    fake_api.default = ("500",)
    first = Running(env)
    try:
        wait_until(lambda: heard_all(first.service, env), "the notifier to hear broker and risk", WAIT_S)
        stack.publish("QF_BROKER_PUB", "fill.ETHUSDT", fill(7, Side.SELL, "3100.1", "0.05", symbol="ETHUSDT"))
        wait_until(lambda: first.service.outbox.pending() == 2, "the hello and the fill queued", WAIT_S)
    finally:
        first.stop()
    assert fake_api.sends() == []
    fake_api.default = "ok"
    second = Running(env)
    try:
        wait_until(lambda: len(fake_api.sends()) == 2, "both sent after the restart", WAIT_S)
    finally:
        second.stop()
    assert fake_api.texts()[1] == "🔴 Sold 0.05 ETHUSDT @ 3,100.10\nfee 0.0612345 USDT (taker)"


def test_the_daily_report_goes_out_as_a_photo_with_its_caption(env, stack, fake_api):
    minute_ago = time.time_ns() - 60 * NS
    at = time.strftime("%H:%M", time.gmtime(minute_ago / NS))
    slot = slot_before(minute_ago + DAY_NS, at)  # the report due once the clock below moves a day
    db = init_db(env["QF_DB"])
    for k in range(0, 24 * 6):  # an equity snapshot every 10 minutes of the report's 24 h
        e = Decimal(10000) + Decimal(k % 17) - Decimal(k // 12)
        EquitySnapshot.create(ts=slot - DAY_NS + k * 600 * NS, equity=e, cash=e)
    FillRow.create(fill_id="F1", order_id="O1", client_order_id="c1", symbol="BTCUSDT", side="BUY",
                   price=Decimal("61000"), qty=Decimal("0.01"), fee=Decimal("0.61"), fee_asset="USDT",
                   liquidity="TAKER", exch_ts=0, ts=slot - 3600 * NS)
    db.close()
    database.initialize(None)
    shift = [0]
    run = Running({**env, "QF_NOTIFIER_REPORT_AT": at}, clock=lambda: time.time_ns() + shift[0])
    try:
        wait_until(lambda: fake_api.sends(), "the hello", WAIT_S)
        assert [r.method for r in fake_api.sends()] == ["sendMessage"]  # no report at the first start
        shift[0] = DAY_NS
        wait_until(lambda: [r for r in fake_api.sends() if r.method == "sendPhoto"], "the report", WAIT_S)
    finally:
        run.stop()
    (photo,) = [r for r in fake_api.sends() if r.method == "sendPhoto"]
    day = time.strftime("%a", time.gmtime(slot / NS))
    assert photo.fields["caption"].startswith(f"📊 Daily report · 24 h to {day}")
    assert "Trades 1 · fills 1 · volume 610.00 USDT" in photo.fields["caption"]
    assert photo.files["photo"].startswith(b"\x89PNG")


def test_without_a_token_it_says_once_that_it_is_off_and_idles(env, caplog, fake_api):
    env = {**env, "QF_TELEGRAM_TOKEN": ""}
    caplog.set_level(logging.INFO)
    run = Running(env)
    path = liveness_path(env["QF_RUN_DIR"], "notifier")
    wait_until(path.exists, "the liveness file")
    assert run.thread.is_alive()
    assert run.stop() < 3
    off = [r for r in caplog.records if r.getMessage() == "notifier_off"]
    assert len(off) == 1 and off[0].reason == "QF_TELEGRAM_TOKEN is not set"
    assert fake_api.requests == [] and not path.exists()


def test_no_chat_is_off_too(env, caplog):
    caplog.set_level(logging.INFO)
    run = Running({**env, "QF_TELEGRAM_CHAT_IDS": ""})
    run.stop()
    assert [r.reason for r in caplog.records if r.getMessage() == "notifier_off"] == [
        "QF_TELEGRAM_CHAT_IDS is empty: no chat to write to"]


def test_the_token_stays_out_of_every_log_record_on_errors(env, stack, fake_api, caplog):
    caplog.set_level(logging.DEBUG)
    fake_api.script.extend([("500",), ("slow", 2)])
    run = Running(env)
    try:
        wait_until(lambda: fake_api.sends(), "the hello after a 500 and a timeout", WAIT_S)
    finally:
        run.stop()
    assert any(r.getMessage() == "telegram_unavailable" for r in caplog.records)
    assert SECRET not in caplog.text
    assert all(SECRET not in str(v) for r in caplog.records for v in vars(r).values())
