"""Flask app: thin JSON and Prometheus views over services.api.queries."""
from __future__ import annotations

import logging
import os
import re
import time

import peewee as pw
from flask import Flask, Response, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from werkzeug.exceptions import HTTPException

from services.api import queries
from shared.config import Config
from shared.db import database, init_db

log = logging.getLogger("qf.api")

_SYMBOL = re.compile(r"[A-Za-z0-9]{1,20}")


class ApiError(Exception):
    """An error the client gets as `{"error": {"code", "message"}}` with `status`.
    Raised by views; turned into a response by the app's error handler."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def bad_param(message: str) -> ApiError:
    return ApiError(400, "bad_param", message)


class _Database:
    """Opens the database lazily, once per process: gunicorn forks workers, and a
    SQLite connection must never cross a fork, so each worker opens its own."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.db: pw.Database | None = None
        self.pid: int | None = None

    def ensure(self) -> None:
        """Bind the models to this app's database. Raises ApiError(503) if it cannot be opened."""
        if self.db is None or self.pid != os.getpid():
            try:
                self.db = init_db(self.target)
            except Exception as exc:  # sqlite3/peewee/OS errors alike mean "unavailable"
                self.db = None
                log.warning("db_open_failed", extra={"detail": str(exc)})  # the client gets no paths
                raise ApiError(503, "db_unavailable", "the database cannot be opened") from exc
            self.pid = os.getpid()
        elif database.obj is not self.db:
            database.initialize(self.db)  # another app in this process (tests) rebound the models


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


def _params(allowed: set[str]) -> dict[str, str]:
    unknown = sorted(set(request.args) - allowed)
    if unknown:
        raise bad_param(f"unknown parameter(s): {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    return {k: request.args[k] for k in allowed if k in request.args}


def _int_param(args: dict, name: str, default: int | None, lo: int, hi: int) -> int | None:
    raw = args.get(name)
    if raw is None:
        return default
    if not re.fullmatch(r"[0-9]{1,19}", raw.strip()):
        raise bad_param(f"{name} must be an integer between {lo} and {hi}, got {raw[:40]!r}")
    value = int(raw)
    if not lo <= value <= hi:
        raise bad_param(f"{name} must be between {lo} and {hi}, got {value}")
    return value


def _symbol_param(args: dict) -> str | None:
    raw = args.get("symbol")
    if raw is None:
        return None
    if not _SYMBOL.fullmatch(raw):
        raise bad_param(f"symbol must be letters and digits like BTCUSDT, got {raw[:40]!r}")
    return raw.upper()


class _TradingCollector:
    """Prometheus collector over one `queries.summary()` (a fresh registry per request,
    so every gunicorn worker reports the database, not its own memory)."""

    def __init__(self, summary: dict) -> None:
        self.summary = summary

    def collect(self):
        s = self.summary
        yield CounterMetricFamily("qf_fills", "Fills recorded in the database.", value=s["fills"])
        orders = GaugeMetricFamily("qf_orders", "Orders by status.", labels=["status"])
        for status, n in sorted(s["orders"].items()):
            orders.add_metric([status], n)
        yield orders
        if s["equity"] is not None:
            # floats are fine here: Prometheus samples are float64; the JSON API stays exact
            yield GaugeMetricFamily("qf_equity", "Latest equity snapshot (quote asset).",
                                    value=float(s["equity"]["equity"]))
            yield GaugeMetricFamily("qf_cash", "Cash at the latest equity snapshot.",
                                    value=float(s["equity"]["cash"]))
        position = GaugeMetricFamily("qf_position", "Base position per symbol.", labels=["symbol"])
        realized = GaugeMetricFamily("qf_realized_pnl", "Realized P&L before fees per symbol.",
                                     labels=["symbol"])
        for pos in s["positions"]:
            position.add_metric([pos.symbol], float(pos.qty))
            realized.add_metric([pos.symbol], float(pos.realized_pnl))
        yield position
        yield realized


def create_app(cfg: Config) -> Flask:
    """The API app for `cfg`; the database is opened on the first request of each process."""
    app = Flask("services.api")
    db = _Database(cfg.common.db)
    app.extensions["qf_db"] = db

    @app.before_request
    def _open_db():
        if request.endpoint not in (None, "health"):  # health reports failures itself
            db.ensure()

    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError):
        return jsonify(error_body(exc.code, exc.message)), exc.status

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        code = (exc.name or "error").lower().replace(" ", "_")
        return jsonify(error_body(code, exc.description or exc.name)), exc.code

    @app.errorhandler(pw.DatabaseError)
    def _db_error(exc: pw.DatabaseError):
        log.warning("db_error", extra={"path": request.path, "detail": str(exc)})
        return jsonify(error_body("db_unavailable", "the database cannot be queried")), 503

    @app.errorhandler(Exception)
    def _internal(exc: Exception):
        log.exception("internal_error", extra={"path": request.path})
        return jsonify(error_body("internal", "internal server error")), 500

    @app.get("/health")
    def health():
        try:
            db.ensure()
            queries.ping()
        except (ApiError, pw.DatabaseError) as exc:
            log.warning("health_db_error", extra={"detail": str(exc)})
            return jsonify({"status": "error", "db": "error"}), 503
        return jsonify({"status": "ok", "db": "ok"})

    @app.get("/api/v1/trades")
    def trades():
        args = _params({"symbol", "limit", "since"})
        rows = queries.trades(symbol=_symbol_param(args),
                              limit=_int_param(args, "limit", queries.DEFAULT_LIMIT, 1, queries.MAX_LIMIT),
                              since=_int_param(args, "since", None, 0, 2**63 - 1))
        return jsonify({"trades": queries.jsonable(rows), "count": len(rows)})

    @app.get("/api/v1/positions")
    def positions():
        args = _params({"symbol"})
        found = queries.positions(_symbol_param(args))
        return jsonify({"positions": queries.jsonable(found)})

    @app.get("/api/v1/status")
    def status():
        _params(set())
        s = queries.summary()
        body = {"fills": s["fills"], "orders": s["orders"], "equity": s["equity"],
                "positions": {p.symbol: p.qty for p in s["positions"]}, "ts": time.time_ns()}
        return jsonify(queries.jsonable(body))

    @app.get("/metrics")
    def metrics():
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_TradingCollector(queries.summary()))
        return Response(generate_latest(registry), mimetype=None, content_type=CONTENT_TYPE_LATEST)

    return app
