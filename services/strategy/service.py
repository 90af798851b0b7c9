"""Strategy shell: SUB books, run the core, send orders to risk over Lazy Pirate REQ."""
from __future__ import annotations

import logging
import threading
import time

import zmq

from services.strategy.core import ImbalanceStrategy, OrderIntent, Outcome
from shared import messages
from shared.bus import LazyPirateClient, NoReply, Subscriber
from shared.config import Config
from shared.enums import Verdict
from shared.errors import DecodeError
from shared.messages import Book, Decision, OrderRequest
from shared.runtime import Liveness, Ticker

log = logging.getLogger("qf.strategy")

SERVICE = "strategy"
POLL_MS = 100  # the longest the loop waits before it looks at the stop flag and liveness again
DRAIN_MAX = 10_000  # books read per batch, so a flood cannot starve liveness or the stop flag


def reject(cid: str, code: str, text: str) -> Decision:
    """A local REJECTED decision: what the strategy assumes when risk cannot answer."""
    return Decision(ts=time.time_ns(), client_order_id=cid, verdict=Verdict.REJECTED,
                    reason={"code": code, "text": text})


class StrategyService:
    """Runs `ImbalanceStrategy` live. `run()` blocks until `stop()` is called.

    REQ is synchronous: while an order waits for risk no book is read, and
    afterwards only the newest queued book of each symbol is acted on."""

    def __init__(self, cfg: Config, ctx: zmq.Context | None = None) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.start_ns = time.time_ns()
        # start time in the prefix keeps client_order_id unique across restarts
        self.core = ImbalanceStrategy(cfg.strategy, cfg.md.symbols,
                                      id_prefix=f"{cfg.strategy.name}-{self.start_ns:x}")
        self._stop = threading.Event()
        self.stats = {"books": 0, "stale_books": 0, "other_symbols": 0, "decode_errors": 0, "orders": 0,
                      "approved": 0, "rejected": 0, "no_reply": 0, "errors": 0}
        # newest unprocessed book per symbol the core trades; refilled before each book is handled,
        # so a book that went stale while an order waited for risk is overwritten. Books of other
        # symbols never enter it: a flood of made-up symbols cannot grow it.
        self.pending: dict[str, Book] = {}

    def stop(self) -> None:
        """Ask `run()` to return; safe from a signal handler or another thread."""
        self._stop.set()

    def run(self) -> None:
        """Subscribe to `book.*`, trade until stopped, then close every socket."""
        cfg = self.cfg
        sub = Subscriber(cfg.bus.md_pub, ["book."], cfg.bus.hwm, ctx=self.ctx)
        client = LazyPirateClient(cfg.bus.risk_rep, cfg.strategy.timeout_ms, cfg.strategy.retries, ctx=self.ctx)
        liveness = Liveness(cfg.common.run_dir, SERVICE)
        ticker = Ticker(cfg.bus.heartbeat_ms)
        poller = zmq.Poller()
        poller.register(sub.sock, zmq.POLLIN)
        log.info("started", extra={"md_pub": cfg.bus.md_pub, "risk_rep": cfg.bus.risk_rep,
                                   "symbols": ",".join(cfg.md.symbols), "prefix": self.core.id_prefix})
        pending = self.pending
        try:
            while not self._stop.is_set():
                if ticker.due():
                    liveness.touch()
                if not pending and not poller.poll(POLL_MS):
                    continue
                self._drain(sub, pending)
                if pending:
                    symbol = next(iter(pending))
                    self._on_book(pending.pop(symbol), client, liveness, ticker)
        finally:
            client.close()
            sub.close()
            liveness.remove()
            log.info("stopped", extra=dict(self.stats, missed=sub.missed, refused_books=self.core.refused_books))

    def _drain(self, sub: Subscriber, pending: dict[str, Book]) -> None:
        """Read every waiting book into `pending`, keeping only the newest per symbol."""
        for _ in range(DRAIN_MAX):
            try:
                _, msg = sub.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            except DecodeError as exc:
                self.stats["decode_errors"] += 1
                log.warning("bad_frame", extra={"reason": exc.reason, "detail": exc.detail})
                continue
            if not isinstance(msg, Book):
                continue
            if not self.core.trades(msg.symbol):
                self.stats["other_symbols"] += 1
                continue
            self.stats["books"] += 1
            if msg.symbol in pending:
                self.stats["stale_books"] += 1
            pending[msg.symbol] = msg

    def _on_book(self, book: Book, client: LazyPirateClient, liveness: Liveness, ticker: Ticker) -> None:
        intent = None
        try:
            intent = self.core.on_book(book, time.time_ns())
            if intent is not None:
                self._execute(intent, client, liveness, ticker)
        except Exception:  # a bug in one event must not stop the service
            self.stats["errors"] += 1
            log.exception("book_failed", extra={"symbol": book.symbol, "update_id": book.update_id})
            if intent is not None and self.core.in_flight(intent.symbol) is intent:
                # never leave a symbol blocked behind an order whose answer will not come
                self.core.on_decision(reject(intent.client_order_id, "INTERNAL", "strategy error"))

    def _execute(self, intent: OrderIntent, client: LazyPirateClient, liveness: Liveness,
                 ticker: Ticker) -> None:
        """Send one order and apply the answer; silence after every retry counts as a rejection."""
        self.stats["orders"] += 1
        req = OrderRequest(ts=time.time_ns(), client_order_id=intent.client_order_id,
                           strategy=self.cfg.strategy.name, symbol=intent.symbol, side=intent.side,
                           kind=intent.kind, qty=intent.qty, confidence=intent.confidence,
                           signal_ts=intent.signal_ts)
        decision = self._ask(messages.encode(req), intent.client_order_id, client, liveness, ticker)
        rtt_ns = time.time_ns() - req.ts
        try:
            outcome = self.core.on_decision(decision)
        except ValueError as exc:
            self.stats["errors"] += 1
            log.error("bad_ack", extra={"cid": intent.client_order_id, "detail": str(exc)})
            outcome = None
        self._log_result(intent, decision, outcome, req.ts - intent.signal_ts, rtt_ns)

    def _ask(self, payload: bytes, cid: str, client: LazyPirateClient, liveness: Liveness,
             ticker: Ticker) -> Decision:
        """Lazy Pirate with the retry loop here rather than in the client, so the
        stop flag and liveness are looked at between attempts; the payload (and
        its client_order_id) is the same on every attempt."""
        attempts = self.cfg.strategy.retries
        for attempt in range(1, attempts + 1):
            try:
                raw = client.request(payload, retries=1)
                break
            except NoReply:
                if ticker.due():
                    liveness.touch()
                if attempt == attempts or self._stop.is_set():
                    self.stats["no_reply"] += 1
                    log.warning("risk_no_reply", extra={"cid": cid, "attempts": attempt})
                    return reject(cid, "NO_REPLY", f"risk silent after {attempt} attempt(s) "
                                                   f"of {client.timeout_ms} ms")
                log.warning("risk_retry", extra={"cid": cid, "attempt": attempt})
        try:
            reply = messages.decode(raw, messages.REQUESTS)
        except DecodeError as exc:
            return reject(cid, "BAD_REPLY", f"{exc.reason}: {exc.detail}")
        if isinstance(reply, messages.Error):
            return reject(cid, reply.code, reply.text)
        if not isinstance(reply, Decision) or reply.client_order_id != cid:
            return reject(cid, "BAD_REPLY", f"unexpected {reply.TYPE} reply")
        return reply

    def _log_result(self, intent: OrderIntent, decision: Decision, outcome: Outcome | None,
                    signal_ns: int, rtt_ns: int) -> None:
        approved = decision.verdict is not Verdict.REJECTED
        self.stats["approved" if approved else "rejected"] += 1
        ack = decision.order
        # risk's reason when it refused; the broker's when it took the order but did not fill it
        reason = (decision.reason or {}).get("code") or (ack.reason if ack else "")
        extra = {"cid": intent.client_order_id, "symbol": intent.symbol, "side": intent.side.value,
                 "qty": intent.qty, "verdict": decision.verdict.value, "reason": reason,
                 "status": ack.status.value if ack else "",
                 "filled_qty": outcome.filled_qty if outcome else 0,
                 "avg_price": outcome.avg_price if outcome and outcome.avg_price is not None else "",
                 "position": self.core.position(intent.symbol),
                 # where the time went: book receipt → order sent, then the round trip to risk
                 "signal_us": signal_ns // 1000, "risk_rtt_us": rtt_ns // 1000,
                 # the benchmark parses this key: keep its name and unit
                 "tick_to_trade_us": (time.time_ns() - intent.signal_ts) // 1000}
        log.info("order_result", extra=extra)
