"""The order desk: check, forward to the broker without blocking, vet its answer, answer; cancels; the answer caches."""
from __future__ import annotations

import dataclasses
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from decimal import Decimal
from typing import Callable

import msgpack

from services.risk.checks import Reason
from services.risk.core import Denial, RiskEngine
from services.risk.guards import SECOND_NS, TokenBucket
from services.risk.link import BrokerLink
from services.risk.store import Forwarded, Outbox
from services.risk.telemetry import BAD_ACKS, BAD_FRAMES, DECISIONS, FAILURES, LogLimiter
from services.risk.vet import WHYS, BadAnswer, vet_ack, vet_fill, vet_status
from shared.alerts import Alerter
from shared.runtime import MicrosHistogram
from shared import messages
from shared.enums import OrderKind, OrderStatus, Verdict
from shared.errors import DecodeError
from shared.money import base_asset, quote_asset
from shared.messages import Ack, Cancel, Decision, Error, OrderEvent, OrderRequest

log = logging.getLogger("qf.risk")

STRAY_CANCELS_PER_S = 100  # cancels of orders risk holds no working order for (see submit_cancel)
DECISION_CACHE_MAX = 4096  # answers kept so a retried client_order_id gets the same one
BAD_ANSWER_QUIET_NS = 60 * 1_000_000_000  # the BROKER_ERROR alert resolves after this long without a refused answer
# The encoded decision, the ns risk spent on the order before it went to the broker (0 if it
# did not), and the perf_counter_ns since which risk works on it again (the broker's answer in
# hand). Bytes, not a Decision: the reply is all the client needs, and building the message
# only to encode it cost the answer path microseconds.
Notify = Callable[[bytes, int, int], None]
_ORDER_KEY = msgpack.packb("order")
_TS_KEY = msgpack.packb("ts")
# An approval's keys in Decision's field order, packed once (`approval_parts` packs the values).
_APPROVAL_KEYS = ("ts", "client_order_id", "verdict", "reason", "qty", "order")
_K_COID, _K_VERDICT, _K_REASON, _K_QTY = (msgpack.packb(k) for k in _APPROVAL_KEYS[1:5])
_VERDICTS = {v: msgpack.packb(v.value) for v in (Verdict.APPROVED, Verdict.ADJUSTED)}


def decision_parts(decision: Decision, pack: Callable[[object], bytes] | None = None) -> tuple[bytes, bytes]:
    """`decision`'s msgpack cut around its `ts` value, without its `order`: the encoded decision
    is then `before + msgpack.packb(ts) + after + ack`, the broker's answer `ack` spliced in as
    `order` byte for byte (the same map, not packed again). Made while the broker works, so
    only the time stamp is packed once it answered. A decision's map is a fixmap (< 16 keys):
    what makes the splice this simple. `pack`: a `msgpack.Packer().pack` to reuse (msgpack.packb
    makes a Packer and its buffer on each call)."""
    wire = decision.to_wire()
    del wire["order"]
    pack = pack or msgpack.Packer().pack
    keys = list(wire)
    at = keys.index("ts")
    before = bytes((0x80 | (len(wire) + 1),)) + b"".join(pack(k) + pack(wire[k]) for k in keys[:at]) + _TS_KEY
    after = b"".join(pack(k) + pack(wire[k]) for k in keys[at + 1:])
    return before, after + _ORDER_KEY


def approval_parts(client_order_id: str, verdict: Verdict, reason: dict | None, qty: Decimal,
                   pack: Callable[[object], bytes]) -> tuple[bytes, bytes]:
    """`decision_parts` of the Decision(ts=…, client_order_id, verdict, reason, qty) an order the
    broker took gets, from the values alone: no message made, its constant keys packed once
    (in Decision's field order: tests/services/risk/test_desk.py holds it to messages.encode)."""
    return _APPROVAL_HEAD, b"".join((_K_COID, pack(client_order_id), _K_VERDICT, _VERDICTS[verdict], _K_REASON,
                                     pack(reason), _K_QTY, pack(format(qty, "f")), _ORDER_KEY))


_APPROVAL_HEAD = decision_parts(Decision(ts=0, client_order_id="", verdict=Verdict.APPROVED))[0]  # v, type, ts


@dataclass(slots=True)
class InFlight:
    """An order sent to the broker and not answered yet; retries of it wait here too. `parts`:
    its decision's encoding around the time stamp (`decision_parts`), made while the broker works."""
    req: OrderRequest
    qty: Decimal
    cut: dict | None
    rests: bool
    decoded_ns: int
    sent_ns: int
    notify: list[Notify]
    parts: tuple[bytes, bytes]


