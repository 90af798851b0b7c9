"""A hostile broker for risk's tests: a real ROUTER answering risk's DEALER with crafted acks, and a real PUB.

Risk must not pass on what it would not accept itself (issue #11): these tests stand where
the paper broker stands (`QF_BROKER_REP`, `QF_BROKER_PUB`) and answer each order risk
forwards with an honest ack (what services/broker would say: messages.Ack / messages.Fill
maps) or a mutation of it. `MUTATIONS` names the lies; each is a function of the honest ack
map and the order map, returning the map (or raw bytes) to send instead.

The broker runs in its own thread and owns both sockets; the test talks to it through
`respond` (called on that thread for each request) and `publish` (queued to it).
"""
from __future__ import annotations

import copy
import heapq
import itertools
import queue
import threading
import time
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Callable

import msgpack
import zmq

from shared import messages
from shared.enums import Liquidity, OrderStatus, Side
from shared.money import STEP, quote_asset
from shared.messages import Ack, Fill, OrderEvent

FEE_RATE = Decimal("0.001")
POLL_MS = 5  # the loop's longest sleep: how late a queued publish or a delayed reply may go out


@dataclass(order=True)
class Send:
    """Frames to send after `delay_s`: to the ROUTER (the envelope first) or, with `pub`, on the PUB."""
    due: float = field(init=False, default=0.0)
    seq: int = field(init=False, default=0)
    frames: list = field(compare=False, default_factory=list)
    delay_s: float = field(compare=False, default=0.0)
    pub: bool = field(compare=False, default=False)
    sent_at: float | None = field(init=False, compare=False, default=None)  # time.monotonic() once sent


# (frames as received: [identity, request id, "", payload], the payload unpacked or None) -> what to send
Respond = Callable[[list, object], list]


def reply(frames: list, payload: bytes, delay_s: float = 0.0) -> Send:
    """The answer to the request `frames` (its envelope kept), after `delay_s`."""
    return Send(frames=[*frames[:-1], payload], delay_s=delay_s)


def honest_ack(order: dict, price: Decimal, order_id: str, parts: int = 1, step: Decimal = Decimal("0.5"),
               ts: int = 1) -> dict:
    """What the paper broker answers for `order` filled at once: FILLED, in `parts` fills (the
    first at `price`, each next `step` further through the book), taker fees in the quote asset."""
    qty = Decimal(order["qty"])
    side = Side(order["side"])
    sizes = [qty] if parts == 1 else [qty / parts] * (parts - 1) + [qty - qty / parts * (parts - 1)]
    fills, notional = [], Decimal(0)
    for i, q in enumerate(sizes):
        p = price + side.sign * step * i
        notional += p * q
        fee = (p * q * FEE_RATE).normalize()
        fills.append(Fill(ts=ts, fill_id=f"{order_id}-{i + 1}", order_id=order_id,
                          client_order_id=order["client_order_id"], symbol=order["symbol"], side=side, price=p, qty=q,
                          fee=fee, fee_asset=quote_asset(order["symbol"]), liquidity=Liquidity.TAKER, exch_ts=1))
    avg = (notional / qty).quantize(STEP, ROUND_HALF_EVEN).normalize()
    ack = Ack(ts=ts, client_order_id=order["client_order_id"], order_id=order_id, status=OrderStatus.FILLED,
              filled_qty=qty, avg_price=avg, fills=fills).to_wire()
    return ack


def rejected_ack(order: dict, order_id: str, reason: str = "NO_BOOK") -> dict:
    """The paper broker's answer to an order it refused: REJECTED, nothing filled."""
    return Ack(ts=1, client_order_id=order["client_order_id"], order_id=order_id, status=OrderStatus.REJECTED,
               filled_qty=Decimal(0), reason=reason).to_wire()


def events_of(ack: dict, symbol: str) -> list[tuple[str, messages.Message]]:
    """The `fill.*` events and the `order.*` event the paper broker publishes after `ack`."""
    out: list[tuple[str, messages.Message]] = []
    for f in ack["fills"]:
        out.append((f"fill.{symbol}", Fill(ts=f["ts"], fill_id=f["fill_id"], order_id=f["order_id"],
                                           client_order_id=f["client_order_id"], symbol=f["symbol"],
                                           side=Side(f["side"]), price=Decimal(f["price"]), qty=Decimal(f["qty"]),
                                           fee=Decimal(f["fee"]), fee_asset=f["fee_asset"],
                                           liquidity=Liquidity(f["liquidity"]), exch_ts=f["exch_ts"])))
    out.append((f"order.{symbol}", OrderEvent(ts=ack["ts"], order_id=ack["order_id"],
                                              client_order_id=ack["client_order_id"], symbol=symbol,
                                              status=OrderStatus(ack["status"]),
                                              filled_qty=Decimal(ack["filled_qty"]),
                                              avg_price=Decimal(ack["avg_price"]) if ack.get("avg_price") else None)))
    return out


# -- the lies ------------------------------------------------------------------------------

def _fill0(**changes):
    def mutate(ack: dict, order: dict) -> dict:
        ack["fills"][0].update(changes)
        return ack
    return mutate


