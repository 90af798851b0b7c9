"""Flask app: thin JSON and Prometheus views over the control layer (services/control)."""
from __future__ import annotations

import hmac
import logging
import re
import threading
import time

import peewee as pw
from flask import Flask, Response, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from services.api.body import read_object
from services.api.errors import bad_param, error_body, error_code
from services.api.pause import Clock, PauseCollector
from services.control import queries
from services.control import risk as control_risk
from services.control.dbreader import DatabaseUnavailable, ReadOnlyDatabase
from services.control import Control
from services.control.risk import RiskRefused, RiskUnreachable
from shared.config import Config
from shared.enums import ControlAction
from shared.errors import ApiError

log = logging.getLogger("qf.api")

_SYMBOL = re.compile(r"[A-Za-z0-9]{1,20}")

# Only the control endpoint takes a body, one small flat object; nothing else reads one.
CONTROL_MAX_BYTES = 4096
TELEGRAM_MAX_BYTES = 32 * 1024  # one Update: a message, perhaps with the one it replies to
MAX_BODY_BYTES = 64 * 1024

__all__ = ["ApiError", "bad_param", "error_body", "create_app", "check_token", "ask_risk",
           "CONTROL_MAX_BYTES", "MAX_BODY_BYTES"]


def check_token(expected: str, header: str | None) -> None:
    """Control endpoints need `Authorization: Bearer <QF_API_TOKEN>`. Raises ApiError: 403
    `control_disabled` when no token is configured, 401 without a bearer token, 403 for a wrong one."""
    if not expected:
        raise ApiError(403, "control_disabled", "control endpoints are off: QF_API_TOKEN is not set")
    scheme, _, given = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise ApiError(401, "unauthorized", "this endpoint needs an Authorization: Bearer token")
    if not hmac.compare_digest(given.strip().encode(), expected.encode()):
        raise ApiError(403, "forbidden", "the bearer token is not valid")


def ask_risk(cfg: Config, action: ControlAction, by: str, reason: str) -> dict:
    """The control layer's `ask_risk` (services/control/risk.py), its errors as the API answers
    them: 503 when risk does not answer in time, 502 when it answers with an error."""
    try:
        return control_risk.ask_risk(cfg, action, by, reason)
    except RiskUnreachable as exc:
        raise ApiError(503, "risk_unavailable", str(exc)) from None
    except RiskRefused as exc:
        raise ApiError(502, exc.code, exc.message) from None


def _names(names) -> str:
    """Names a client sent, for an error message: at most 5, each cut to 40 characters."""
    shown = sorted(names)
    return ", ".join(repr(n[:40]) for n in shown[:5]) + (f" and {len(shown) - 5} more" if len(shown) > 5 else "")


def _valid_text(value: str) -> bool:
    try:
        value.encode("utf-8")  # a lone surrogate (`"\ud800"` in JSON) cannot be sent on to risk
    except UnicodeEncodeError:
        return False
    return True


def _control_body() -> tuple[ControlAction, str, str]:
    body = read_object(request, CONTROL_MAX_BYTES)
    unknown = set(body) - {"action", "reason", "by"}
    if unknown:
        raise bad_param(f"unknown field(s): {_names(unknown)}; allowed: action, reason, by")
    action = body.get("action")
    if action not in ("HALT", "RESUME", "FLATTEN"):
        raise bad_param(f"action must be HALT, RESUME or FLATTEN, got {str(action)[:40]!r}")
    reason, by = body.get("reason"), body.get("by", "")
    if not isinstance(reason, str) or not reason.strip() or len(reason) > 500 or not _valid_text(reason):
        raise bad_param("reason must be a non-empty string of at most 500 characters")
    if not isinstance(by, str) or len(by) > 80 or not _valid_text(by):
        raise bad_param("by must be a string of at most 80 characters")
    return ControlAction(action), f"api:{by}" if by else "api", reason.strip()


def _params(allowed: set[str]) -> dict[str, str]:
    unknown = set(request.args) - allowed
    if unknown:
        raise bad_param(f"unknown parameter(s): {_names(unknown)}; allowed: {', '.join(sorted(allowed)) or 'none'}")
    repeated = sorted(k for k in allowed if len(request.args.getlist(k)) > 1)
    if repeated:  # which one would count is a guess: refuse rather than pick
        raise bad_param(f"parameter(s) given more than once: {', '.join(repeated)}")
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
            realized.add_metric([pos.symbol], float(pos.realized))
        yield position
        yield realized


