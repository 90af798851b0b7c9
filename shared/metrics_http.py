"""Each service's own Prometheus /metrics: a registry of its collectors, served from a daemon thread.

Every service exports the same base beside its own figures: `process_*` (start time, CPU,
memory, open files: a restart shows as a new `process_start_time_seconds`), `python_*`,
`qf_alerts_total` (the alerts this process raised, shared/alerts.py) and
`qf_heartbeat_age_seconds`, the age of its liveness file: the HTTP thread keeps answering
while a service's loop is stuck, the file's age does not lie about that.
"""
from __future__ import annotations

import math
import os
import threading
import time
from pathlib import Path
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector, start_http_server
from prometheus_client.core import GaugeMetricFamily

from shared.alerts import ALERTS
from shared.errors import FatalError


class MetricsBindError(FatalError):
    """A service's /metrics address (QF_*_METRICS_BIND) cannot be served: the port is taken or
    the host is not an address of this machine. Raised by `serve` as the service starts its
    loop; handled like any FatalError at the top of `__main__`: one line, exit status 1, and
    `qf up` (or Compose's restart policy) starts the service again with a backoff."""


class HeartbeatCollector:
    """`qf_heartbeat_age_seconds`: time since the service's loop last touched its liveness file
    (shared.runtime.Liveness, the file `qf health` reads), from one stat() per scrape; NaN
    while there is no file (before the first touch, after a clean stop)."""

    def __init__(self, path: str | Path, clock: Callable[[], float] = time.time) -> None:
        self.path, self.clock = str(path), clock

    def collect(self):
        try:
            age = max(0.0, self.clock() - os.stat(self.path).st_mtime)
        except OSError:
            age = math.nan
        yield GaugeMetricFamily("qf_heartbeat_age_seconds", "Time since the service's loop last touched its "
                                "liveness file (QF_RUN_DIR/SERVICE.alive; every QF_HEARTBEAT_MS)", value=age)


class MetricsServer:
    """A running /metrics endpoint: `port` (the one bound: useful with port 0) and `close()`."""

    def __init__(self, httpd, thread: threading.Thread, registry: CollectorRegistry) -> None:
        self.httpd, self.thread, self.registry = httpd, thread, registry
        self.port: int = httpd.server_address[1]
        self._closed = False

    def close(self) -> None:
        """Stop serving and release the port; idempotent. Returns within the server's poll
        interval (0.5 s)."""
        if self._closed:
            return
        self._closed = True
        self.httpd.shutdown()
        self.httpd.server_close()


def registry_of(collectors: Iterable, heartbeat: str | Path | None = None) -> CollectorRegistry:
    """A registry of `collectors` (prometheus_client metrics or objects with `collect()`) and the
    base every service exports: process_*, python_*, qf_alerts_total and, given the liveness
    file `heartbeat`, qf_heartbeat_age_seconds."""
    registry = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    registry.register(ALERTS)
    if heartbeat is not None:
        registry.register(HeartbeatCollector(heartbeat))
    for collector in collectors:
        registry.register(collector)
    return registry


def serve(bind: str, setting: str, collectors: Iterable, heartbeat: str | Path | None = None) -> MetricsServer:
    """Serve /metrics of `collectors` (and the base, see `registry_of`) on `bind`, "host:port" as
    shared.config reads QF_*_METRICS_BIND (port 0: any free port; an IPv6 host in brackets), in a
    daemon thread; a scrape reads the collectors on that thread. Raises MetricsBindError naming
    `setting` (the variable `bind` came from) when the address cannot be bound."""
    host, _, port = bind.rpartition(":")
    registry = registry_of(collectors, heartbeat)
    try:
        httpd, thread = start_http_server(int(port), addr=host.strip("[]"), registry=registry)
    except OSError as exc:  # EADDRINUSE, EADDRNOTAVAIL, a host name that does not resolve
        raise MetricsBindError(f"cannot serve metrics on {bind} ({setting}): {exc.strerror or exc}") from None
    return MetricsServer(httpd, thread, registry)
