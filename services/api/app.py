"""The API: thin JSON and Prometheus views over the control layer (services/control).

flask-openapi3 (pydantic models in services/api/schemas.py) validates every query string and
writes the OpenAPI 3.1 document served at /api/v1/openapi.json; a parameter it refuses is a 400
with the API's JSON error body, like every other failure. Answers are serialised by orjson."""
from __future__ import annotations

import hmac
import logging
import threading
import time

import orjson
import peewee as pw
from flask import Response, g, request
from flask_openapi3 import Info, OpenAPI, Tag
from pydantic import ValidationError
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from services.api.body import json_kind, read_object
from services.api.collector import TradingCollector
from services.api.errors import bad_param, error_body, error_code
from services.api.pagecache import Page, PageCache
from services.api import schemas as sc
from services.api.pause import Clock, PauseCollector
from services.control import queries
from services.control import risk as control_risk
from services.control.dbreader import DatabaseUnavailable, ReadOnlyDatabase
from services.control import Control, check_by, check_reason
from services.control.risk import RiskRefused, RiskUnreachable
from services.control.watch import BusWatch
from shared.config import Config
from shared.enums import ControlAction
from shared.errors import ApiError

log = logging.getLogger("qf.api")

# Only the control endpoint takes a body, one small flat object; nothing else reads one.
CONTROL_MAX_BYTES = 4096
TELEGRAM_MAX_BYTES = 32 * 1024  # one Update: a message, perhaps with the one it replies to
MAX_BODY_BYTES = 64 * 1024
# Endpoints whose answer is a function of the query string and the database alone: their
# rendered pages are kept while the database is unchanged (services/api/pagecache.py)
CACHED_PAGES = frozenset(("trades", "orders", "signals"))

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


def _control_body() -> tuple[ControlAction, str, str]:
    body = read_object(request, CONTROL_MAX_BYTES)
    unknown = set(body) - {"action", "reason", "by"}
    if unknown:
        raise bad_param(f"unknown field(s): {_names(unknown)}; allowed: action, reason, by")
    action = body.get("action")
    if action not in ("HALT", "RESUME", "FLATTEN"):
        got = f"{action[:40]!r}" if isinstance(action, str) else ("none" if "action" not in body else json_kind(action))
        raise bad_param(f"action must be HALT, RESUME or FLATTEN, got {got}")
    try:  # the control layer's rules, the same for `qf halt` and Telegram
        reason, by = check_reason(body.get("reason")), check_by(body.get("by", ""))
    except ValueError as exc:
        raise bad_param(str(exc)) from None
    return ControlAction(action), f"api:{by}" if by else "api", reason



TAGS = {name: Tag(name=name, description=text) for name, text in (
    ("health", "liveness and readiness"), ("trading", "status, positions, P&L, equity, statistics"),
    ("history", "orders, trades and signals, newest first, keyset-paginated"),
    ("risk", "limits, state, denials; control through risk (bearer token)"),
    ("telegram", "the bot's webhook"))}
ERRORS = {400: sc.ErrorBody, 503: sc.ErrorBody}
SECURITY = {"bearer": {"type": "http", "scheme": "bearer"}}


def json_response(obj, status: int = 200, headers: dict | None = None, plain: bool = False) -> Response:
    """`obj` (Decimals as exact strings, see queries.jsonable; `plain`: already only JSON types)
    as a JSON answer."""
    return Response(orjson.dumps(obj if plain else queries.jsonable(obj)), status=status, headers=headers,
                    mimetype="application/json")


# pydantic's bound refusals, in the API's words (the same whatever the number's size: see schemas._digits)
_BOUNDS = {"less_than_equal": ("le", "over the maximum"), "greater_than_equal": ("ge", "under the minimum"),
           "less_than": ("lt", "must be less than"), "greater_than": ("gt", "must be more than")}


