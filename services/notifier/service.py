"""Notifier shell: SUB to the PUBs, feed the core, queue in the outbox, send through Telegram.

One asyncio loop in the main thread runs two tasks: the pump (every PUMP_S: drain the
SUB sockets without blocking, feed the core, queue what it says, start the daily report,
touch the liveness file) and the sender (the oldest message of the chat whose turn it is
under Telegram's limits, one request at a time, each outcome settled in the outbox).
python-telegram-bot is asyncio-native, so the HTTP waits never hold the ZeroMQ side up,
and the report's database read and chart run in a worker thread. Stop: the pump notices
within PUMP_S, a request in flight gets STOP_GRACE_S to finish (else it is cancelled and
its message stays queued), then the connections close.

No heartbeat: the notifier has no PUB of its own and nothing listens to one (docs/
architecture.md); the liveness file serves `qf health notifier`. With no token (or no chat
id), it says once that it is off and why, then waits for its stop, touching the liveness
file: `qf up` restarts a child that exits, whatever its status, so it must not exit."""
from __future__ import annotations

import asyncio
import logging
import math
import sqlite3
import threading
import time
from typing import Callable

import zmq

from services.notifier import text
from services.notifier.core import NotifierCore, Outgoing, gap_for
from services.notifier.outbox import Outbox, Pending
from services.notifier.ratelimit import ChatLimits
from services.notifier.report import build_report, due_slot, first_slot
from services.notifier.sender import (BAD_TOKEN, MIGRATED, REFUSED, RETRY_AFTER, SENT, TRANSIENT, Outcome,
                                      TelegramSender, protect_logs)
from shared import curve
from shared.bus import NOBLOCK, Subscriber
from shared.config import Config
from shared.errors import DecodeError
from shared.money import UnknownAsset, quote_asset
from shared.runtime import Liveness

log = logging.getLogger("qf.notifier")

NS = 1_000_000_000
PUMP_S = 0.1  # how often the SUB sockets are drained; bounds how late stop() is noticed
LIVENESS_S = 2.0
STOP_GRACE_S = 3.0  # a request in flight at stop may finish within this
IDLE_WAIT_S = 5.0  # the sender looks at the outbox at least this often
DRAIN_MAX = 10_000  # messages read from one socket per turn, so one busy PUB cannot starve the rest
BACKOFF_BASE_S, BACKOFF_CAP_S = 1.0, 60.0  # after a timeout, a 5xx or no connection: 1, 2, 4 … 60 s
TOKEN_RETRY_S = 600.0  # a token Telegram refused: ask again this rarely


def off_reason(cfg: Config) -> str | None:
    """Why the notifier is off (None: it is on)."""
    if not cfg.notifier.telegram_token:
        return "QF_TELEGRAM_TOKEN is not set"
    if not cfg.notifier.telegram_chat_ids:
        return "QF_TELEGRAM_CHAT_IDS is empty: no chat to write to"
    return None


def subscriptions(cfg: Config) -> dict[str, tuple[str, ...]]:
    """Endpoint → topic prefixes (docs/protocol.md): what the notifier hears from each PUB."""
    return {cfg.bus.broker_pub: ("fill.", "alert.", "heartbeat."),
            cfg.bus.risk_pub: ("risk.state", "alert.", "heartbeat."),
            cfg.bus.md_pub: ("status.", "alert.", "heartbeat."),
            cfg.bus.strategy_pub: ("alert.", "heartbeat.")}


def backoff_s(failures: int) -> float:
    return min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** max(0, failures - 1))


def _quote(cfg: Config) -> str:
    quotes = set()
    for sym in cfg.md.symbols:
        try:
            quotes.add(quote_asset(sym.removeprefix("USDM:")))
        except UnknownAsset:
            pass
    return quotes.pop() if len(quotes) == 1 else ""