class OrderDesk:
    """Orders and cancels between the clients and the broker. Orders wait for the broker
    without blocking anything else; while one waits, its whole quantity counts against the
    limits (fail closed). `stats` counts verdicts; denials go to `outbox` and a quiet log.

    Nothing the broker says is relayed or booked before `services.risk.vet` found it credible
    of the order risk sent: an ack, a cancel's reply, a `fill.*` or `order.*` event. A refused
    one is counted (qf_risk_bad_acks_total, stats `bad_acks`) and raised to `alerts` as
    BROKER_ERROR (resolved after BAD_ANSWER_QUIET_NS without another); the order it spoke of
    keeps its worst case counted, as when the broker is silent, until the broker's events
    settle it or it expires (RiskEngine.on_sent)."""

    def __init__(self, engine: RiskEngine, broker: BrokerLink, outbox: Outbox, forwarded: Forwarded,
                 stats: dict, clock: Callable[[], int], quiet: LogLimiter, alerts: Alerter | None = None) -> None:
        self.engine, self.broker, self.outbox, self.forwarded = engine, broker, outbox, forwarded
        self.stats, self.clock, self.quiet = stats, clock, quiet
        stats.setdefault("bad_acks", 0)
        self.alerts = alerts if alerts is not None else Alerter("risk", clock=clock)
        self.last_bad_ns = 0
        self.band_bps = engine.limits.fill_band_bps
        # (quote, base) of each traded symbol, for judging fees; a fill of any other symbol is refused.
        # A symbol of no known quote asset raises UnknownAsset (a ConfigError): risk stops at start.
        self.assets = {s: (quote_asset(s), base_asset(s)) for s in engine.limits.rules}
        self.decisions: OrderedDict[str, bytes] = OrderedDict()  # client_order_id -> the encoded decision
        self.inflight: dict[str, InFlight] = {}
        self.broker_us = MicrosHistogram()
        self._counters: dict = {}
        # One packer, reused: msgpack.packb makes a new Packer (and its buffer) per call, which
        # cost more than packing the values themselves, and slowed the next order too.
        self._pack = msgpack.Packer().pack
        # Bound once: a bound method made per answer is an allocation on the answer path.
        self._booked_for = engine.booked_for
        self._bad_fill = self.bad_fill
        self._stray = TokenBucket(STRAY_CANCELS_PER_S, SECOND_NS, clock())  # see submit_cancel

    def submit_order(self, req: OrderRequest, payload: bytes | None, now: int, notify: Notify,
                     decoded_ns: int) -> None:
        """Check `req`; deny it, or send it (as `payload`, re-encoded when ADJUSTED) to the
        broker and call `notify` with the encoded decision when it answers. A retried
        client_order_id gets the answer it got before (or waits for it); one the broker already
        has is sent again, so it gets the broker's answer even where risk would now deny it.
        `decoded_ns`: when risk had the request in hand (perf_counter_ns), for the time spent
        inside risk."""
        cached = self.decisions.get(req.client_order_id)
        if cached is not None:
            notify(cached, 0, decoded_ns)
            return
        waiting = self.inflight.get(req.client_order_id)
        if waiting is not None:
            waiting.notify.append(notify)
            return
        # A retry after a timeout is judged without its earlier attempt, which counts again if denied.
        verdict = self.engine.recheck(req, now)
        qty, cut = req.qty, None
        if type(verdict) is Denial:
            if req.client_order_id not in self.forwarded:  # the broker has it: its answer, not a denial
                self._deny(req, verdict, now, [notify], 0, decoded_ns, remember=True)
                return
        elif verdict.adjusted:
            qty = verdict.qty
            cut = {"code": Reason.MAX_POSITION, "text": f"cut from {req.qty} to {qty} to fit the limits"}
            payload = messages.encode(dataclasses.replace(req, qty=qty))
        payload = payload or messages.encode(req)
        sent_ns = time.perf_counter_ns()
        # `flight` is bound below, before any answer can come: the callback runs from a later
        # loop turn (BrokerLink.receive/expire/close), never from inside send().
        if not self.broker.send(payload, lambda raw: self._answered(flight, raw)):
            self._deny(req, Denial(Reason.BROKER_UNAVAILABLE, f"broker {self.broker.endpoint} not connected"),
                       now, [notify], 0, decoded_ns, remember=False)
            return
        # The broker works on it now: what follows is off the order's path, the decision's
        # encoding included (only its time stamp waits for the answer).
        rests = req.kind is OrderKind.LIMIT and req.tif.rests  # GTC or post-only GTX
        parts = approval_parts(req.client_order_id, Verdict.ADJUSTED if cut else Verdict.APPROVED, cut, qty,
                               self._pack)
        flight = InFlight(req, qty, cut, rests, decoded_ns, sent_ns, [notify], parts)
        self.inflight[req.client_order_id] = flight
        self.engine.on_sent(req.client_order_id, req.symbol, req.side, qty, rests, now,
                            req.price if req.kind is OrderKind.LIMIT else None)  # what it reserves

    def _answered(self, flight: InFlight, raw: bytes | None) -> None:
        """The broker's answer (None: none in time). The client is answered first; fills,
        tracking, caches and counters follow (nothing else runs in between)."""
        back = time.perf_counter_ns()
        req, now, spent = flight.req, self.clock(), flight.sent_ns - flight.decoded_ns
        if raw is None:
            self.inflight.pop(req.client_order_id, None)
            self.broker_us.record_ns(back - flight.sent_ns)
            # Fate unknown: its worst case stays counted until the broker's events say otherwise
            # or it expires; not remembered, so a retry asks the broker again.
            self._deny(req, Denial(Reason.BROKER_UNAVAILABLE, f"no reply from {self.broker.endpoint} within "
                                   f"{self.broker.timeout_ns // 1_000_000} ms"), now, flight.notify, spent, back, False)
            return
        try:
            wire, (status, filled, fills) = self._vet_ack(raw, req, flight.qty)
        except DecodeError as exc:
            self.inflight.pop(req.client_order_id, None)
            self.broker_us.record_ns(back - flight.sent_ns)
            if exc.reason == "broker_error":  # the broker's own `error`: it did not take the order
                self.engine.untrack(req.client_order_id)
                self._deny(req, Denial(Reason.BROKER_ERROR, str(exc)[:200]), now, flight.notify, spent, back, False)
                return
            # Not credible: the strategy is told REJECTED, and nothing of it is booked. The broker
            # may still have done something, so the order's worst case stays counted (on_sent)
            # until its fill/order events settle it or it expires; not remembered, so a retry
            # asks again (and is judged again first).
            self._deny(req, Denial(Reason.BROKER_ERROR, f"broker answer refused ({exc.reason}): {exc.detail}"[:300]),
                       now, flight.notify, spent, back, False)
            self._refused("ack", exc, req.client_order_id)
            return
        # Risk's verdict stands once the broker answered; the broker's own outcome, a
        # REJECTED status with its reason included, travels in `order`.
        before, after = flight.parts
        payload = b"".join((before, self._pack(now), after, raw))
        self._notify(flight.notify, payload, spent, back)
        self.inflight.pop(req.client_order_id, None)  # nothing ran in between: no retry could join it
        self.broker_us.record_ns(back - flight.sent_ns)
        try:
            self._settle(flight, status, filled, fills, wire.get("reason", ""), payload, now)
        except Exception:
            FAILURES.inc()
            log.exception("broker_reply_failed", extra={"client_order_id": req.client_order_id[:80]})

    def _vet_ack(self, raw: bytes, req: OrderRequest, qty: Decimal) -> tuple[dict, tuple]:
        """The broker's answer unpacked and vetted against `req` approved for `qty`:
        `(wire, (status, filled_qty, fills))`. Raises DecodeError (BadAnswer: not credible)."""
        try:
            wire = msgpack.unpackb(raw, raw=False)
        except Exception as exc:  # msgpack raises several unrelated types
            raise DecodeError("bad_msgpack", str(exc)[:80]) from None
        try:
            return wire, vet_ack(wire, req.client_order_id, req.symbol, req.side, qty,
                                 req.price if req.kind is OrderKind.LIMIT else None, self.assets,
                                 self.engine.marks, self.band_bps, self._booked_for)
        except DecodeError:
            raise
        except Exception as exc:  # a value no check foresaw: refused all the same, never relayed
            raise BadAnswer("malformed", f"{type(exc).__name__}: {exc}"[:120]) from None

    def _refused(self, source: str, exc: DecodeError, client_order_id: object) -> None:
        """Count, log (rate-limited) and alert a broker answer or event refused by the vetting."""
        why = exc.reason if exc.reason in WHYS else "malformed"
        self.stats["bad_acks"] += 1
        BAD_ACKS.labels(source, why).inc()
        self.last_bad_ns = self.clock()
        coid = str(client_order_id)[:80]
        self.quiet.log_event(logging.WARNING, "broker_answer_refused", f"refused_{source}",
                             {"source": source, "why": why, "client_order_id": coid, "detail": exc.detail[:200]})
        self.alerts.raise_(Reason.BROKER_ERROR, f"risk refused the broker's {source} for {coid} ({why}): "
                                                f"{exc.detail[:160]}")

    def tick(self, now: int) -> None:
        """Once per heartbeat: resolve the BROKER_ERROR alert after BAD_ANSWER_QUIET_NS without a refusal."""
        if self.last_bad_ns and now - self.last_bad_ns >= BAD_ANSWER_QUIET_NS \
                and self.alerts.is_active(Reason.BROKER_ERROR):
            self.alerts.resolve(Reason.BROKER_ERROR, "the broker's answers have been credible again")

    def _settle(self, flight: InFlight, status: OrderStatus, filled: Decimal, fills: list, reason: object,
                payload: bytes, now: int) -> None:
        coid = flight.req.client_order_id
        self.forwarded.add(coid)  # the broker has it for sure (a silent one may or may not)
        self.stats["fills"] += self.engine.settle_order(coid, status, filled, fills, now, self._bad_fill)
        verdict = Verdict.ADJUSTED if flight.cut else Verdict.APPROVED
        self.stats["adjusted" if flight.cut else "approved"] += 1
        code = ""
        if status is OrderStatus.REJECTED:
            code = str(reason) or "BROKER_REJECTED"
            self.stats["broker_rejected"] += 1
        self._count(verdict.value, code)
        self._remember(coid, payload)

    def _notify(self, notify: list[Notify], payload: bytes, spent_ns: int, since_ns: int) -> None:
        for n in notify:
            try:
                n(payload, spent_ns, since_ns)
            except Exception:  # one waiter's failure must not keep the others or the bookkeeping
                FAILURES.inc()
                log.exception("reply_failed")

    def _deny(self, req: OrderRequest, denial: Denial, now: int, notify: list[Notify], spent_ns: int,
              since_ns: int, remember: bool) -> None:
        """Answer `notify` with the denial first, then count, store and log it."""
        payload = messages.encode(Decision(ts=now, client_order_id=req.client_order_id, verdict=Verdict.REJECTED,
                                           reason=denial.as_reason()))
        self._notify(notify, payload, spent_ns, since_ns)
        self.stats["rejected"] += 1
        self._count(Verdict.REJECTED.value, denial.code)
        self.outbox.denial(now, denial.code, denial.text, req.client_order_id, req.symbol, self.engine.state.value)
        self.quiet.log_event(logging.INFO, "denied", denial.code,
                             {"client_order_id": req.client_order_id[:80], "code": denial.code})
        if remember:
            self._remember(req.client_order_id, payload)

    def _count(self, verdict: str, code: str) -> None:
        child = self._counters.get((verdict, code))
        if child is None:  # labels() costs a lock and a tuple per call: keep the children
            child = self._counters[(verdict, code)] = DECISIONS.labels(verdict, code[:40])
            if len(self._counters) > 1000:  # broker reasons are free text; bound the cache
                self._counters.clear()
        child.inc()

    def _remember(self, client_order_id: str, payload: bytes) -> None:
        self.decisions[client_order_id] = payload
        if len(self.decisions) > DECISION_CACHE_MAX:
            self.decisions.popitem(last=False)

    def bad_fill(self, fill: object, exc: Exception) -> None:
        """A vetted fill the engine could not book (RiskEngine.book_fills' `on_bad`): the vetting
        is stricter, so a bug; counted and logged, the answer's other fills still booked."""
        BAD_FRAMES.labels("fill").inc()
        self.quiet.log_event(logging.WARNING, "bad_fill", "fill", {"detail": str(exc)[:200]})

    def on_fill_event(self, fill: dict, now: int) -> None:
        """A `fill.*` event's map not booked yet: vetted against the order when risk tracks it
        (symbol, side, at most what still works) and the book, then booked; else refused."""
        coid = fill.get("client_order_id")
        coid = coid if type(coid) is str else ""
        work = self.engine.working_order(coid)
        try:
            if work is None:
                vet_fill(fill, coid, None, None, None, None, self.assets, self.engine.marks, self.band_bps)
            else:
                qty, _ = vet_fill(fill, coid, None, work.symbol, work.side, None, self.assets, self.engine.marks,
                                  self.band_bps)
                if qty > work.remaining:
                    raise BadAnswer("over_qty", f"fill {str(fill.get('fill_id'))[:40]!r}: {qty} above the "
                                                f"{work.remaining} still working")
        except DecodeError as exc:
            BAD_FRAMES.labels("fill").inc()
            self._refused("fill", exc, coid)
            return
        self.stats["fills"] += self.engine.book_fills((fill,), now, self._bad_fill)

    def on_order_event(self, event: OrderEvent) -> None:
        """An `order.*` event: applied to the order risk tracks when its status and filled
        quantity can be true of it; refused (counted, alerted) otherwise."""
        work = self.engine.working_order(event.client_order_id)
        if work is None:
            return  # ended or never known: nothing to settle
        try:
            if event.symbol != work.symbol:
                raise BadAnswer("wrong_symbol", f"order event of {event.symbol[:24]} for a {work.symbol} order")
            vet_status(event.status, event.filled_qty, work.qty)
        except BadAnswer as exc:
            self._refused("order", exc, event.client_order_id)
            return
        self.engine.on_order(event.client_order_id, event.status, event.filled_qty)

    def submit_cancel(self, client_order_id: str, now: int, notify: Callable[[bytes], None]) -> None:
        """Pass a cancel to the broker (always allowed, even HALTED); `notify` gets its reply
        bytes, or an Error BROKER_UNAVAILABLE. A cancel of an order risk holds no working order
        for (ended, or never sent) takes a token of STRAY_CANCELS_PER_S first, else is answered
        RATE_LIMIT here: 20,000 cancels of made-up ids kept the broker link so busy that a
        well-formed order waited out its timeout (BROKER_UNAVAILABLE)."""
        stray = client_order_id not in self.inflight and self.engine.working_order(client_order_id) is None
        if stray and not self._stray.available(now):
            self.stats["cancels_limited"] = self.stats.get("cancels_limited", 0) + 1
            self.quiet.log_event(logging.WARNING, "cancel_limited", "stray_cancel",
                                 {"client_order_id": client_order_id[:40], "per_s": STRAY_CANCELS_PER_S})
            notify(messages.encode(Error(ts=self.clock(), code=Reason.RATE_LIMIT,
                                         text=f"cancels of orders risk holds no working order for: at most "
                                              f"{STRAY_CANCELS_PER_S} a second")))
            return
        if stray:
            self._stray.take(now)

        def answered(raw: bytes | None) -> None:
            if raw is None:
                raw = messages.encode(Error(ts=self.clock(), code=Reason.BROKER_UNAVAILABLE,
                                            text=f"no reply from {self.broker.endpoint}"))
            else:
                raw = self._cancel_answer(client_order_id, raw)
            notify(raw)
        if not self.broker.send(messages.encode(Cancel(ts=now, client_order_id=client_order_id)), answered):
            answered(None)

    def _cancel_answer(self, client_order_id: str, raw: bytes) -> bytes:
        """The broker's reply to a cancel, as its client gets it: an `ack` that is credible of the
        order (then booked), or the broker's own `error`, byte for byte; anything else is refused
        (counted, alerted, nothing booked; the order stays counted as it was) and answered with
        an `error` BROKER_ERROR."""
        try:
            reply = messages.decode(raw, messages.REQUESTS)
            if isinstance(reply, Error):
                return raw  # its own typed refusal: UNKNOWN_ORDER, STORE_UNAVAILABLE, ...
            if not isinstance(reply, Ack):
                raise DecodeError("unexpected_type", reply.TYPE)
            work = self.engine.working_order(client_order_id)
            wire = msgpack.unpackb(raw, raw=False)
            if work is None:  # ended or never known here: the ack is held to itself and the book
                status, filled, fills = vet_ack(wire, client_order_id, None, None, None, None, self.assets,
                                                self.engine.marks, self.band_bps, self._booked_for)
            else:
                status, filled, fills = vet_ack(wire, client_order_id, work.symbol, work.side, work.qty, None,
                                                self.assets, self.engine.marks, self.band_bps, self._booked_for)
        except Exception as exc:
            if not isinstance(exc, DecodeError):
                exc = BadAnswer("malformed", f"{type(exc).__name__}: {exc}"[:120])
            self._refused("cancel", exc, client_order_id)
            return messages.encode(Error(ts=self.clock(), code=Reason.BROKER_ERROR,
                                         text=f"broker answer refused ({exc.reason}): {exc.detail}"[:500]))
        self.stats["fills"] += self.engine.settle_order(client_order_id, status, filled, fills, self.clock(),
                                                        self._bad_fill)
        return raw

