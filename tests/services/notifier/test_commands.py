"""Telegram commands through POST /telegram/webhook: forged calls refused, replies on the fake Bot API,
/halt and /flatten through a real risk service, `qf telegram set-webhook`."""
from __future__ import annotations

import json
import threading
from decimal import Decimal

import pytest

from services.api.app import create_app
from services.cli import main as qf_main
from services.notifier import commands
from services.risk.service import RiskService
from shared.config import load
from shared import aggregates
from shared.db import FillRow, close_db, init_db
from tests.services.api.test_control import settings
from tests.services.notifier.conftest import TOKEN
from tests.services.notifier.fake_bot_api import FakeBotApi

SECRET = "webhook-secret-for-tests_0123"
CHAT, STRANGER = 424242, 999
NS = 1_000_000_000


def env(tmp_path, fake: FakeBotApi, **extra) -> dict[str, str]:
    return settings(tmp_path, **{"QF_TELEGRAM_TOKEN": TOKEN, "QF_TELEGRAM_API_URL": fake.url,
                                 "QF_TELEGRAM_WEBHOOK_SECRET": SECRET, "QF_NOTIFIER_REPORT_AT": "21:00",
                                 "QF_TELEGRAM_ALLOWED_CHATS": f"{CHAT},-1001234567890", **extra})


def update(text: str, chat: int = CHAT, n: int = 1) -> dict:
    return {"update_id": 1000 + n, "message": {"message_id": n, "date": 1765400000, "text": text,
                                               "chat": {"id": chat, "type": "private", "first_name": "T"},
                                               "from": {"id": chat, "is_bot": False, "first_name": "T"}}}


class Clock:
    def __init__(self, now: int = 1_765_400_000 * NS) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def cfg(tmp_path, fake_api):
    return load(env(tmp_path, fake_api))


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def api(cfg, clock):
    return create_app(cfg, clock).test_client()


@pytest.fixture
def risk(cfg):
    svc = RiskService(cfg)
    thread = threading.Thread(target=svc.run, name="risk", daemon=True)
    thread.start()
    try:
        yield svc
    finally:
        svc.stop()
        thread.join(5)
        assert not thread.is_alive()


