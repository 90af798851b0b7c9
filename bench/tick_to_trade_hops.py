"""Where tick-to-trade goes, hop by hop: `python -m bench.tick_to_trade_hops [SECONDS]`.

`python -m bench.tick_to_trade_hops 60 QF_RISK_SPIN_US=0` runs it with a setting changed.
A diagnostic beside `make bench`'s tick_to_trade (not one of its figures): the same four
processes on the same replay and settings (tick_to_trade.bench_env), each started through this
module, which wraps the socket calls of the order's path with wall-clock stamps (time.time_ns,
one clock for every process on the machine) and prints them when the process ends:

    A  marketdata received the frame (the book's recv_ts)   B  marketdata's PUB send began
    C  the strategy decoded the book                         D  the strategy sent its order
    E  risk read the order                                   F  risk's send to the broker returned
    G  the broker read it                                    H  the broker began its reply
    I  risk read the broker's answer                         J  risk's reply to the strategy returned
    K  the strategy had its answer

Each order's stamps are matched by time (the strategy has one order out at a time), and the
median, 90th and 99th percentile of each step printed: the steps that are a process's own work (B-A,
D-C, F-E, H-G, J-I) and the hops between processes (the rest), to set against the floor's
(bench/tick_to_trade_floor.py: the same hops, no work). Then the tail: for the slowest 2% of
the orders, which step was furthest above its own median (where a p99 goes)."""
from __future__ import annotations

import bisect
import collections
import sys
import tempfile
import time

STAMP = "QFSTAMP"
STEPS = (("md work", "A", "B"), ("md -> strategy", "B", "C"), ("strategy work", "C", "D"),
         ("strategy -> risk", "D", "E"), ("risk check", "E", "F"), ("risk -> broker", "F", "G"),
         ("broker work", "G", "H"), ("broker -> risk", "H", "I"), ("risk answer", "I", "J"),
         ("risk -> strategy", "J", "K"), ("total", "A", "K"))


def _stamp(point: str, *values: int) -> None:
    print(STAMP, point, time.time_ns(), *values, flush=False)


def _wrap(role: str) -> None:
    """Patch the socket calls `role` makes on the order's path to print stamps."""
    from shared import bus
    if role in ("risk", "broker"):
        recv, reply = bus.Server.recv, bus.Server.reply
        first, last = ("E", "J") if role == "risk" else ("G", "H")

        def server_recv(self, flags=0):
            out = recv(self, flags)
            _stamp(first)
            return out

        def server_reply(self, envelope, payload):
            if role == "broker":
                _stamp(last)
            reply(self, envelope, payload)
            if role == "risk":
                _stamp(last)
        bus.Server.recv, bus.Server.reply = server_recv, server_reply
    if role == "risk":
        from services.risk import link
        send, receive = link.BrokerLink.send, link.BrokerLink.receive

        def link_send(self, payload, callback):
            out = send(self, payload, callback)
            _stamp("F")
            return out

        def link_receive(self):
            _stamp("I")
            return receive(self)
        link.BrokerLink.send, link.BrokerLink.receive = link_send, link_receive
    if role == "strategy":
        request, sub_recv = bus.LazyPirateClient.request, bus.Subscriber.recv
        book: list[int] = []

        def client_request(self, payload, *args, **kwargs):
            _stamp("D", *book)
            out = request(self, payload, *args, **kwargs)
            _stamp("K")
            return out

        def subscriber_recv(self, flags=0):
            topic, msg = sub_recv(self, flags)
            if topic.startswith("book."):
                book[:] = [time.time_ns(), msg.recv_ts]
            return topic, msg
        bus.LazyPirateClient.request, bus.Subscriber.recv = client_request, subscriber_recv
    if role == "marketdata":
        import msgpack
        send_raw = bus.Publisher.send_raw

        def publish(self, topic, payload):
            t0 = time.time_ns()
            send_raw(self, topic, payload)
            if topic.startswith(b"book."):
                print(STAMP, "B", t0, msgpack.unpackb(payload)["recv_ts"], flush=False)
        bus.Publisher.send_raw = publish


def _points(lines: dict[str, list[str]]) -> dict[str, list[list[int]]]:
    out: dict[str, list[list[int]]] = collections.defaultdict(list)
    for name, got in lines.items():
        for line in got:
            if line.startswith(STAMP + " "):
                point, *values = line.split()[1:]
                out[point].append([int(v) for v in values])
    return out


