"""What the benchmarks share: free loopback ports and a clean environment for service processes."""
from __future__ import annotations

import os
import socket


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_environ() -> dict[str, str]:
    """os.environ without QF_ variables: benchmarks set every setting they rely on."""
    return {k: v for k, v in os.environ.items() if not k.startswith("QF_")}