def _top(**changes):
    def mutate(ack: dict, order: dict) -> dict:
        ack.update(changes)
        return ack
    return mutate


def _scale_qty(k: Decimal):
    def mutate(ack: dict, order: dict) -> dict:
        for f in ack["fills"]:
            f["qty"] = format(Decimal(f["qty"]) * k, "f")
        ack["filled_qty"] = format(Decimal(ack["filled_qty"]) * k, "f")
        return ack
    return mutate


def _scale_price(k: Decimal):
    def mutate(ack: dict, order: dict) -> dict:
        for f in ack["fills"]:
            f["price"] = format(Decimal(f["price"]) * k, "f")
        ack["avg_price"] = format(Decimal(ack["avg_price"]) * k, "f")
        return ack
    return mutate


def _both_qty(value):  # the fill and the order's filled_qty agree on a lie
    def mutate(ack: dict, order: dict) -> dict:
        ack["fills"][0]["qty"] = ack["filled_qty"] = value
        return ack
    return mutate


def _without(key: str):
    def mutate(ack: dict, order: dict) -> dict:
        del ack["fills"][0][key]
        return ack
    return mutate


def _half_fills(ack: dict, order: dict) -> dict:  # filled_qty says all, the fills only half
    q = Decimal(ack["fills"][0]["qty"]) / 2
    ack["fills"][0]["qty"] = format(q, "f")
    return ack


def _extra_fill(ack: dict, order: dict) -> dict:  # one more fill than filled_qty counts
    extra = copy.deepcopy(ack["fills"][0])
    extra["fill_id"] += "-x"
    ack["fills"].append(extra)
    return ack


def _duplicate_ids(ack: dict, order: dict) -> dict:  # two halves under one fill id
    first = ack["fills"][0]
    q = Decimal(first["qty"]) / 2
    first["qty"] = format(q, "f")
    ack["fills"].append({**first})
    return ack


def _filled_nothing(ack: dict, order: dict) -> dict:
    ack.update(filled_qty="0", fills=[], avg_price=None)
    return ack


def _other_side(ack: dict, order: dict) -> dict:
    ack["fills"][0]["side"] = "SELL" if order["side"] == "BUY" else "BUY"
    return ack


def _zero_fill(ack: dict, order: dict) -> dict:  # an added fill of nothing (the sum still holds)
    extra = {**ack["fills"][0], "fill_id": ack["fills"][0]["fill_id"] + "-0", "qty": "0", "fee": "0"}
    ack["fills"].append(extra)
    return ack


def _other_symbol(ack: dict, order: dict) -> dict:  # another symbol risk trades
    ack["fills"][0]["symbol"] = "ETHUSDT" if order["symbol"] != "ETHUSDT" else "BTCUSDT"
    return ack


def _pending_with_fills(ack: dict, order: dict) -> dict:
    ack["status"] = "PENDING"
    return ack


def _huge_fee(ack: dict, order: dict) -> dict:  # a fee of the whole notional
    f = ack["fills"][0]
    f["fee"] = format(Decimal(f["price"]) * Decimal(f["qty"]), "f")
    return ack


def _packed(value):
    def mutate(ack: dict, order: dict) -> bytes:
        return value if isinstance(value, bytes) else msgpack.packb(value)
    return mutate


def _trailing(ack: dict, order: dict) -> bytes:
    return msgpack.packb(ack) + b"\x00"


MUTATIONS: dict[str, Callable[[dict, dict], dict | bytes]] = {
    "nan_qty": _both_qty("NaN"),
    "nan_price": _fill0(price="NaN"),
    "float_nan_price": _fill0(price=float("nan")),
    "snan_qty": _both_qty("sNaN"),
    "infinity_qty": _both_qty("Infinity"),
    "infinity_price": _fill0(price="Infinity"),
    "qty_1e400": _both_qty("1e400"),
    "price_1e400": _fill0(price="1e400"),
    "negative_qty": _scale_qty(Decimal(-1)),
    "negative_price": _scale_price(Decimal(-1)),
    "zero_qty_fill": _zero_fill,
    "zero_price": _fill0(price="0"),
    "fills_10x_the_order": _scale_qty(Decimal(10)),
    "filled_qty_not_the_fills_sum": _half_fills,
    "an_extra_fill": _extra_fill,
    "price_100x_the_book": _scale_price(Decimal(100)),
    "price_a_hundredth_of_the_book": _scale_price(Decimal("0.01")),
    "wrong_symbol": _other_symbol,
    "symbol_not_traded": _fill0(symbol="DOGEUSDT"),
    "wrong_side": _other_side,
    "wrong_client_order_id": _top(client_order_id="someone-else"),
    "fill_of_another_order": _fill0(client_order_id="someone-else"),
    "fill_of_another_order_id": _fill0(order_id="o-other"),
    "fill_without_fill_id": _without("fill_id"),
    "fill_without_qty": _without("qty"),
    "fill_without_price": _without("price"),
    "fill_without_side": _without("side"),
    "fill_qty_a_float": _fill0(qty=0.005),
    "fill_id_an_int": _fill0(fill_id=7),
    "fill_side_lowercase": _fill0(side="buy"),
    "fill_fee_asset_a_list": _fill0(fee_asset=["USDT"]),
    "fill_not_a_map": _top(fills=["fill"]),
    "fills_not_a_list": _top(fills="none"),
    "duplicate_fill_ids": _duplicate_ids,
    "filled_status_with_nothing_filled": _filled_nothing,
    "pending_status_with_fills": _pending_with_fills,
    "unknown_status": _top(status="DONE"),
    "filled_qty_a_float": _top(filled_qty=0.005),
    "fee_nan": _fill0(fee="NaN"),
    "fee_negative": _fill0(fee="-0.5"),
    "fee_the_whole_notional": _huge_fee,
    "avg_price_100x": _top(avg_price="10050"),
    "order_id_an_int": _top(order_id=5),
    "wrong_version": _top(v=2),
    "garbage_msgpack": _packed(b"\xc1\xff\x00garbage"),
    "not_a_map": _packed([1, 2, 3]),
    "trailing_bytes": _trailing,
}

