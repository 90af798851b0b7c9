"""The order desk: check, forward to the broker without blocking, answer; cancels; the answer caches."""
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
from services.risk.link import BrokerLink
from services.risk.store import Forwarded, Outbox
from services.risk.telemetry import BAD_FRAMES, DECISIONS, FAILURES, LogLimiter
from shared.runtime import MicrosHistogram
from shared import messages
from shared.enums import OrderKind, OrderStatus, TimeInForce, Verdict
from shared.errors import DecodeError
from shared.ledger import to_decimal
from shared.messages import Ack, Cancel, Decision, Error, OrderRequest

log = logging.getLogger("qf.risk")

DECISION_CACHE_MAX = 4096  # answers kept so a retried client_order_id gets the same one
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
_STATUSES = {s.value: s for s in OrderStatus}  # a dict lookup: OrderStatus(x) is a slow Enum call


def read_ack(wire: object, client_order_id: str) -> tuple[OrderStatus, Decimal, list]:
    """What risk needs of the broker's answer map: `(status, filled_qty, fills)`. Raises
    DecodeError for anything but an `ack` of this order with those fields well typed (the
    fills themselves are checked one by one as the ledger books them)."""
    if type(wire) is not dict or wire.get("v") != messages.VERSION:
        raise DecodeError("bad_version" if type(wire) is dict else "not_a_map", "broker answer")
    if wire.get("type") != "ack":
        if wire.get("type") == "error":
            raise DecodeError("broker_error", f"{wire.get('code')}: {wire.get('text')}"[:200])
        raise DecodeError("unexpected_type", str(wire.get("type"))[:40])
    if wire.get("client_order_id") != client_order_id:
        raise DecodeError("bad_field", f"client_order_id {str(wire.get('client_order_id'))[:40]!r}")
    fills = wire.get("fills", [])
    if type(fills) is not list:
        raise DecodeError("bad_field", "fills: expected a list of maps")
    for fill in fills:
        if type(fill) is not dict:
            raise DecodeError("bad_field", "fills: expected a list of maps")
    try:
        status = wire.get("status")
        status = _STATUSES.get(status) if type(status) is str else None
        if status is None:
            status = OrderStatus(wire.get("status"))  # not a plain known string: raises, or a str subclass
        return status, to_decimal(wire.get("filled_qty"), "filled_qty"), fills
    except ValueError as exc:
        raise DecodeError("bad_field", str(exc)[:120]) from None


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
    limits (fail closed). `stats` counts verdicts; denials go to `outbox` and a quiet log."""

    def __init__(self, engine: RiskEngine, broker: BrokerLink, outbox: Outbox, forwarded: Forwarded,
                 stats: dict, clock: Callable[[], int], quiet: LogLimiter) -> None:
        self.engine, self.broker, self.outbox, self.forwarded = engine, broker, outbox, forwarded
        self.stats, self.clock, self.quiet = stats, clock, quiet
        self.decisions: OrderedDict[str, bytes] = OrderedDict()  # client_order_id -> the encoded decision
        self.inflight: dict[str, InFlight] = {}
        self.broker_us = MicrosHistogram()
        self._counters: dict = {}
        # One packer, reused: msgpack.packb makes a new Packer (and its buffer) per call, which
        # cost more than packing the values themselves, and slowed the next order too.
        self._pack = msgpack.Packer().pack

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
        unsure = self.engine.working.get(req.client_order_id)
        if unsure is not None and unsure.expires_ns:
            self.engine.untrack(req.client_order_id)  # a retry after a timeout: not counted twice
        verdict = self.engine.check(req, now)
        qty, cut = req.qty, None
        if type(verdict) is Denial:
            if req.client_order_id not in self.forwarded:  # the broker has it: its answer, not a denial
                if unsure is not None and unsure.expires_ns:
                    self.engine.track(req.client_order_id, unsure.symbol, unsure.side, unsure.qty, unsure.remaining,
                                      unsure.rests, unsure.expires_ns)
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
        rests = req.kind is OrderKind.LIMIT and req.tif is TimeInForce.GTC
        parts = approval_parts(req.client_order_id, Verdict.ADJUSTED if cut else Verdict.APPROVED, cut, qty,
                               self._pack)
        flight = InFlight(req, qty, cut, rests, decoded_ns, sent_ns, [notify], parts)
        self.inflight[req.client_order_id] = flight
        self.engine.on_sent(req.client_order_id, req.symbol, req.side, qty, rests, now)

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
            wire = msgpack.unpackb(raw, raw=False)
            status, filled, fills = read_ack(wire, req.client_order_id)
        except Exception as exc:  # DecodeError, or one of msgpack's several exception types
            self.inflight.pop(req.client_order_id, None)
            self.broker_us.record_ns(back - flight.sent_ns)
            self.engine.untrack(req.client_order_id)  # the broker did not take it
            self._deny(req, Denial(Reason.BROKER_ERROR, str(exc)[:200]), now, flight.notify, spent, back, False)
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

    def _settle(self, flight: InFlight, status: OrderStatus, filled: Decimal, fills: list, reason: object,
                payload: bytes, now: int) -> None:
        coid = flight.req.client_order_id
        self.forwarded.add(coid)  # the broker has it for sure (a silent one may or may not)
        self.apply_fills(fills, now)
        self.engine.on_order(coid, status, filled)
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

    def apply_fills(self, fills, now: int) -> None:
        for fill in fills:
            try:
                self.stats["fills"] += self.engine.on_fill(fill, now)
            except (ValueError, TypeError, ArithmeticError) as exc:
                BAD_FRAMES.labels("fill").inc()
                self.quiet.log_event(logging.WARNING, "bad_fill", "fill", {"detail": str(exc)[:200]})

    def submit_cancel(self, client_order_id: str, now: int, notify: Callable[[bytes], None]) -> None:
        """Pass a cancel to the broker (always allowed, even HALTED); `notify` gets its reply
        bytes, or an Error BROKER_UNAVAILABLE."""
        def answered(raw: bytes | None) -> None:
            if raw is None:
                raw = messages.encode(Error(ts=self.clock(), code=Reason.BROKER_UNAVAILABLE,
                                            text=f"no reply from {self.broker.endpoint}"))
            else:
                try:
                    reply = messages.decode(raw, messages.REQUESTS)
                except DecodeError:
                    reply = None
                if isinstance(reply, Ack):
                    self.apply_fills(reply.fills, self.clock())
                    self.engine.on_order(client_order_id, reply.status, reply.filled_qty)
            notify(raw)
        if not self.broker.send(messages.encode(Cancel(ts=now, client_order_id=client_order_id)), answered):
            answered(None)