class NotifierService:
    """`run()` until `stop()` (safe from a signal handler or another thread)."""

    def __init__(self, cfg: Config, clock: Callable[[], int] = time.time_ns,
                 sender_options: dict | None = None) -> None:
        self.cfg, self.clock = cfg, clock
        self.curve = curve.load(cfg, "notifier")  # KeyFileError (one line, exit 2) before anything runs
        self._stop = threading.Event()
        self.liveness = Liveness(cfg.common.run_dir, "notifier")
        self.off = off_reason(cfg)
        if self.off is not None:
            log.info("notifier_off", extra={"reason": self.off, "hint": "set QF_TELEGRAM_TOKEN and "
                                            "QF_TELEGRAM_CHAT_IDS to hear from QuantumFlow on Telegram"})
            return
        n = cfg.notifier
        self.undo_logs = protect_logs(n.telegram_token)  # before anything could log a URL
        self.chats = tuple(int(c) for c in n.telegram_chat_ids)
        self.outbox = Outbox(cfg.common.run_dir)
        self.core = NotifierCore(n.batch_ms * 1_000_000, gap_for(cfg.bus.heartbeat_ms),
                                 memory=self.outbox.get("core"), started_ns=clock())
        self.limits = ChatLimits()
        self.sender = TelegramSender(n.telegram_token, n.telegram_api_url, **(sender_options or {}))
        self.subs = [Subscriber(ep, topics, cfg.bus.hwm, curve=self.curve) for ep, topics in subscriptions(cfg).items()]
        self.heard: set[str] = set()
        self.quote = _quote(cfg)
        self.last_slot: int | None = self.outbox.get("report_slot")
        self.failures = 0  # transient failures in a row
        self.token_refused = False
        self.stats = {"events": 0, "bad_frames": 0, "queued": 0, "sent": 0, "refused": 0, "retries": 0}
        self._reports: set[asyncio.Task] = set()
        self._wake: asyncio.Event | None = None
        self._stopped: asyncio.Event | None = None
        log.info("notifier_on", extra={"chats": len(self.chats), "api": self.sender.api_url,
                                       "report_at": n.report_at or "off", "batch_ms": n.batch_ms,
                                       "pending": self.outbox.pending(), "outbox": self.outbox.path})

    # -- lifecycle ------------------------------------------------------------------------

    def run(self) -> None:
        """Until stop(): send (or, off, idle); then close everything."""
        if self.off is not None:
            self.liveness.touch()
            while not self._stop.wait(LIVENESS_S):
                self.liveness.touch()
            self.liveness.remove()
            return
        try:
            asyncio.run(self._main())
        finally:
            for s in self.subs:
                s.close()
            self.outbox.close()
            self.liveness.remove()
            self.undo_logs()
            log.info("stopped", extra={**self.stats})

    def stop(self) -> None:
        """Ask run() to return within PUMP_S + STOP_GRACE_S (+ a report being drawn)."""
        self._stop.set()

    async def _main(self) -> None:
        self._wake, self._stopped = asyncio.Event(), asyncio.Event()
        if self.outbox.get("hello") is None:  # the first start ever with this outbox: say hello
            self._enqueue(Outgoing("hello", text.hello_text(self.cfg.notifier.report_at)), self.clock())
            self.outbox.put("hello", True)
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            tg.create_task(self._pump())
            sending = tg.create_task(self._send_loop())
            await self._stopped.wait()
            done, _ = await asyncio.wait({sending}, timeout=STOP_GRACE_S)
            if not done:  # its message stays queued: sent again after the restart
                log.info("send_cancelled_at_stop", extra={"pending": self.outbox.pending()})
                sending.cancel()
            for task in self._reports:
                task.cancel()
        try:
            await asyncio.wait_for(self.sender.close(), STOP_GRACE_S)
        except (TimeoutError, asyncio.TimeoutError):
            pass

    # -- the pump: bus → core → outbox ---------------------------------------------------------

    async def _pump(self) -> None:
        next_touch = 0.0
        while not self._stop.is_set():
            try:
                self._turn(self.clock())
                if time.monotonic() >= next_touch:
                    self.liveness.touch()
                    next_touch = time.monotonic() + LIVENESS_S
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug in one turn must not end the notifier: logged, next turn
                log.exception("pump_failed")
            await asyncio.sleep(PUMP_S)
        self._stopped.set()
        self._wake.set()

    def _turn(self, now: int) -> None:
        for sub in self.subs:
            for _ in range(DRAIN_MAX):
                try:
                    topic, msg = sub.recv(NOBLOCK)
                except zmq.Again:
                    break
                except DecodeError as exc:
                    self.stats["bad_frames"] += 1
                    log.debug("bad_frame", extra={"endpoint": sub.endpoint, "error": str(exc)})
                    continue
                self.stats["events"] += 1
                if sub.endpoint not in self.heard:
                    self.heard.add(sub.endpoint)
                    log.info("bus_heard", extra={"endpoint": sub.endpoint, "topic": topic})
                self.core.on_event(topic, msg, now)
        self.core.poll(now)
        for out in self.core.take_messages():
            self._enqueue(out, now)
        memory = self.core.take_memory()
        if memory is not None:
            self.outbox.put("core", memory)
        self._schedule_report(now)

    def _enqueue(self, out: Outgoing, now: int) -> None:
        try:
            self.outbox.add(self.chats, out, now)
        except sqlite3.Error as exc:  # a full or failing disk: this message is lost, the rest goes on
            log.error("outbox_write_failed", extra={"kind": out.kind, "error": str(exc)})
            return
        self.stats["queued"] += 1
        log.info("queued", extra={"kind": out.kind, "chats": len(self.chats), "text": out.text.split("\n", 1)[0]})
        self._wake.set()

    def _schedule_report(self, now: int) -> None:
        at = self.cfg.notifier.report_at
        if not at:
            return
        if self.last_slot is None:
            self.last_slot = first_slot(now, at)
            self.outbox.put("report_slot", self.last_slot)
            return
        slot = due_slot(now, at, self.last_slot)
        if slot is None:
            return
        self.last_slot = slot  # in memory at once (no second report while this one is drawn)
        task = self._tg.create_task(self._report(slot))
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)

    async def _report(self, slot: int) -> None:
        started = time.monotonic()
        try:
            out = await asyncio.to_thread(build_report, self.cfg.common.db, slot, self.quote)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug in the report must not end the notifier; the next day tries again
            log.exception("report_failed")
            out = Outgoing("report", f"{text.ICON['report']} Daily report failed: see the notifier's log")
        self._enqueue(out, self.clock())
        self.outbox.put("report_slot", slot)  # after it is queued: a crash before re-makes it
        log.info("report_made", extra={"slot": text.utc(slot, "%Y-%m-%d %H:%M"), "chart": out.photo is not None,
                                       "ms": int((time.monotonic() - started) * 1000)})

    # -- the sender: outbox → Telegram ---------------------------------------------------------

    async def _send_loop(self) -> None:
        await self._start_sender()
        failures = 0
        while not self._stop.is_set():
            try:
                wait = await self._send_next()
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception:  # the outbox failing (a disk error), a bug: logged, tried again later
                failures += 1
                log.exception("send_loop_failed")
                wait = backoff_s(failures)
            if wait:
                try:
                    await asyncio.wait_for(self._wake.wait(), wait)
                except (TimeoutError, asyncio.TimeoutError):
                    pass

    async def _send_next(self) -> float:
        """Send the message whose turn it is, if one may go now; returns how long to wait (s)
        before looking again (0: at once), a new message waking it earlier."""
        self._wake.clear()
        now = self.clock()
        head, at = self.limits.choose(self.outbox.heads(), now)
        if head is None:
            return IDLE_WAIT_S if at is None else min(IDLE_WAIT_S, max(0.001, (at - now) / NS))
        p: Pending = head.item
        outcome = await self.sender.send(p.chat_id, p.text, p.photo)
        self._settle(p, outcome, self.clock())
        return 0.0

    async def _start_sender(self) -> None:
        outcome = await self.sender.start()
        if outcome.kind == SENT:
            log.info("telegram_ok", extra={"bot": outcome.detail})
        elif outcome.kind == BAD_TOKEN:
            self._token_refused(outcome)
        else:  # the sends retry with backoff
            log.warning("telegram_unreachable", extra={"error": outcome.detail})

    def _settle(self, p: Pending, o: Outcome, now: int) -> None:
        """Record what became of one request (`o`) for the pending message `p`."""
        what = {"kind": p.kind, "chat": p.chat_id, "id": p.id, "attempt": p.attempts + 1}
        if o.kind == SENT:
            self.outbox.done(p.id)
            self.limits.sent(p.chat_id, now)
            self.failures, self.token_refused = 0, False
            self.stats["sent"] += 1
            log.info("sent", extra={**what, "message_id": o.message_id})
            return
        self.stats["retries"] += 1
        if o.kind == RETRY_AFTER:  # Telegram's flood control: the chat's next try waits at least that long
            until = now + math.ceil(o.retry_after_s * NS)
            self.limits.hold(p.chat_id, until)
            self.outbox.failed(p.id, until)
            log.warning("telegram_flood_wait", extra={**what, "retry_after_s": o.retry_after_s})
        elif o.kind == TRANSIENT:
            self.failures += 1
            delay = backoff_s(self.failures)
            self.limits.hold_all(now + int(delay * NS))
            self.outbox.failed(p.id, now + int(delay * NS))
            log.warning("telegram_unavailable", extra={**what, "error": o.detail, "retry_in_s": delay})
        elif o.kind == REFUSED:  # resending would be refused again: the message is dropped
            self.outbox.done(p.id)
            self.stats["refused"] += 1
            log.error("telegram_refused", extra={**what, "error": o.detail, "text": p.text.split("\n", 1)[0]})
        elif o.kind == MIGRATED:
            self.outbox.retarget(p.chat_id, o.new_chat_id)
            self.chats = tuple(o.new_chat_id if c == p.chat_id else c for c in self.chats)
            log.warning("chat_migrated", extra={"old": p.chat_id, "new": o.new_chat_id,
                                                "hint": "put the new id in QF_TELEGRAM_CHAT_IDS"})
        else:  # BAD_TOKEN
            self.limits.hold_all(now + int(TOKEN_RETRY_S * NS))
            self.outbox.failed(p.id, now + int(TOKEN_RETRY_S * NS))
            self._token_refused(o)

    def _token_refused(self, o: Outcome) -> None:
        self.limits.hold_all(self.clock() + int(TOKEN_RETRY_S * NS))
        if not self.token_refused:  # once per streak: messages stay queued, asked again every 10 min
            self.token_refused = True
            log.error("telegram_token_rejected", extra={"error": o.detail, "retry_in_s": TOKEN_RETRY_S,
                                                        "hint": "check QF_TELEGRAM_TOKEN (from @BotFather)"})