# Changes that leave the ack true: risk must relay these as it relays an honest one.
BENIGN: dict[str, Callable[[dict, dict], dict | bytes]] = {
    "extra_key": _top(venue="paper", debug={"x": [1, 2]}),
    "extra_fill_key": _fill0(note="maker rebate none"),
    "other_reason_text": _top(reason="ok"),
    "other_ts": _top(ts=2**62),
}


# -- the broker -----------------------------------------------------------------------------

class HostileBroker:
    """A ROUTER bound on `rep` (and a PUB on `pub`, if given), served by a thread until `stop()`.
    Each request is handed to `respond` (frames, unpacked payload or None) on that thread; what
    it returns is sent, each `Send` after its delay. `publish()` queues events from any thread.
    Endpoints may name port `*` (no race for a free port): `rep`/`pub_endpoint` hold the bound ones
    after `start()`."""

    def __init__(self, rep: str, pub: str | None = None, respond: Respond | None = None) -> None:
        self.rep, self.pub_endpoint = rep, pub
        self.respond: Respond = respond or (lambda frames, order: [])
        self.requests = 0
        self._queue: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._seq = itertools.count()
        self._pub_seq: dict[str, int] = {}
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="HostileBroker", daemon=True)

    def start(self) -> "HostileBroker":
        self._thread.start()
        if not self._ready.wait(5):
            raise AssertionError("the hostile broker did not bind")
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        assert not self._thread.is_alive(), "the hostile broker did not stop"
        if self._error is not None:
            raise AssertionError(f"the hostile broker failed: {self._error!r}")

    def publish(self, topic: str, msg: messages.Message | bytes, delay_s: float = 0.0) -> None:
        """Queue an event (a message, encoded with this PUB's `seq`, or raw payload bytes)."""
        self._queue.put((topic, msg, delay_s))

    def _encode(self, topic: str, msg: messages.Message | bytes) -> bytes:
        if isinstance(msg, bytes):
            return msg
        seq = self._pub_seq[topic] = self._pub_seq.get(topic, 0) + 1
        return messages.encode(msg, seq)

    def _run(self) -> None:
        ctx = zmq.Context.instance()
        router = ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        pub = None
        try:
            router.bind(self.rep)
            self.rep = router.getsockopt_string(zmq.LAST_ENDPOINT)
            if self.pub_endpoint:
                pub = ctx.socket(zmq.PUB)
                pub.setsockopt(zmq.LINGER, 0)
                pub.setsockopt(zmq.SNDHWM, 100_000)
                pub.bind(self.pub_endpoint)
                self.pub_endpoint = pub.getsockopt_string(zmq.LAST_ENDPOINT)
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            router.close()
            return
        self._ready.set()
        due: list[Send] = []
        try:
            while not self._stop.is_set():
                wait = POLL_MS if not due else max(0, min(POLL_MS, int((due[0].due - time.monotonic()) * 1000)))
                if router.poll(wait):
                    while router.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                        frames = router.recv_multipart()
                        self.requests += 1
                        try:
                            order = msgpack.unpackb(frames[-1], raw=False)
                        except Exception:
                            order = None
                        for send in self.respond(frames, order) or ():
                            self._schedule(due, send)
                while True:
                    try:
                        topic, msg, delay = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    self._schedule(due, Send(frames=[topic.encode(), self._encode(topic, msg)], delay_s=delay,
                                             pub=True))
                now = time.monotonic()
                while due and due[0].due <= now:
                    send = heapq.heappop(due)
                    if send.pub:
                        if pub is not None:
                            pub.send_multipart(send.frames)
                    else:
                        router.send_multipart(send.frames)
                    send.sent_at = time.monotonic()
        except BaseException as exc:  # reported by stop(): a broken fake must fail its test
            self._error = exc
        finally:
            router.close(linger=0)
            if pub is not None:
                pub.close(linger=0)

    def _schedule(self, due: list, send: Send) -> None:
        send.due = time.monotonic() + send.delay_s
        send.seq = next(self._seq)
        heapq.heappush(due, send)
