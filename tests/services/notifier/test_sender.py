"""The sender against the fake Bot API on loopback: real HTTP, real request and answer shapes."""
from __future__ import annotations

import asyncio
import io
import logging

import pytest

from services.notifier.sender import (BAD_TOKEN, MIGRATED, REFUSED, RETRY_AFTER, SENT, TRANSIENT, RedactingFilter,
                                      TelegramSender, api_urls, protect_logs, redactor)
from shared.log import KeyValueFormatter
from tests.services.notifier.conftest import SECRET, TOKEN


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def session(api, token=TOKEN, **kw):
    sender = TelegramSender(token, api.url, **kw)
    start = await sender.start()
    return sender, start


def test_messages_and_photos_go_out_in_the_bot_api_shapes(fake_api):
    async def go():
        sender, start = await session(fake_api)
        text = await sender.send(123456789, "🟢 Bought 0.001 BTCUSDT @ 61,234.50")
        photo = await sender.send(-1001234567890, "📊 Daily report", b"\x89PNG\r\n\x1a\n" + b"\0" * 2000)
        await sender.close()
        return start, text, photo
    start, text, photo = run(go())
    assert start.kind == SENT and start.detail == "@qf_test_bot"
    assert (text.kind, text.message_id, photo.kind, photo.message_id) == (SENT, 1, SENT, 2)
    me, msg, pic = fake_api.requests
    assert me.method == "getMe" and me.path == f"/bot{TOKEN}/getMe"
    assert msg.method == "sendMessage" and msg.content_type == "application/x-www-form-urlencoded"
    assert msg.fields["chat_id"] == "123456789" and msg.fields["text"] == "🟢 Bought 0.001 BTCUSDT @ 61,234.50"
    assert pic.method == "sendPhoto" and pic.content_type == "multipart/form-data"
    assert pic.fields == {"chat_id": "-1001234567890", "caption": "📊 Daily report"}
    assert pic.files["photo"].startswith(b"\x89PNG") and len(pic.files["photo"]) == 2008


def test_each_failure_has_its_outcome(fake_api):
    fake_api.script.extend([("429", 3), ("500",), ("slow", 5), ("400",), ("403",), ("migrate", -1009988776655)])

    async def go():
        sender, _ = await session(fake_api, read_timeout_s=0.3)
        out = [await sender.send(42, f"m{i}") for i in range(6)]
        await sender.close()
        return out
    flood, error, slow, bad, blocked, moved = run(go())
    assert flood.kind == RETRY_AFTER and flood.retry_after_s == 3
    assert error.kind == TRANSIENT and "Internal Server Error" in error.detail
    assert slow.kind == TRANSIENT and "TimedOut" in slow.detail
    assert bad.kind == REFUSED and "hat not found" in bad.detail
    assert blocked.kind == REFUSED and "blocked" in blocked.detail
    assert moved.kind == MIGRATED and moved.new_chat_id == -1009988776655


def test_no_server_is_transient_and_a_wrong_token_is_named_without_the_token():
    async def go():
        sender = TelegramSender(TOKEN, "http://127.0.0.1:9/bot", connect_timeout_s=0.5)  # port 9: nothing listens
        return await sender.start(), await sender.send(1, "x")
    start, send = run(go())
    assert start.kind == TRANSIENT and send.kind == TRANSIENT
    assert SECRET not in start.detail + send.detail


def test_a_token_the_server_does_not_know(fake_api):
    other = "123123123:AAHx1y2z3w4v5u6t7s8r9q0p1o2n3m4l5k6"

    async def go():
        sender = TelegramSender(other, fake_api.url)
        return await sender.start(), await sender.send(1, "x")
    start, send = run(go())
    assert start.kind == BAD_TOKEN and send.kind == BAD_TOKEN
    assert start.detail == "InvalidToken: The token `***` was rejected by the server."  # PTB's text names it
    assert other.partition(":")[2] not in start.detail + send.detail


def test_redaction_and_urls():
    redact = redactor(TOKEN)
    url = f"https://api.telegram.org/bot{TOKEN}/sendMessage"
    assert redact(url) == "https://api.telegram.org/bot***/sendMessage"
    assert redact(f"/bot987654321%3A{SECRET}/x") == "/bot987654321%3A***/x"  # the secret half, URL-encoded
    assert api_urls("https://api.telegram.org/bot") == ("https://api.telegram.org/bot",
                                                        "https://api.telegram.org/file/bot")
    assert api_urls("http://127.0.0.1:8081/bot/") == ("http://127.0.0.1:8081/bot", "http://127.0.0.1:8081/file/bot")


def test_the_token_never_reaches_a_log_line_even_at_debug_and_in_tracebacks(fake_api):
    """httpx logs every request URL at INFO, PTB its base URL at DEBUG: with protect_logs on,
    the root handler's output never holds the token, whatever the level."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(KeyValueFormatter("notifier"))
    root = logging.getLogger()
    old_level, old_handlers = root.level, root.handlers[:]
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG)
    undo = protect_logs(TOKEN)
    fake_api.script.extend([("500",), ("429", 1)])
    try:
        async def go():
            sender, _ = await session(fake_api, read_timeout_s=0.3)
            for i in range(3):
                await sender.send(42, f"m{i}")
            await sender.close()
        run(go())
        log = logging.getLogger("qf.notifier")
        log.info("url", extra={"url": f"https://api.telegram.org/bot{TOKEN}/getMe"})
        log.warning(f"the url was {fake_api.url}{TOKEN}/sendMessage")
        try:
            raise RuntimeError(f"failed at /bot{TOKEN}/sendPhoto")
        except RuntimeError:
            log.exception("boom")
    finally:
        undo()
        root.handlers[:] = old_handlers
        root.setLevel(old_level)
    text = out.getvalue()
    assert "event=url" in text and "event=boom" in text and "bot***/sendPhoto" in text
    assert SECRET not in text


def test_the_filter_leaves_other_records_alone():
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "sent %s", ("m1",), None)
    record.kind = "fills"
    assert RedactingFilter(redactor(TOKEN)).filter(record)
    assert record.getMessage() == "sent m1" and record.kind == "fills"


@pytest.mark.parametrize("value", ["", TOKEN])
def test_the_token_setting_is_a_secret(value):
    from shared import config
    cfg = config.load({"QF_TELEGRAM_TOKEN": value, "QF_TELEGRAM_CHAT_IDS": "1, -1001234567890,1"})
    assert cfg.notifier.telegram_chat_ids == ("1", "-1001234567890")
    assert cfg.effective()["QF_TELEGRAM_TOKEN"] == ("***" if value else "")
    assert SECRET not in repr(cfg)
    with pytest.raises(config.ConfigError) as err:
        config.load({"QF_TELEGRAM_TOKEN": TOKEN + "!"})
    assert SECRET not in str(err.value) and "QF_TELEGRAM_TOKEN" in str(err.value)
