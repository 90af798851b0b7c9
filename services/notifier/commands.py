"""Telegram commands (issue #15): a Bot API Update in, reply texts out, through the control layer.

The third door to the one control room (services/control), beside the REST views and `qf status|…`.
`handle()` reads no clock and holds no socket: the API's `POST /telegram/webhook` view checks the
secret and the chat, passes the time in, and sends what comes back with `send_replies`
(python-telegram-bot's sendMessage, QF_TELEGRAM_API_URL). `/flatten` closes every position, so
it asks first: only `/flatten confirm` from the same chat within CONFIRM_S acts. The pending
confirmations live in the dict the caller keeps (one per API process: with several gunicorn
workers a confirmation that reaches another worker is simply asked for again).

`qf telegram set-webhook URL` registers the webhook with Telegram (setWebhook, the secret token,
message updates only)."""
from __future__ import annotations

import argparse
import asyncio
import re
import sys
from decimal import Decimal
from typing import Any

from services.control import Control, RiskRefused, RiskUnreachable
from services.control.dbreader import DatabaseUnavailable
from services.notifier.text import clip, number, price, signed, utc
from shared.config import Config

CONFIRM_S = 60
TRADES_DEFAULT, TRADES_MAX = 10, 30
REASON_MAX = 500
SEND_TIMEOUT_S = 5.0  # a webhook's replies: Telegram waits for the view's 200 meanwhile

# `/cmd`, `/cmd@botname`, then the rest of the line
_COMMAND = re.compile(r"/(?P<cmd>[A-Za-z_]{1,32})(?:@(?P<bot>[A-Za-z0-9_]{1,64}))?(?:\s+(?P<rest>.*))?$", re.DOTALL)

HELP = """QuantumFlow commands
/status – trading state, equity, orders, positions
/pnl – realized P&L, fees, equity
/positions – positions by symbol
/trades [N] – the latest N fills (default 10, at most 30)
/halt [reason] – stop all trading (only cancels pass)
/resume [reason] – trade again
/flatten – close every position (asks for /flatten confirm)
/report – when the daily report comes
/help – this list"""


def parse(update: dict) -> tuple[int, str] | None:
    """(chat id, text) of an Update's `message`, or None for anything else (an edited message,
    a photo, a channel post: not commands).

        {"update_id": 10, "message": {"message_id": 5, "date": 1765400000,
         "chat": {"id": 123456, "type": "private"}, "text": "/trades@qf_bot 5"}}"""
    msg = update.get("message")
    if not isinstance(msg, dict):
        return None
    chat, text = msg.get("chat"), msg.get("text")
    if not isinstance(chat, dict) or not isinstance(text, str):
        return None
    chat_id = chat.get("id")
    if isinstance(chat_id, Decimal) and chat_id == chat_id.to_integral_value():  # the API's strict reader
        chat_id = int(chat_id)
    if not isinstance(chat_id, int) or isinstance(chat_id, bool):
        return None
    return chat_id, text


