"""The project's own fake Telegram Bot API: a real HTTP server on loopback, in a thread of the test.

It takes the requests python-telegram-bot really sends — `POST /bot<token>/<method>`,
form-encoded for getMe and sendMessage, multipart/form-data for sendPhoto — and answers
with the Bot API's JSON shapes (https://core.telegram.org/bots/api#making-requests):
`{"ok": true, "result": {...Message...}}`, or `{"ok": false, "error_code": …,
"description": …, "parameters": {"retry_after": n}}`. A test scripts the answers in order
(`script`), or sets the answer for everything not scripted (`default`): "ok", ("429", n),
("500",), ("400", description), ("403", description), ("migrate", new_chat_id),
("slow", seconds) — which answers ok, late (a client with a shorter timeout gives up).
A request for another token gets 404 Not Found, as Telegram answers."""
from __future__ import annotations

import email.parser
import email.policy
import itertools
import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

BOT_ID = 7000000001


@dataclass
class Request:
    """One request as the server saw it. `at`: time.monotonic() when it arrived; `status`: the
    HTTP status it was answered with (None while unanswered)."""
    method: str
    path: str
    content_type: str
    fields: dict[str, str]
    files: dict[str, bytes]
    at: float
    status: int | None = None
    answered_at: float | None = None

    @property
    def chat_id(self) -> int | None:
        return int(self.fields["chat_id"]) if "chat_id" in self.fields else None

    @property
    def text(self) -> str:
        return self.fields.get("text") or self.fields.get("caption") or ""


@dataclass
class FakeBotApi:
    token: str
    script: deque = field(default_factory=deque)
    default: object = "ok"
    requests: list[Request] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._release = threading.Event()  # set at close: a slow answer stops waiting
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 - http.server's API
                fake._handle(self)

            do_GET = do_POST  # noqa: N815

            def log_message(self, *args) -> None:  # quiet: the test reads `requests`
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/bot"  # QF_TELEGRAM_API_URL
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True, name="fake-bot-api")
        self._thread.start()

    def close(self) -> None:
        self._release.set()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)

    # -- what the test reads --------------------------------------------------------------

    def sends(self, status: int | None = 200) -> list[Request]:
        """sendMessage/sendPhoto requests (answered with `status`; None: all)."""
        with self._lock:
            return [r for r in self.requests if r.method in ("sendMessage", "sendPhoto")
                    and (status is None or r.status == status)]

    def texts(self) -> list[str]:
        return [r.text for r in self.sends()]

    # -- serving -----------------------------------------------------------------------------

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        ctype = h.headers.get("Content-Type", "")
        fields, files = _parse(ctype, body)
        prefix, _, method = h.path.rpartition("/")
        req = Request(method, h.path, ctype.split(";")[0], fields, files, time.monotonic())
        with self._lock:
            self.requests.append(req)
        if prefix != f"/bot{self.token}":
            return self._answer(h, req, 404, {"ok": False, "error_code": 404, "description": "Not Found"})
        if method == "getMe":
            return self._answer(h, req, 200, {"ok": True, "result": _me()})
        if method not in ("sendMessage", "sendPhoto"):
            return self._answer(h, req, 404, {"ok": False, "error_code": 404,
                                              "description": "Not Found: method not found"})
        with self._lock:
            action = self.script.popleft() if self.script else self.default
        kind, *args = (action,) if isinstance(action, str) else action
        if kind == "slow":
            self._release.wait(args[0])
            kind = "ok"
        if kind == "ok":
            return self._answer(h, req, 200, {"ok": True, "result": self._message(method, fields, files)})
        if kind == "429":
            n = args[0]
            return self._answer(h, req, 429, {"ok": False, "error_code": 429,
                                              "description": f"Too Many Requests: retry after {n}",
                                              "parameters": {"retry_after": n}})
        if kind == "500":
            return self._answer(h, req, 500, {"ok": False, "error_code": 500, "description": "Internal Server Error"})
        if kind in ("400", "403"):
            desc = args[0] if args else ("Bad Request: chat not found" if kind == "400"
                                         else "Forbidden: bot was blocked by the user")
            return self._answer(h, req, int(kind), {"ok": False, "error_code": int(kind), "description": desc})
        if kind == "migrate":
            return self._answer(h, req, 400, {"ok": False, "error_code": 400,
                                              "description": "Bad Request: group chat was upgraded to a "
                                                             "supergroup chat",
                                              "parameters": {"migrate_to_chat_id": args[0]}})
        raise AssertionError(f"unknown scripted answer {action!r}")

    def _answer(self, h: BaseHTTPRequestHandler, req: Request, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        # recorded before the answer is written: a client that has its answer finds it recorded
        # (after, a test reading `sends()` as soon as the API returned raced the recording)
        with self._lock:
            req.status, req.answered_at = status, time.monotonic()
        try:
            h.send_response(status)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)
        except OSError:  # the client gave up (a timeout) and closed the connection
            pass

    def _message(self, method: str, fields: dict[str, str], files: dict[str, bytes]) -> dict:
        chat_id = int(fields["chat_id"])
        chat = {"id": chat_id, "type": "private", "first_name": "Trader"} if chat_id > 0 else \
            {"id": chat_id, "type": "supergroup", "title": "QuantumFlow alerts"}
        msg = {"message_id": next(self._ids), "from": _me(), "chat": chat, "date": int(time.time())}
        if method == "sendMessage":
            msg["text"] = fields["text"]
        else:
            size = len(files.get("photo", b""))
            msg["photo"] = [{"file_id": f"AgACAgQAAxkDAAI{n}", "file_unique_id": f"AQAD{n}", "width": w,
                             "height": h, "file_size": size // d} for n, (w, h, d) in
                            enumerate(((90, 51, 20), (320, 180, 4), (960, 540, 1)))]
            if "caption" in fields:
                msg["caption"] = fields["caption"]
        return msg


def _me() -> dict:
    return {"id": BOT_ID, "is_bot": True, "first_name": "QuantumFlow test", "username": "qf_test_bot",
            "can_join_groups": True, "can_read_all_group_messages": False, "supports_inline_queries": False}


def _parse(ctype: str, body: bytes) -> tuple[dict[str, str], dict[str, bytes]]:
    """A request body's fields and files: form-encoded or multipart/form-data."""
    if ctype.startswith("application/x-www-form-urlencoded"):
        return {k: v[0] for k, v in parse_qs(body.decode(), keep_blank_values=True).items()}, {}
    if ctype.startswith("application/json"):
        return {k: str(v) for k, v in json.loads(body or b"{}").items()}, {}
    if ctype.startswith("multipart/form-data"):
        msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + body)
        fields, files = {}, {}
        for part in msg.iter_parts():
            name = part.get_param("name", header="content-disposition")
            payload = part.get_payload(decode=True) or b""
            if part.get_filename() is not None:
                files[name] = payload
            else:
                fields[name] = payload.decode()
        return fields, files
    return {}, {}
