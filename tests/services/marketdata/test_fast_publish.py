"""The router's direct `book.*` encoding sends exactly what Publisher.publish(Book(...)) would."""
import msgpack

from services.marketdata.records import RawFrame, SnapshotRecord
from shared import messages
from tests.services.marketdata.test_service import Bus, frame, make_router, spot  # noqa: F401 (a fixture)


class ListPub:
    """Not a shared.bus.Publisher, so the router takes its general path: Book dataclasses."""

    def __init__(self) -> None:
        self.sent: list = []

    def publish(self, topic, msg) -> None:
        self.sent.append((topic, msg))

    def close(self) -> None:
        pass


def _feed(router, snap, events) -> None:
    router.dispatch(SnapshotRecord(1, "BTCUSDT", snap), 1)
    for i, data in enumerate(events):
        router.dispatch(RawFrame(1000 + i, frame("btcusdt@depth@100ms", data)), 2000 + i)


def test_fast_path_bytes_equal_the_generic_encoder(spot):
    snap, events = spot
    events = [e for e in events if e["u"] > snap["lastUpdateId"]][:60]
    bus = Bus()
    try:
        fast = make_router(bus.pub)
        _feed(fast, snap, events)
        bus.pub.publish("zz.end", messages.Heartbeat(ts=0, service="end", pid=0, started_ts=0, status="x"))
        payloads = []
        while True:
            assert bus.sub.sock.poll(5000), "published messages did not arrive"
            topic, payload = bus.sub.sock.recv_multipart()
            if topic == b"zz.end":
                break
            if topic == b"book.BTCUSDT":
                payloads.append(payload)
    finally:
        bus.close()
    slow = make_router(ListPub())
    _feed(slow, snap, events)
    books = [m for t, m in slow.pub.sent if t == "book.BTCUSDT"]
    assert len(payloads) == len(books) > 50
    for seq, (payload, book) in enumerate(zip(payloads, books), start=1):
        got = messages.decode(payload)
        # Byte-identical to the generic Message.to_wire encoding, seq counted per topic as before.
        assert payload == msgpack.packb(messages.Message.to_wire(got, seq), use_bin_type=True)
        assert msgpack.unpackb(payload)["seq"] == seq
        assert got == book  # ts included: both were given the same times


def test_book_to_wire_equals_the_generic_one():
    book = messages.Book(ts=1, symbol="BTCUSDT", exch_ts=2, update_id=3, bids=[[1.5, 2.0]], asks=[[1.6, 1.0]],
                         mid=1.55, spread=0.1, spread_bps=645.16, imbalance=0.33, microprice=1.56, recv_ts=9)
    for seq in (None, 7):
        fast, generic = book.to_wire(seq), messages.Message.to_wire(book, seq)
        assert list(fast.items()) == list(generic.items())
        assert messages.encode(book, seq) == msgpack.packb(generic, use_bin_type=True)
