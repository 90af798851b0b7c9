"""Runs the API app under gunicorn (sync workers that take whole requests, key=value logs, quick graceful stop)."""
from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

from gunicorn import util as gunicorn_util
from gunicorn.app.base import BaseApplication
from gunicorn.glogging import Logger as GunicornLogger

from services.api.app import create_app
from services.api.errors import error_body, error_code
from shared import curve
from shared.config import Config, mask_secrets
from shared.errors import ConfigError

log = logging.getLogger("qf.api")

GRACEFUL_TIMEOUT_S = 5  # SIGTERM → workers get this long to finish a request, then are killed
WORKER_TIMEOUT_S = 30  # a worker silent this long is restarted


class KeyValueLogger(GunicornLogger):
    """gunicorn's logger, but its lines go through the root logger (key=value on
    stdout) when one is configured, instead of gunicorn's own stderr format."""

    def setup(self, cfg) -> None:
        super().setup(cfg)
        if logging.getLogger().handlers:
            for handler in [h for h in self.error_log.handlers if getattr(h, "_gunicorn", False)]:
                self.error_log.removeHandler(handler)
            self.error_log.propagate = True


def write_json_error(sock, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn's answer to a request it refuses before the app sees it (a bad request line,
    headers over its limits: 400/414/431; a crash outside Flask: 500), as the API's JSON error
    instead of gunicorn's HTML page. Same signature as `gunicorn.util.write_error`."""
    body = json.dumps(error_body(error_code(reason), (mesg or reason)[:200])).encode()
    head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    gunicorn_util.write_nonblock(sock, head.encode("latin-1") + body)


def gunicorn_options(cfg: Config) -> dict[str, Any]:
    """gunicorn settings for `cfg`: bind, worker count, sync workers, no access log."""
    return {
        "bind": cfg.api.bind,
        "workers": cfg.api.workers,
        # sync: measured against gthread (4 and 16 threads, keep-alive) under 200 connections on
        # 2 cores: no more requests a second, and more spread (the GIL, not the sockets, binds);
        # handed only connections whose request has arrived (services/api/worker.py)
        "worker_class": "services.api.worker.ApiWorker",
        "graceful_timeout": GRACEFUL_TIMEOUT_S,
        "timeout": WORKER_TIMEOUT_S,
        "accesslog": None,  # request counts belong in metrics, not in one log line per request
        "loglevel": cfg.common.log_level.lower(),
        "logger_class": KeyValueLogger,
        "proc_name": "qf-api",
        # no preload: the app (and its database) is created in each worker after the fork
        "preload_app": False,
    }


class ApiApplication(BaseApplication):
    """gunicorn application whose workers each build `create_app(cfg)`."""

    def __init__(self, cfg: Config, options: dict[str, Any] | None = None) -> None:
        self.qf_cfg = cfg
        self.options = gunicorn_options(cfg) if options is None else options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)
        # gunicorn has no setting for its error pages; its workers call util.write_error, so
        # it is replaced in this (the API's own) process before the workers fork: every
        # answer of the API is JSON, the ones gunicorn gives itself too
        gunicorn_util.write_error = write_json_error
        # gunicorn ≥ 25.1 opens a control socket in $HOME by default: one per host
        # user, so two APIs (or a test run beside a real one) would fight over it
        if "control_socket_disable" in self.cfg.settings:
            self.cfg.set("control_socket_disable", True)

    def load(self):
        app = create_app(self.qf_cfg)
        app.extensions["qf_watch"].start()  # in the worker (no preload): heartbeats heard before /health asks
        return app


def run_api(cfg: Config) -> None:
    """Serve the API on `cfg.api.bind` with `cfg.api.workers` workers; blocks until
    gunicorn's master stops (SIGTERM/SIGINT: graceful, at most GRACEFUL_TIMEOUT_S). A CURVE key
    of the API's that cannot be read (QF_CURVE_KEYS) stops it before gunicorn starts: one line on
    stderr, SystemExit(2), as `qf` does for any ConfigError."""
    try:  # read in the master, so the workers fork with the keys already loaded (shared/curve.py)
        curve.load(cfg, "api")
    except ConfigError as exc:
        print(mask_secrets(f"qf api: {exc}"), file=sys.stderr)
        raise SystemExit(2) from None
    log.info("api_starting", extra={"bind": cfg.api.bind, "workers": cfg.api.workers})
    master = os.getpid()
    try:
        ApiApplication(cfg).run()
    except SystemExit as exc:
        # the arbiter exits on halt: in the master a clean halt becomes a return; a
        # worker's exit (it unwinds through here after the fork) must stay an exit
        if os.getpid() != master or exc.code not in (0, None):
            raise
    log.info("api_stopped")