@pytest.fixture
def fills(cfg):
    """Two fills in the database the API reads."""
    database = init_db(cfg.common.db)
    with database.bind_ctx([FillRow]):
        for n, (side, qty, price) in enumerate((("BUY", "0.002", "61234.5"), ("SELL", "0.001", "61300"))):
            ts = 1_765_390_000 * NS + n * NS
            FillRow.create(fill_id=f"f{n}", order_id=f"o{n}", client_order_id=f"c{n}", symbol="BTCUSDT",
                           side=side, price=Decimal(price), qty=Decimal(qty), fee=Decimal("0.06"),
                           fee_asset="USDT", liquidity="TAKER", exch_ts=ts // 1_000_000, ts=ts)
    aggregates.rebuild()  # the rows the broker keeps beside its fills
    yield
    database.close()
    close_db()


def post(api, body, secret: str | None = SECRET):
    headers = {} if secret is None else {"X-Telegram-Bot-Api-Secret-Token": secret}
    return api.post("/telegram/webhook", json=body, headers=headers)


def test_forged_calls_are_refused_and_nothing_is_done(risk, api, fake_api):
    for secret in (None, "", "wrong-secret-of-the-right-shape", SECRET + "x"):
        resp = post(api, update("/halt forged"), secret)
        assert resp.status_code == 403 and resp.get_json()["error"]["code"] == "forbidden"
    resp = post(api, update("/halt from a stranger", chat=STRANGER))
    assert resp.status_code == 200 and resp.get_json() == {}
    assert post(api, update("/flatten", chat=STRANGER)).status_code == 200
    assert post(api, update("/flatten confirm", chat=STRANGER)).status_code == 200
    assert risk.engine.state.value == "ACTIVE"  # nothing reached risk
    assert fake_api.requests == []  # and nobody was answered


def test_the_webhook_is_off_without_its_secret(tmp_path, fake_api, risk):
    app = create_app(load(env(tmp_path, fake_api, QF_TELEGRAM_WEBHOOK_SECRET=""))).test_client()
    resp = post(app, update("/halt x"), "")
    assert resp.status_code == 403 and resp.get_json()["error"]["code"] == "telegram_disabled"
    assert risk.engine.state.value == "ACTIVE" and fake_api.requests == []


def test_a_bad_body_is_refused(api, fake_api):
    resp = api.post("/telegram/webhook", data=b'{"message": {"chat": {"id": 1}, "chat": {}}}',
                    content_type="application/json", headers={"X-Telegram-Bot-Api-Secret-Token": SECRET})
    assert resp.status_code == 400
    assert fake_api.requests == []


def test_status_positions_trades_and_help_are_answered(api, fake_api, fills):
    for n, text in enumerate(("/status", "/positions@qf_test_bot", "/trades 1", "/pnl", "/report", "/help",
                              "/trades 0", "/nonsense", "just chatting"), 1):
        assert post(api, update(text, n=n)).status_code == 200
    sent = fake_api.sends()
    assert [r.chat_id for r in sent] == [CHAT] * 8  # "just chatting" is not a command: no answer
    status, positions, trades, pnl, report, help_, usage, unknown = [r.text for r in sent]
    assert status.splitlines() == ["Trading ACTIVE", "Equity -", "Fills 2 · orders: none",
                                   "Positions BTCUSDT 0.001"]
    assert positions == "BTCUSDT 0.001 @ avg 61,234.5 · realized +0.07 · 2 fills"
    assert trades == "10 Dec 18:06:41 UTC SELL 0.001 BTCUSDT @ 61,300.00 fee 0.06 USDT"
    assert pnl.splitlines()[0] == "Realized P&L +0.07 (before fees)" and "Fees 0.12" in pnl
    assert report == "The daily report comes at 21:00 UTC."
    assert help_.startswith("QuantumFlow commands") and "/flatten" in help_
    assert usage == "Usage: /trades [N], N from 1 to 30."
    assert unknown == "Unknown command /nonsense. /help lists them."


def test_halt_and_resume_change_risks_state(risk, api, fake_api):
    assert post(api, update("/halt drill from the phone")).status_code == 200
    assert risk.engine.state.value == "HALTED"
    assert post(api, update("/resume", n=2)).status_code == 200
    assert risk.engine.state.value == "ACTIVE"
    halted, resumed = fake_api.texts()
    assert halted.startswith("Risk: HALTED — drill from the phone") and halted.endswith("Positions flat")
    assert resumed.startswith("Risk: ACTIVE — /resume from Telegram")


def test_flatten_needs_its_confirmation_within_a_minute(risk, api, fake_api, clock):
    post(api, update("/flatten confirm"))  # nothing asked yet
    post(api, update("/flatten", n=2))
    assert risk.engine.state.value == "ACTIVE"
    clock.now += 61 * NS
    post(api, update("/flatten confirm", n=3))  # too late
    assert risk.engine.state.value == "ACTIVE"
    post(api, update("/flatten", chat=-1001234567890, n=4))  # another chat's question...
    post(api, update("/flatten", n=5))
    clock.now += 59 * NS
    post(api, update("/flatten confirm", n=6))  # ...and this chat's answer, in time
    assert risk.engine.state.value == "REDUCING"
    texts = fake_api.texts()
    assert texts[0].startswith("Nothing to confirm") and texts[2].startswith("Nothing to confirm")
    assert texts[1] == "Reply /flatten confirm within 60 s to close every position."
    assert texts[5].startswith("Risk: REDUCING")


def test_risk_down_is_a_polite_line(api, fake_api):
    post(api, update("/halt nobody home"))
    assert fake_api.texts() == ["Risk is not answering; nothing was done."]


def test_handle_ignores_commands_for_another_bot():
    assert commands.handle(update("/status@other_bot"), None, 0, {}, bot_username="qf_test_bot") == []
    assert commands.parse({"edited_message": {"chat": {"id": 1}, "text": "/halt"}}) is None


class WebhookFake(FakeBotApi):
    """The fake Bot API, also taking setWebhook (answered `true`)."""

    def _handle(self, h) -> None:
        if not h.path.endswith("/setWebhook"):
            return super()._handle(h)
        from tests.services.notifier.fake_bot_api import Request, _parse
        import time
        body = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        fields, files = _parse(h.headers.get("Content-Type", ""), body)
        req = Request("setWebhook", h.path, "", fields, files, time.monotonic())
        with self._lock:
            self.requests.append(req)
        ok = h.path == f"/bot{self.token}/setWebhook"
        self._answer(h, req, 200 if ok else 404, {"ok": True, "result": True} if ok else
                     {"ok": False, "error_code": 404, "description": "Not Found"})


@pytest.fixture
def webhook_fake():
    api = WebhookFake(TOKEN)
    yield api
    api.close()


def test_set_webhook_registers_url_secret_and_message_updates(tmp_path, webhook_fake, monkeypatch, capsys):
    for k, v in env(tmp_path, webhook_fake).items():
        monkeypatch.setenv(k, v)
    assert qf_main(["telegram", "set-webhook", "https://qf.example.org/telegram/webhook"]) == 0
    assert capsys.readouterr().out.startswith("webhook set: https://qf.example.org/telegram/webhook")
    (req,) = webhook_fake.requests
    assert req.method == "setWebhook" and req.fields["url"] == "https://qf.example.org/telegram/webhook"
    assert req.fields["secret_token"] == SECRET and json.loads(req.fields["allowed_updates"]) == ["message"]


def test_set_webhook_bad_input_and_failure(tmp_path, webhook_fake, monkeypatch, capsys):
    for k, v in env(tmp_path, webhook_fake).items():
        monkeypatch.setenv(k, v)
    assert qf_main(["telegram", "set-webhook", "http://qf.example.org/telegram/webhook"]) == 2
    monkeypatch.setenv("QF_TELEGRAM_WEBHOOK_SECRET", "")
    assert qf_main(["telegram", "set-webhook", "https://qf.example.org/x"]) == 2
    assert "QF_TELEGRAM_WEBHOOK_SECRET is not set" in capsys.readouterr().err
    assert webhook_fake.requests == []
    monkeypatch.setenv("QF_TELEGRAM_WEBHOOK_SECRET", SECRET)
    monkeypatch.setenv("QF_TELEGRAM_TOKEN", "123456789:" + "B" * 35)  # a token the server does not know
    assert qf_main(["telegram", "set-webhook", "https://qf.example.org/x"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("qf: setWebhook failed:") and "B" * 35 not in err and len(err.splitlines()) == 1