def _validation_error(exc: ValidationError) -> Response:
    """A query string pydantic refused: 400 bad_param naming the parameter and what it takes."""
    problems = exc.errors(include_url=False, include_input=False)
    first = problems[0] if problems else {"loc": (), "msg": "invalid", "type": ""}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("query", "body")]
    name = loc[0] if loc else "request"
    if first.get("type") == "extra_forbidden":
        unknown = [str(p["loc"][-1]) for p in problems if p.get("type") == "extra_forbidden" and p.get("loc")]
        model = getattr(sc, exc.title, None)
        allowed = sorted(f.alias or k for k, f in getattr(model, "model_fields", {}).items())
        text = f"unknown parameter(s): {_names(unknown)}; allowed: {', '.join(allowed) or 'none'}"
    elif sum(1 for p in problems if p.get("loc", ())[:1] == first.get("loc", ())[:1]) > 1:
        # a union failed every way (an Instant: ns or ISO-8601): say what it takes, not each way's failure
        text = f"{name[:40]}: expected ns since the epoch or an ISO-8601 time with its UTC offset" \
            if name in ("from", "to") else f"{name[:40]}: {first.get('msg', 'invalid')}"
    elif first.get("type") in _BOUNDS:
        bound = (first.get("ctx") or {}).get(_BOUNDS[first["type"]][0])
        text = f"{name[:40]}: {_BOUNDS[first['type']][1]} {bound}"
    else:
        text = f"{name[:40]}: {first.get('msg', 'invalid').removeprefix('Value error, ')}"
    return json_response(error_body("bad_param", text[:300]), 400)


def _range(query) -> tuple[int | None, int | None]:
    """(from, to) in ns; `to` at or before `from` is an empty range (an empty answer, not an error)."""
    return query.from_, query.to  # ns already: schemas.Instant parses them


def _symbol(value: str | None) -> str | None:
    return value.upper() if value else None


def _page(fn, **kwargs):
    try:
        return fn(**kwargs)
    except queries.BadCursor as exc:
        raise bad_param(str(exc)) from None


CSV_FIELDS = list(sc.Trade.model_fields)


def _trades_csv(rows: list[dict], next_cursor: str | None) -> Response:
    import csv
    import io
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in queries.jsonable(row).items()})
    headers = {"X-Next-Cursor": next_cursor} if next_cursor else {}
    return Response(out.getvalue(), mimetype="text/csv", headers=headers)


def document(app: OpenAPI) -> dict:
    """The OpenAPI document, with what flask-openapi3 cannot say from a view's signature: the
    bodies the control endpoint and the webhook read themselves (strictly, services/api/body.py)
    and the webhook's secret header. Made once per app."""
    doc = app.api_doc
    if not doc.get("x-qf-bodies"):
        paths = doc["paths"]
        paths["/api/v1/control"]["post"]["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": sc.ControlBody.model_json_schema()}}}
        hook = paths["/telegram/webhook"]["post"]
        hook["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": {"type": "object", "description": "a Telegram Update"}}}}
        hook["parameters"] = [{"name": "X-Telegram-Bot-Api-Secret-Token", "in": "header", "required": False,
                               "schema": {"type": "string"}}]
        trades = paths["/api/v1/trades"]["get"]["responses"]["200"]
        trades["content"]["text/csv"] = {"schema": {"type": "string", "description": "the same columns as JSON"}}
        trades["headers"] = {"X-Next-Cursor": {"description": "format=csv: the next page's cursor, when there "
                                                              "is one", "schema": {"type": "string"}}}
        doc["x-qf-bodies"] = True
    return doc