def handle(update: dict, control: Control, now_ns: int, pending: dict[int, int],
           report_at: str = "", bot_username: str = "") -> list[str]:
    """The replies to one Update from an allowed chat (none for a message that is not a command,
    or a command addressed to another bot). `pending` maps chat id → the ns deadline of an asked
    `/flatten confirm`; it is read and updated here. Risk's and the database's failures become a
    line for the person; nothing raises for them."""
    parsed = parse(update)
    if parsed is None:
        return []
    chat_id, text = parsed
    m = _COMMAND.match(text.strip())
    if m is None:
        return []
    if m["bot"] and bot_username and m["bot"].lower() != bot_username.lower():
        return []  # `/status@otherbot` in a group: not ours
    cmd, rest, by = m["cmd"].lower(), (m["rest"] or "").strip(), f"telegram:{chat_id}"
    if cmd != "flatten":
        pending.pop(chat_id, None)  # any other command withdraws an asked flatten
    try:
        if cmd in ("help", "start"):
            return [HELP]
        if cmd == "status":
            return [status_text(control.status())]
        if cmd == "pnl":
            return [pnl_text(control.pnl())]
        if cmd == "positions":
            return [positions_text(control.positions())]
        if cmd == "trades":
            if rest and not (rest.isdigit() and 1 <= int(rest) <= TRADES_MAX):
                return [f"Usage: /trades [N], N from 1 to {TRADES_MAX}."]
            return [trades_text(control.trades(limit=int(rest) if rest else TRADES_DEFAULT))]
        if cmd == "report":
            return [f"The daily report comes at {report_at} UTC." if report_at
                    else "The daily report is off (QF_NOTIFIER_REPORT_AT is empty)."]
        if cmd in ("halt", "resume"):
            return [action_text(control.act(cmd, by, _reason(rest, cmd)))]
        if cmd == "flatten":
            if rest.lower() != "confirm" and not rest.lower().startswith("confirm "):
                pending[chat_id] = now_ns + CONFIRM_S * 1_000_000_000
                return [f"Reply /flatten confirm within {CONFIRM_S} s to close every position."]
            deadline = pending.pop(chat_id, None)
            if deadline is None or now_ns > deadline:
                return ["Nothing to confirm: send /flatten first, then /flatten confirm "
                        f"within {CONFIRM_S} s."]
            return [action_text(control.act("flatten", by, _reason(rest[len("confirm"):].strip(), "flatten")))]
    except RiskUnreachable:
        return ["Risk is not answering; nothing was done."]
    except RiskRefused as exc:
        return [f"Risk refused: {exc.message[:200]}. Nothing was done."]
    except DatabaseUnavailable:
        return ["The database cannot be read right now; try again in a moment."]
    except ValueError as exc:  # a reason the control layer refuses (services/control check_reason)
        return [f"{str(exc)[:200]}. Nothing was done."]
    return [f"Unknown command /{cmd}. /help lists them."]


def _reason(rest: str, cmd: str) -> str:
    return (rest or f"/{cmd} from Telegram")[:REASON_MAX]


# -- texts for a phone -------------------------------------------------------------------------

def _n(value: Any) -> str:
    return "-" if value is None else number(value) if isinstance(value, Decimal) else str(value)


def status_text(st: dict) -> str:
    rs, eq = st["risk_state"], st["equity"]
    why = f" ({rs['reason']})" if rs["reason"] else ""
    since = f" since {utc(rs['ts'], '%a %d %b %H:%M')}" if rs["ts"] else ""
    orders = ", ".join(f"{k.lower()} {n}" for k, n in st["orders"].items() if n) or "none"
    held = ", ".join(f"{s} {_n(q)}" for s, q in sorted(st["positions"].items()) if q) or "flat"
    lines = [f"Trading {rs['state']}{why}{since}",
             f"Equity {price(eq['equity'])}" if eq else "Equity -",
             f"Fills {st['fills']} · orders: {orders}",
             f"Positions {held}"]
    pause = st.get("pause") or {}
    if pause.get("enabled") and pause.get("current"):
        lines.append(f"Paused: {pause['current']['name']} until {pause['current']['end']}")
    return "\n".join(lines)


def pnl_text(p: dict) -> str:
    eq = p["equity"]
    return "\n".join([f"Realized P&L {signed(p['realized'])} (before fees)",
                      f"Fees {_n(p['fees'])}",
                      f"Net realized {signed(p['net_realized'])}",
                      f"Equity {price(eq['equity'])}" if eq else "Equity -",
                      f"Symbols {p['symbols']}"])


def positions_text(found: list) -> str:
    if not found:
        return "No fills yet: no positions."
    return clip("\n".join(f"{p.symbol} {_n(p.qty)} @ avg {_n(p.avg_price)} · realized {signed(p.realized)}"
                          f" · {p.fills} fills" for p in found))