def _orders(points: dict[str, list[list[int]]]) -> list[dict[str, int]]:
    """Each order's stamps: from the strategy's D (with its book's C and A), E..J each the first
    after the one before it, K the first answer after D; B by the book's recv_ts."""
    sent_at = {recv_ts: t for t, recv_ts in points["B"]}
    times = {p: sorted(v[0] for v in points[p]) for p in "EFGHIJK"}

    def after(point: str, t: int) -> int | None:
        i = bisect.bisect_left(times[point], t)
        return times[point][i] if i < len(times[point]) else None
    orders = []
    for d, *book in points["D"]:
        if len(book) != 2 or book[1] not in sent_at:
            continue
        order, t = {"A": book[1], "B": sent_at[book[1]], "C": book[0], "D": d, "K": after("K", d)}, d
        for p in "EFGHIJ":
            t = after(p, t)
            if t is None:
                break
            order[p] = t
        # the chain must end before this order's answer: else risk answered it without the broker,
        # and F..J belong to a later order
        if len(order) == 11 and order["K"] is not None and order["J"] <= order["K"]:
            orders.append(order)
    return orders


def trace(seconds: float, settings: dict[str, str] | None = None) -> list[dict[str, int]]:
    """The stamps of each order of a `seconds` run (`settings`: QF_ variables over the bench's)."""
    from bench.tick_to_trade import bench_env
    from services.supervisor import Stack
    env = {**bench_env(tempfile.mkdtemp(prefix="qf-hops-")), **(settings or {})}
    lines: dict[str, list[str]] = collections.defaultdict(list)
    stack = Stack(env, services=("broker", "risk", "strategy", "marketdata"),
                  on_line=lambda name, line: lines[name].append(line), restart=False)
    for c in stack.children:
        c.argv = [sys.executable, "-m", "bench.tick_to_trade_hops", "--role", c.name]
    stack.start()
    try:
        time.sleep(seconds)
    finally:
        stack.stop()
    orders = _orders(_points(lines))[3:]  # the first pay for connection set-up
    if len(orders) < 10:
        raise RuntimeError(f"only {len(orders)} orders traced in {seconds:g} s")
    return orders


def steps(orders: list[dict[str, int]]) -> list[tuple[str, float, float, float]]:
    """(step, p50, p90, p99 µs) of each step over `orders`."""
    from bench.stats import percentile
    out = []
    for name, a, b in STEPS:
        took = [(o[b] - o[a]) / 1000 for o in orders]
        out.append((name, percentile(took, 50), percentile(took, 90), percentile(took, 99)))
    return out


def tail(orders: list[dict[str, int]], share: float = 0.02) -> list[tuple[str, int, float]]:
    """Where the slowest `share` of the orders lost their time: for each step, in how many of
    them it was the step furthest above its own median, and by how much on average (µs)."""
    import statistics
    parts = STEPS[:-1]
    medians = {name: statistics.median(o[b] - o[a] for o in orders) for name, a, b in parts}
    slowest = sorted(orders, key=lambda o: o["K"] - o["A"])[-max(1, round(len(orders) * share)):]
    blamed: dict[str, list[float]] = collections.defaultdict(list)
    for o in slowest:
        name, excess = max(((name, o[b] - o[a] - medians[name]) for name, a, b in parts), key=lambda x: x[1])
        blamed[name].append(excess / 1000)
    return sorted(((name, len(v), sum(v) / len(v)) for name, v in blamed.items()), key=lambda x: (-x[1], -x[2]))


def main(argv: list[str]) -> int:
    if argv[:1] == ["--role"]:  # a service of the traced stack
        import atexit
        atexit.register(sys.stdout.flush)
        _wrap(argv[1])
        from services.cli import main as qf
        return qf(argv[1:2])
    seconds = float(argv[0]) if argv else 60.0
    settings = dict(a.split("=", 1) for a in argv[1:])  # e.g. QF_RISK_SPIN_US=0
    orders = trace(seconds, settings)
    for name, p50, p90, p99 in steps(orders):
        print(f"{name:<18} p50 {p50:8.0f} µs   p90 {p90:8.0f} µs   p99 {p99:8.0f} µs")
    print(f"the slowest 2% of {len(orders)} orders, by the step most above its median:")
    for name, n, excess in tail(orders):
        print(f"  {name:<18} {n:3d} orders, +{excess:6.0f} µs on average")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