def create_app(cfg: Config, clock: Clock = time.time_ns, watch: BusWatch | None = None) -> OpenAPI:
    """The API app for `cfg`; the database is opened on the first request of each process, the
    bus watcher (services/api/watch.py: heartbeats and feed states) on the first request that
    needs it unless `watch` is given. `clock` (ns since the epoch) is the wall clock of the
    answers that depend on the time (status, P&L today, equity's default range, the pause)."""
    app = OpenAPI("services.api", info=Info(title="QuantumFlow API", version="1",
                                            description="A paper-trading HFT pipeline's state, history and controls."),
                  security_schemes=SECURITY, validation_error_status=400, validation_error_model=sc.ErrorBody,
                  validation_error_callback=_validation_error, doc_ui=False)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES  # views that read a body set their own, smaller cap
    db = ReadOnlyDatabase(cfg.common.db)
    app.extensions["qf_db"] = db
    watcher = watch if watch is not None else BusWatch(cfg)
    app.extensions["qf_watch"] = watcher
    ctl = Control(cfg, clock, db, watcher)  # the queries and actions every front end shares
    pause = ctl.pause
    # /flatten's asked confirmations, chat id -> ns deadline: per process (another gunicorn
    # worker asks again); the chats already logged as refused (once each)
    tg_pending: dict[int, int] = {}
    tg_refused: set[int] = set()
    tg_lock = threading.Lock()
    pages = PageCache()
    app.extensions["qf_pages"] = pages
    no_db = {None, "health", "health_live", "openapi_json", "control", "risk_state", "telegram_webhook"}

    @app.before_request
    def _checks():
        repeated = sorted(k for k in request.args if len(request.args.getlist(k)) > 1)
        if repeated:  # which one would count is a guess: refuse rather than pick
            raise bad_param(f"parameter(s) given more than once: {_names(repeated)}")
        # health reports failures itself; control and the webhook check their caller first
        if request.endpoint not in no_db:
            db.ensure()  # per request: notices a database file deleted or replaced since the last one
        if request.endpoint in CACHED_PAGES and request.method in ("GET", "HEAD"):  # not OPTIONS' empty answer
            key, version = request.path + "?" + request.query_string.decode("latin-1"), db.version()
            page = pages.get(key, version)
            if page is not None:
                return Response(page.body, headers=[*page.headers, ("X-QF-Cache", "hit")], content_type=page.content_type)
            g.qf_page = key, version  # read before the page: a commit meanwhile changes the next version

    @app.after_request
    def _keep_page(resp: Response) -> Response:
        pending = g.pop("qf_page", None)
        if pending is not None and request.method == "GET" and resp.status_code == 200 and not resp.is_streamed:
            kept = tuple((k, v) for k, v in resp.headers.items() if k not in ("Content-Type", "Content-Length"))
            pages.put(*pending, Page(resp.get_data(), resp.content_type, kept))
            resp.headers["X-QF-Cache"] = "miss"
        return resp

    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError):
        resp = json_response(error_body(exc.code, exc.message), exc.status)
        if exc.status == 401:
            resp.headers["WWW-Authenticate"] = 'Bearer realm="quantumflow"'
        return resp

    @app.errorhandler(DatabaseUnavailable)
    def _db_unavailable(exc: DatabaseUnavailable):
        return json_response(error_body(exc.code, exc.message), 503)  # the client gets no paths

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        if exc.code is None:  # not an error answer (werkzeug's RoutingException): as it is
            return exc
        if exc.response is not None and exc.response.mimetype == "application/json":
            return exc.response  # flask-openapi3's abort with our validation answer
        resp = json_response(error_body(error_code(exc.name or "error"), exc.description or exc.name), exc.code)
        if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
            resp.headers["Allow"] = ", ".join(sorted(exc.valid_methods))
        return resp

    @app.errorhandler(queries.NotAnAmount)
    def _not_an_amount(exc: queries.NotAnAmount):
        # a damaged money value (NaN, 1e999, text) is never served as money: the whole answer is refused
        log.warning("db_not_an_amount", extra={"path": request.path, "detail": str(exc)})
        return json_response(error_body("db_unavailable", str(exc)), 503)

    @app.errorhandler(pw.DatabaseError)
    def _db_error(exc: pw.DatabaseError):
        log.warning("db_error", extra={"path": request.path, "detail": str(exc)})
        db.close()  # the next request opens a fresh connection
        return json_response(error_body("db_unavailable", "the database cannot be queried"), 503)

    @app.errorhandler(Exception)
    def _internal(exc: Exception):
        log.exception("internal_error", extra={"path": request.path})
        return json_response(error_body("internal", "internal server error"), 500)

    # -- health -------------------------------------------------------------------------------

    @app.get("/health/live", tags=[TAGS["health"]], responses={200: sc.Live},
             summary="The API process is up (no database, no bus)")
    def health_live(query: sc.NoQuery):
        return json_response({"status": "ok"})

    @app.get("/health", tags=[TAGS["health"]], responses={200: sc.Health, 400: sc.ErrorBody, 503: sc.Health},
             summary="200 only while the database answers, every service's heartbeat is fresh "
                     "and every symbol's book is synced; else 503 naming what is wrong")
    def health(query: sc.NoQuery):
        problems, db_state, error = [], "ok", None
        try:
            db.ensure()
            queries.ping()
        except DatabaseUnavailable as exc:  # db.ensure() logged it, once per outage
            db_state, error = "error", error_body(exc.code, exc.message)["error"]
        except pw.DatabaseError as exc:
            log.warning("health_db_error", extra={"detail": str(exc)})
            db.close()
            db_state, error = "error", error_body("db_unavailable", "the database cannot be queried")["error"]
        if error is not None:
            problems.append(f"database: {error['message']}")
        _, services, feeds = ctl.bus(wait=True)
        for name in watcher.expected:
            svc = services[name]
            if svc["age_s"] is None:
                problems.append(f"{name}: no heartbeat heard")
            elif not svc["fresh"]:
                problems.append(f"{name}: last heartbeat {svc['age_s']:.1f} s ago")
        for symbol, feed in feeds.items():
            if not feed["synced"] and services["marketdata"]["fresh"]:
                problems.append(f"{symbol}: feed {feed['state']}" + (f" ({feed['detail']})" if feed["detail"] else ""))
        if problems and error is None:
            error = error_body("unhealthy", "; ".join(problems)[:1000])["error"]
        body = {"status": "error" if problems else "ok", "db": db_state, "problems": problems,
                "services": services, "feeds": feeds}
        if error is not None:
            body["error"] = error
        return json_response(body, 503 if problems else 200)

    @app.get("/api/v1/openapi.json", tags=[TAGS["health"]], summary="This document")
    def openapi_json(query: sc.NoQuery):
        return json_response(document(app))

    # -- trading ------------------------------------------------------------------------------

    @app.get("/api/v1/status", tags=[TAGS["trading"]], responses={200: sc.Status, **ERRORS},
             summary="Trading and pause state, each service's heartbeat age, each symbol's feed state")
    def status(query: sc.NoQuery):
        return json_response(ctl.status())

    @app.get("/api/v1/positions", tags=[TAGS["trading"]], responses={200: sc.Positions, **ERRORS},
             summary="Average-cost positions, one per symbol")
    def positions(query: sc.PositionsQuery):
        return json_response({"positions": ctl.positions(_symbol(query.symbol))})

    @app.get("/api/v1/pnl", tags=[TAGS["trading"]], responses={200: sc.Pnl, **ERRORS},
             summary="Realized, unrealized, fees, equity and today's (UTC) figures")
    def pnl(query: sc.NoQuery):
        return json_response(ctl.pnl())

    @app.get("/api/v1/equity", tags=[TAGS["trading"]], responses={200: sc.EquitySeries, **ERRORS},
             summary="The equity curve, resampled: the last snapshot of each bucket")
    def equity(query: sc.EquityQuery):
        start, end = _range(query)
        try:
            return json_response(ctl.equity(start, end, query.interval))
        except ValueError as exc:
            raise bad_param(str(exc)) from None

    @app.get("/api/v1/stats", tags=[TAGS["trading"]], responses={200: sc.Stats, **ERRORS},
             summary="Win rate, profit factor, Sharpe, max drawdown, slippage, maker share")
    def stats(query: sc.StatsQuery):
        start, end = _range(query)
        return json_response(ctl.stats(start, end))

    # -- history ------------------------------------------------------------------------------

    @app.get("/api/v1/trades", tags=[TAGS["history"]], responses={200: sc.TradesPage, **ERRORS},
             summary="Fills with their fill quality, newest first; format=csv for a spreadsheet")
    def trades(query: sc.TradesQuery):
        start, end = _range(query)
        if query.since is not None:
            start = query.since if start is None else max(start, query.since)
        rows, cursor = _page(ctl.trades_page, symbol=_symbol(query.symbol), side=query.side, start=start, end=end,
                             limit=query.limit, cursor=query.cursor)
        if query.format == "csv":
            return _trades_csv(rows, cursor)
        return json_response({"trades": rows, "count": len(rows), "next_cursor": cursor}, plain=True)

    @app.get("/api/v1/orders", tags=[TAGS["history"]], responses={200: sc.OrdersPage, **ERRORS},
             summary="Orders, newest first by creation")
    def orders(query: sc.OrdersQuery):
        start, end = _range(query)
        rows, cursor = _page(ctl.orders_page, symbol=_symbol(query.symbol), side=query.side, status=query.status,
                             start=start, end=end, limit=query.limit, cursor=query.cursor)
        return json_response({"orders": rows, "count": len(rows), "next_cursor": cursor}, plain=True)

    @app.get("/api/v1/signals", tags=[TAGS["history"]], responses={200: sc.SignalsPage, **ERRORS},
             summary="The strategy's stored signals (side changes and those that sent an order)")
    def signals(query: sc.SignalsQuery):
        start, end = _range(query)
        rows, cursor = _page(ctl.signals_page, symbol=_symbol(query.symbol), start=start, end=end,
                             limit=query.limit, cursor=query.cursor)
        return json_response({"signals": rows, "count": len(rows), "next_cursor": cursor})

    # -- risk ---------------------------------------------------------------------------------

    @app.get("/api/v1/risk", tags=[TAGS["risk"]], responses={200: sc.Risk, **ERRORS},
             summary="Limits, state, recent denials by reason, risk events")
    def risk(query: sc.RiskQuery):
        answer = ctl.risk_view(query.window, query.limit)
        snap, services, _ = ctl.bus()
        live = None
        if snap.risk is not None:
            r = snap.risk
            live = {"state": r.state.value, "reason": r.reason, "equity": r.equity, "drawdown": r.drawdown,
                    "ts": r.ts, "fresh": bool(services.get("risk", {}).get("fresh"))}
        answer["live"] = live
        return json_response(answer)

    @app.post("/api/v1/control", tags=[TAGS["risk"]], security=[{"bearer": []}],
              responses={200: sc.ControlAnswer, 400: sc.ErrorBody, 401: sc.ErrorBody, 403: sc.ErrorBody,
                         413: sc.ErrorBody, 502: sc.ErrorBody, 503: sc.ErrorBody},
              summary="HALT, RESUME or FLATTEN through risk")
    def control():
        check_token(cfg.api.token, request.headers.get("Authorization"))
        action, by, reason = _control_body()
        answer = ask_risk(cfg, action, by, reason)
        log.warning("control", extra={"action": action.value, "by": by, "reason": reason, "state": answer["state"]})
        return json_response(answer)

    @app.get("/api/v1/risk/state", tags=[TAGS["risk"]], security=[{"bearer": []}],
             responses={200: sc.ControlAnswer, 400: sc.ErrorBody, 401: sc.ErrorBody, 403: sc.ErrorBody,
                        502: sc.ErrorBody, 503: sc.ErrorBody},
             summary="Risk's own answer to STATE")
    def risk_state(query: sc.NoQuery):
        check_token(cfg.api.token, request.headers.get("Authorization"))
        return json_response(ask_risk(cfg, ControlAction.STATE, "api", ""))

    @app.post("/telegram/webhook", tags=[TAGS["telegram"]],
              responses={200: {"description": "taken (or ignored: a chat not allowed)",
                               "content": {"application/json": {"schema": {"type": "object"}}}},
                         400: sc.ErrorBody, 403: sc.ErrorBody, 413: sc.ErrorBody},
              summary="Bot commands from allowed chats (the secret header required)")
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
            return json_response({})
        chat_id = parsed[0]
        if str(chat_id) not in n.allowed_chats:
            with tg_lock:
                first = chat_id not in tg_refused
                if first and len(tg_refused) < 1000:  # bounded: a flood of chat ids cannot grow it
                    tg_refused.add(chat_id)
            if first:
                log.warning("telegram_chat_refused", extra={"chat_id": chat_id})
            return json_response({})
        with tg_lock:  # one command at a time: the pending confirmations are shared
            replies = commands.handle(update, ctl, clock(), tg_pending, n.report_at)
        for outcome in commands.send_replies(cfg, chat_id, replies):
            if outcome.kind != "sent":
                log.warning("telegram_reply_failed", extra={"chat_id": chat_id, "kind": outcome.kind,
                                                            "detail": outcome.detail})
        return json_response({})

    def metrics():
        registry = CollectorRegistry(auto_describe=False)
        registry.register(TradingCollector())
        registry.register(PauseCollector(pause, clock))
        return Response(generate_latest(registry), mimetype=None, content_type=CONTENT_TYPE_LATEST)

    # Prometheus' text format, not JSON: a plain Flask route, left out of the OpenAPI document
    app.add_url_rule("/metrics", "metrics", metrics, methods=["GET"])
    return app