def create_app(cfg: Config, clock: Clock = time.time_ns) -> Flask:
    """The API app for `cfg`; the database is opened on the first request of each process.
    `clock` (ns since the epoch) is the wall clock of `/api/v1/status` and the pause's metrics."""
    app = Flask("services.api")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES  # views that read a body set their own, smaller cap
    db = ReadOnlyDatabase(cfg.common.db)
    app.extensions["qf_db"] = db
    ctl = Control(cfg, clock, db)  # the queries and actions every front end shares
    pause = ctl.pause
    # /flatten's asked confirmations, chat id -> ns deadline: per process (another gunicorn
    # worker asks again); the chats already logged as refused (once each)
    tg_pending: dict[int, int] = {}
    tg_refused: set[int] = set()
    tg_lock = threading.Lock()

    @app.before_request
    def _open_db():
        # health reports failures itself; control and the webhook check their caller first
        if request.endpoint not in (None, "health", "control", "risk_state", "telegram_webhook"):
            db.ensure()  # per request: notices a database file deleted or replaced since the last one

    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError):
        resp = jsonify(error_body(exc.code, exc.message))
        if exc.status == 401:
            resp.headers["WWW-Authenticate"] = 'Bearer realm="quantumflow"'
        return resp, exc.status

    @app.errorhandler(DatabaseUnavailable)
    def _db_unavailable(exc: DatabaseUnavailable):
        return jsonify(error_body(exc.code, exc.message)), 503  # the client gets no paths

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        if exc.code is None:  # not an error answer (werkzeug's RoutingException): as it is
            return exc
        resp = jsonify(error_body(error_code(exc.name or "error"), exc.description or exc.name))
        if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
            resp.headers["Allow"] = ", ".join(sorted(exc.valid_methods))
        return resp, exc.code

    @app.errorhandler(pw.DatabaseError)
    def _db_error(exc: pw.DatabaseError):
        log.warning("db_error", extra={"path": request.path, "detail": str(exc)})
        db.close()  # the next request opens a fresh connection
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
        except DatabaseUnavailable as exc:  # db.ensure() logged it, once per outage
            return jsonify({"status": "error", "db": "error", **error_body(exc.code, exc.message)}), 503
        except pw.DatabaseError as exc:
            log.warning("health_db_error", extra={"detail": str(exc)})
            db.close()
            return jsonify({"status": "error", "db": "error",
                            **error_body("db_unavailable", "the database cannot be queried")}), 503
        return jsonify({"status": "ok", "db": "ok"})

    @app.get("/api/v1/trades")
    def trades():
        args = _params({"symbol", "limit", "since"})
        rows = ctl.trades(symbol=_symbol_param(args),
                          limit=_int_param(args, "limit", queries.DEFAULT_LIMIT, 1, queries.MAX_LIMIT),
                          since=_int_param(args, "since", None, 0, 2**63 - 1))
        return jsonify({"trades": queries.jsonable(rows), "count": len(rows)})

    @app.get("/api/v1/positions")
    def positions():
        args = _params({"symbol"})
        found = ctl.positions(_symbol_param(args))
        return jsonify({"positions": queries.jsonable(found)})

    @app.get("/api/v1/status")
    def status():
        _params(set())
        return jsonify(queries.jsonable(ctl.status()))

    @app.post("/api/v1/control")
    def control():
        check_token(cfg.api.token, request.headers.get("Authorization"))
        action, by, reason = _control_body()
        answer = ask_risk(cfg, action, by, reason)
        log.warning("control", extra={"action": action.value, "by": by, "reason": reason, "state": answer["state"]})
        return jsonify(queries.jsonable(answer))

    @app.get("/api/v1/risk/state")
    def risk_state():
        check_token(cfg.api.token, request.headers.get("Authorization"))
        _params(set())
        return jsonify(queries.jsonable(ask_risk(cfg, ControlAction.STATE, "api", "")))

    @app.post("/telegram/webhook")
    def telegram_webhook():
        """Bot commands (services/notifier/commands.py). 403 unless the secret header matches
        QF_TELEGRAM_WEBHOOK_SECRET; 200 `{}` and nothing done for a chat not allowed; the replies
        go out by sendMessage before the 200 (a failed send is logged, not retried)."""
        from services.notifier import commands
        n = cfg.notifier
        if not n.webhook_secret or not n.telegram_token:
            raise ApiError(403, "telegram_disabled",
                           "Telegram commands are off: QF_TELEGRAM_WEBHOOK_SECRET or QF_TELEGRAM_TOKEN is not set")
        given = request.headers.get("X-Telegram-Bot-Api-Secret-Token", "")
        if not hmac.compare_digest(given.encode("utf-8", "replace"), n.webhook_secret.encode()):
            raise ApiError(403, "forbidden", "the secret token is not valid")
        update = read_object(request, TELEGRAM_MAX_BYTES)
        parsed = commands.parse(update)
        if parsed is None:
            return jsonify({})
        chat_id = parsed[0]
        if str(chat_id) not in n.allowed_chats:
            with tg_lock:
                first = chat_id not in tg_refused
                if first and len(tg_refused) < 1000:  # bounded: a flood of chat ids cannot grow it
                    tg_refused.add(chat_id)
            if first:
                log.warning("telegram_chat_refused", extra={"chat_id": chat_id})
            return jsonify({})
        with tg_lock:  # one command at a time: the pending confirmations are shared
            replies = commands.handle(update, ctl, clock(), tg_pending, n.report_at)
        for outcome in commands.send_replies(cfg, chat_id, replies):
            if outcome.kind != "sent":
                log.warning("telegram_reply_failed", extra={"chat_id": chat_id, "kind": outcome.kind,
                                                            "detail": outcome.detail})
        return jsonify({})

    @app.get("/metrics")
    def metrics():
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_TradingCollector(queries.summary()))
        registry.register(PauseCollector(pause, clock))
        return Response(generate_latest(registry), mimetype=None, content_type=CONTENT_TYPE_LATEST)

    return app