def trades_text(rows: list[dict]) -> str:
    if not rows:
        return "No fills yet."
    return clip("\n".join(f"{utc(r['ts'], '%d %b %H:%M:%S')} {r['side']} {_n(r['qty'])} {r['symbol']} "
                          f"@ {price(r['price'])} fee {_n(r['fee'])} {r['fee_asset']}" for r in rows))


def action_text(answer: dict) -> str:
    detail = answer.get("detail") or {}
    changed = "" if detail.get("changed", True) else " (unchanged)"
    held = {s: q for s, q in (answer.get("positions") or {}).items() if Decimal(q)}
    return (f"Risk: {answer['state']}{changed} — {answer['reason']}\n"
            f"Positions {', '.join(f'{s} {q}' for s, q in sorted(held.items())) or 'flat'}")


# -- sending -----------------------------------------------------------------------------------

def send_replies(cfg: Config, chat_id: int, texts: list[str]) -> list:
    """sendMessage each text to `chat_id` (TelegramSender, short timeouts); their Outcomes.
    Call from a thread without a running event loop (a Flask view)."""
    from services.notifier.sender import TelegramSender

    async def run() -> list:
        sender = TelegramSender(cfg.notifier.telegram_token, cfg.notifier.telegram_api_url,
                                connect_timeout_s=SEND_TIMEOUT_S, read_timeout_s=SEND_TIMEOUT_S,
                                write_timeout_s=SEND_TIMEOUT_S)
        try:
            return [await sender.send(chat_id, t) for t in texts]
        finally:
            await sender.close()
    return asyncio.run(run()) if texts else []


# -- `qf telegram set-webhook URL` -------------------------------------------------------------

EXIT_FAILED, EXIT_BAD_INPUT = 1, 2


def add_parser(sub) -> None:
    t = sub.add_parser("telegram", help="Telegram bot commands: register the webhook",
                       description="The bot's commands reach the API at POST /telegram/webhook.")
    tsub = t.add_subparsers(dest="telegram_command", required=True)
    w = tsub.add_parser("set-webhook", help="register URL (https) as the bot's webhook with Telegram",
                        description="Calls setWebhook with QF_TELEGRAM_WEBHOOK_SECRET as the secret token and "
                                    "message updates only. URL is the API's public https address ending in "
                                    "/telegram/webhook.")
    w.add_argument("url", help="e.g. https://qf.example.org/telegram/webhook")
    w.set_defaults(func=cmd_set_webhook)


def cmd_set_webhook(args: argparse.Namespace) -> int:
    from shared.config import load, mask_secrets
    from shared.errors import ConfigError
    try:
        cfg = load()
    except ConfigError as exc:
        print(mask_secrets(f"qf: {exc}"), file=sys.stderr)
        return EXIT_BAD_INPUT
    n = cfg.notifier
    if not re.fullmatch(r"https://[^\s/?#]+(/[^\s]*)?", args.url):
        print(f"qf: the webhook URL must be https://…, not {mask_secrets(args.url)[:80]!r}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if not n.telegram_token or not n.webhook_secret:
        missing = "QF_TELEGRAM_TOKEN" if not n.telegram_token else "QF_TELEGRAM_WEBHOOK_SECRET"
        print(f"qf: {missing} is not set", file=sys.stderr)
        return EXIT_BAD_INPUT
    from services.notifier.sender import TelegramSender, classify

    async def run() -> str | None:
        sender = TelegramSender(n.telegram_token, n.telegram_api_url)
        try:
            await sender.bot.set_webhook(args.url, secret_token=n.webhook_secret, allowed_updates=["message"])
        except Exception as exc:  # noqa: BLE001 - one line, the token cut out
            return classify(exc, sender.redact).detail
        finally:
            await sender.close()
        return None
    failed = asyncio.run(run())
    if failed is not None:
        print(f"qf: setWebhook failed: {failed}", file=sys.stderr)
        return EXIT_FAILED
    print(f"webhook set: {args.url} (message updates, secret token)")
    return 0
