"""Telegram through python-telegram-bot: one message out, one outcome back; the token never in a text.

The Bot API puts the token in every URL (`…/bot<token>/sendMessage`), and the libraries
under it quote URLs freely: httpx logs each request's URL at INFO, PTB logs its base URL
at DEBUG and names the token in `InvalidToken` ("The token `…` was rejected"), and an
httpx error's request carries the URL. So: `redactor(token)` cuts it (and its secret half,
which survives URL-encoding of the `:`) out of any text; every outcome's `detail` goes
through it; `RedactingFilter` does the same for every log record that reaches the root
handlers; and the httpx/httpcore/telegram loggers stay at WARNING, where they do not
quote URLs. `classify` is the one place that decides what an exception means (websockets'
`process_exception`): sent, wait (429 retry_after), retry later (timeouts, 5xx, no
connection), refused for good (400, 403), moved (a group became a supergroup), or a
token Telegram does not know."""
from __future__ import annotations

import logging
import os
import traceback
from dataclasses import dataclass
from typing import Callable

from telegram import Bot, LinkPreviewOptions
from telegram.error import BadRequest, ChatMigrated, Forbidden, InvalidToken, RetryAfter
from telegram.request import HTTPXRequest

from shared.config import mask_secrets

log = logging.getLogger("qf.notifier")

# PTB 22's documented opt-in: time periods (a 429's retry_after) as timedelta, as its next major
# version has them, instead of an int and a deprecation warning at every 429. Read per call.
os.environ.setdefault("PTB_TIMEDELTA", "true")

# Seconds. A message is a few hundred bytes; a report's PNG about 100 kB.
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 20.0
WRITE_TIMEOUT_S = 20.0
MEDIA_WRITE_TIMEOUT_S = 60.0
CHATTY_LOGGERS = ("httpx", "httpcore", "telegram", "hpack")
NO_PREVIEW = LinkPreviewOptions(is_disabled=True)  # an alert naming a URL stays one line

