"""What the benchmarks share: free loopback ports and a clean environment for service processes."""
from __future__ import annotations

import os
import random
import socket


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_HANDED: set[int] = set()


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago, chosen at run time: below the
    kernel's ephemeral range (so no outgoing connection takes it as its source port before the
    service binds it), in this pytest-xdist worker's own slice (two workers never hand out the
    same one), never the same twice in this process; the kernel's choice if none is found."""
    high = _ephemeral_low()
    low = max(1024, high - 12768)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:]
    n, count = (int(worker) if worker.isdigit() else 0), max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    span = (high - low) // count
    start = low + (n % count) * span
    for _ in range(500):
        port = random.randrange(start, start + span)
        if port in _HANDED:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED.add(port)
        return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_environ() -> dict[str, str]:
    """os.environ without QF_ variables: benchmarks set every setting they rely on."""
    return {k: v for k, v in os.environ.items() if not k.startswith("QF_")}