SENT, RETRY_AFTER, TRANSIENT, REFUSED, MIGRATED, BAD_TOKEN = (
    "sent", "retry_after", "transient", "refused", "migrated", "bad_token")


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one request. `kind`: SENT, RETRY_AFTER (wait `retry_after_s` before the
    chat's next), TRANSIENT (the server or the network failed: try again later), REFUSED (no
    retry can fix it: drop the message), MIGRATED (send to `new_chat_id`), BAD_TOKEN (the
    server does not know the token). `detail` is safe to log (the token cut out)."""
    kind: str
    detail: str = ""
    retry_after_s: float = 0.0
    new_chat_id: int | None = None
    message_id: int | None = None


def redactor(token: str) -> Callable[[str], str]:
    """A function that cuts `token`, and its secret part after the `:`, out of a text (URL
    credentials too, by shared.config.mask_secrets)."""
    secrets = [s for s in (token, token.partition(":")[2]) if len(s) >= 8]

    def redact(text: str) -> str:
        for s in secrets:
            if s in text:
                text = text.replace(s, "***")
        return mask_secrets(text)
    return redact


def api_urls(api_url: str) -> tuple[str, str]:
    """QF_TELEGRAM_API_URL (`https://api.telegram.org/bot`) → PTB's base_url and base_file_url
    (`https://api.telegram.org/file/bot`); the token is appended to both by PTB."""
    base = api_url.rstrip("/")
    root = base[:-len("/bot")] if base.endswith("/bot") else base
    return base, root + "/file/bot"


def classify(exc: BaseException, redact: Callable[[str], str]) -> Outcome:
    """An exception from a Bot call → its Outcome (the only place that decides)."""
    detail = redact(f"{type(exc).__name__}: {exc}")[:300]
    if isinstance(exc, RetryAfter):
        ra = exc.retry_after
        seconds = ra.total_seconds() if hasattr(ra, "total_seconds") else float(ra)
        return Outcome(RETRY_AFTER, detail, retry_after_s=max(0.0, seconds))
    if isinstance(exc, ChatMigrated):
        return Outcome(MIGRATED, detail, new_chat_id=int(exc.new_chat_id))
    if isinstance(exc, InvalidToken):
        return Outcome(BAD_TOKEN, detail)
    if isinstance(exc, (Forbidden, BadRequest)):  # BadRequest is a NetworkError: asked first
        return Outcome(REFUSED, detail)
    # TimedOut, NetworkError (5xx, no connection), any other TelegramError, and anything else
    # (a library bug): retried with backoff, never fatal
    return Outcome(TRANSIENT, detail)


class TelegramSender:
    """The Bot API client. Use from one asyncio loop: `await start()`, `await send(...)`,
    `await close()`."""

    def __init__(self, token: str, api_url: str, connect_timeout_s: float = CONNECT_TIMEOUT_S,
                 read_timeout_s: float = READ_TIMEOUT_S, write_timeout_s: float = WRITE_TIMEOUT_S,
                 media_write_timeout_s: float = MEDIA_WRITE_TIMEOUT_S) -> None:
        self.redact = redactor(token)
        base_url, base_file_url = api_urls(api_url)
        self.api_url = base_url
        request = HTTPXRequest(connection_pool_size=4, connect_timeout=connect_timeout_s,
                               read_timeout=read_timeout_s, write_timeout=write_timeout_s,
                               media_write_timeout=media_write_timeout_s, pool_timeout=connect_timeout_s)
        self.bot = Bot(token, base_url=base_url, base_file_url=base_file_url, request=request,
                       get_updates_request=HTTPXRequest(connection_pool_size=1))
        self.username = ""

    async def start(self) -> Outcome:
        """Open the connection pool and ask getMe: SENT (the token works), BAD_TOKEN, or TRANSIENT."""
        try:
            await self.bot.initialize()
        except Exception as exc:  # noqa: BLE001 - every failure becomes an outcome
            return classify(exc, self.redact)
        self.username = self.bot.username or ""
        return Outcome(SENT, f"@{self.username}")

    async def send(self, chat_id: int, text: str, photo: bytes | None = None) -> Outcome:
        """sendMessage, or sendPhoto with `text` as the caption when `photo` is given."""
        try:
            if photo is None:
                msg = await self.bot.send_message(chat_id, text, link_preview_options=NO_PREVIEW)
            else:
                msg = await self.bot.send_photo(chat_id, photo, caption=text)
        except Exception as exc:  # noqa: BLE001 - every failure becomes an outcome
            return classify(exc, self.redact)
        return Outcome(SENT, message_id=msg.message_id)

    async def close(self) -> None:
        try:
            await self.bot.shutdown()
        except Exception as exc:  # noqa: BLE001 - closing must not fail a stop
            log.warning("telegram_close_failed", extra={"error": self.redact(str(exc))})


class RedactingFilter(logging.Filter):
    """Cuts the token out of a log record before any handler formats it: the message and its
    arguments, every extra field, and a traceback (kept as the `traceback` field, redacted)."""

    def __init__(self, redact: Callable[[str], str]) -> None:
        super().__init__()
        self.redact = redact

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self.redact(record.getMessage())
        record.args = None
        for key, value in list(record.__dict__.items()):
            if isinstance(value, str) and key not in ("msg", "name", "levelname", "pathname", "filename",
                                                      "module", "funcName", "threadName", "processName"):
                record.__dict__[key] = self.redact(value)
        if record.exc_info:
            record.__dict__["traceback"] = self.redact("".join(traceback.format_exception(*record.exc_info)))
            record.exc_info, record.exc_text = None, None
        return True


def protect_logs(token: str) -> Callable[[], None]:
    """Keep `token` out of this process's log output: quiet the HTTP libraries' loggers and put
    a RedactingFilter on every root handler. Returns a function that undoes it."""
    redact = redactor(token)
    levels = {}
    for name in CHATTY_LOGGERS:
        lg = logging.getLogger(name)
        levels[name] = lg.level
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    filt = RedactingFilter(redact)
    handlers = list(logging.getLogger().handlers)
    for h in handlers:
        h.addFilter(filt)

    def undo() -> None:
        for h in handlers:
            h.removeFilter(filt)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
    return undo
