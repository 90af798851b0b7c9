"""Seeded random requests at the live API under real gunicorn: no 5xx but a dependency's, a JSON
error for every refusal, the server up, and the data endpoints unchanged to the byte.

Every request is written as raw bytes on its own socket, so nothing a client library would
refuse to send is out of reach: random paths and methods, query strings (huge, unicode,
repeated, negative and huge limits, malformed numbers, SQL-ish text), headers (bad
Authorization, bad content types, huge and many headers), bodies (deeply nested, huge,
binary, invalid JSON, truncated), to every endpoint, /api/v1/control with and without the
token. Risk is a tiny real ROUTER that answers a control, an error, garbage or nothing,
chosen from the request, so control requests get 200 or the documented 502/503.

QF_FUZZ_SEED=<n> replays a run (the seed is printed, and named in every failure);
QF_FUZZ_SCALE=<x> sends x times the default number of requests (tests/fuzz/seeded.py).
Counts per class and the status histograms go to build/fuzz/api.json."""
from __future__ import annotations

import collections
import hashlib
import json
import random
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import zmq

from shared import messages
from shared.bus import Server
from shared.enums import TradingState
from tests.conftest import ROOT, clean_environ, free_port, stop_process, wait_for
from tests.fuzz.seeded import FuzzRun

PER_CLASS = 1000  # requests per class at scale 1: 8,000 in all, ~12 s on 2 cores
TOKEN = "fuzz-token-0123456789"
CONTROL_TIMEOUT_MS = 150
START_S, STOP_S, ANSWER_S = 30.0, 10.0, 15.0
WORKERS = 2

ENDPOINTS = ["/health", "/api/v1/trades", "/api/v1/positions", "/api/v1/status", "/api/v1/control",
             "/api/v1/risk/state", "/metrics"]
DATA_VIEWS = ["/api/v1/trades?limit=1000", "/api/v1/trades?symbol=ethusdt&since=1700000000000000010&limit=7",
              "/api/v1/positions", "/api/v1/positions?symbol=BTCUSDT", "/api/v1/status", "/metrics", "/health"]
# the only 5xx the API may give: a dependency (risk) that fails, documented in the README
DEPENDENCY_ERRORS = {502: {"risk_error", "bad_risk_reply"}, 503: {"risk_unavailable"}}
RISK_PATHS = ("/api/v1/control", "/api/v1/risk/state")
# /health is 503 "unhealthy" here by design: no service beats in this world (its body names them)
HEALTH_ERRORS = {503: {"unhealthy"}}


# -- the world: a real database, a tiny real risk, the API under gunicorn ------------------------

def build_database(path) -> None:
    """Orders, fills on three symbols with exact decimals, equity snapshots; checkpointed, closed."""
    from shared.db import EquitySnapshot, FillRow, OrderRow, close_db, init_db
    rng = random.Random(7)  # the same database every run: only the requests vary
    db = init_db(str(path))
    with db.bind_ctx([FillRow, OrderRow, EquitySnapshot]):
        for n in range(60):
            symbol = ("BTCUSDT", "ETHUSDT", "USDM:BTCUSDT")[n % 3]
            ts = 1_700_000_000_000_000_000 + n * 7
            price = Decimal(rng.randrange(100_000, 7_000_000)) / 100
            qty = Decimal(rng.randrange(1, 5000)) / 100_000
            FillRow.create(fill_id=f"F{n:03d}", order_id=f"O{n:03d}", client_order_id=f"C{n:03d}", symbol=symbol,
                           side=rng.choice(["BUY", "SELL"]), price=price, qty=qty, fee=qty * price / 1000,
                           fee_asset="USDT", liquidity=rng.choice(["MAKER", "TAKER"]), exch_ts=ts // 10**6, ts=ts)
            OrderRow.create(order_id=f"O{n:03d}", client_order_id=f"C{n:03d}", strategy="imbalance", symbol=symbol,
                            side="BUY", kind="MARKET", tif="IOC", qty=qty, status=rng.choice(
                                ["FILLED", "PARTIALLY_FILLED", "CANCELLED", "REJECTED", "PENDING"]),
                            filled_qty=qty, created_ts=ts, updated_ts=ts)
        for n in range(5):
            EquitySnapshot.create(ts=n, equity=Decimal("10000.5") + n, cash=Decimal("9999.25") - n)
    db.close()
    close_db()
    with sqlite3.connect(path) as con:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")


class TinyRisk:
    """A real ROUTER on a free port standing in for risk: the answer to a request is chosen by
    a hash of its action, author and reason (so a replayed seed meets the same answers): a
    control reply, an error, garbage, or silence (the API then times out: 503)."""

    def __init__(self) -> None:
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.ctx = zmq.Context()
        self.server = Server(self.endpoint, self.ctx)
        self.answers = collections.Counter()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="tiny-risk", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.server.sock, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(50):
                continue
            envelope, payload = self.server.recv()
            if payload is None:
                continue
            try:  # chosen from what the client sent, not the API's timestamp: a replayed seed meets the same
                msg = messages.decode(payload, messages.REQUESTS)
                key = f"{msg.action.value}|{msg.by}|{msg.reason}".encode("utf-8", "surrogatepass")
            except (messages.DecodeError, AttributeError):
                key = payload
            pick = hashlib.sha256(key).digest()[0] % 10
            if pick < 7:
                kind, answer = "reply", messages.encode(messages.ControlReply(
                    ts=time.time_ns(), state=TradingState.ACTIVE, reason="fuzz", positions={"BTCUSDT": "0"},
                    equity=Decimal("10000"), detail={"changed": False}))
            elif pick == 7:
                kind, answer = "error", messages.encode(messages.Error(ts=time.time_ns(), code="bad_request",
                                                                       text="fuzz says no"))
            elif pick == 8:
                kind, answer = "garbage", b"\xc1not msgpack"
            else:
                kind, answer = "silence", None
            self.answers[kind] += 1
            if answer is not None:
                self.server.reply(envelope, answer)

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)
        self.server.close()
        self.ctx.term()


def start_api(tmp, db_path, risk_endpoint: str) -> tuple[subprocess.Popen, int, object]:
    port = free_port()
    env = {**clean_environ(), "QF_SHABBAT_PAUSE": "false", "QF_DB": str(db_path), "QF_API_BIND": f"127.0.0.1:{port}", "QF_API_WORKERS": str(WORKERS),
           "QF_API_TOKEN": TOKEN, "QF_RISK_REP": risk_endpoint, "QF_RISK_CONTROL_TIMEOUT_MS": str(CONTROL_TIMEOUT_MS),
           "QF_RUN_DIR": str(tmp / "run"), "QF_LOG_LEVEL": "INFO", "PYTHONUNBUFFERED": "1"}
    log_path = tmp / "api.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "services.api"], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)

    def healthy():
        if proc.poll() is not None:
            raise AssertionError(f"api exited with {proc.returncode}:\n{log_path.read_text()}")
        try:
            return send(port, b"GET /health/live HTTP/1.1\r\nHost: fuzz\r\n\r\n", "GET")[0] == 200
        except OSError:
            return False
    wait_for(healthy, START_S, "the api under gunicorn to answer /health/live with 200", step=0.05)
    return proc, port, log_path


# -- one request, as bytes on its own connection --------------------------------------------------

def send(port: int, raw: bytes, method: str) -> tuple[int, dict[str, str], bytes]:
    """Send `raw`, half-close, read to the end. Returns (status, headers, body); status 0 when the
    server closed without a word. Raises OSError when the server does not answer in time."""
    with socket.create_connection(("127.0.0.1", port), timeout=ANSWER_S) as sock:
        try:
            sock.sendall(raw)
            sock.shutdown(socket.SHUT_WR)  # no request waits for bytes that never come
        except OSError:
            pass  # it answered (and closed) before taking everything: the answer is still there
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except ConnectionResetError:
            if not data:
                raise
    if not data:
        return 0, {}, b""
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if "content-length" in headers and method != "HEAD":
        assert len(body) == int(headers["content-length"]), (len(body), headers)
    return status, headers, body


def request(method: str, target: bytes | str, headers: list[tuple[str, bytes | str]] = (),
            body: bytes | None = None, version: str = "HTTP/1.1") -> bytes:
    """A request's bytes; Host and (for a body) Content-Length unless given."""
    target = target.encode("utf-8", "surrogatepass") if isinstance(target, str) else target
    names = {n.lower() for n, _ in headers}
    lines = [method.encode("latin-1", "replace") + b" " + target + b" " + version.encode()]
    if "host" not in names:
        lines.append(b"Host: 127.0.0.1")
    if body is not None and "content-length" not in names and "transfer-encoding" not in names:
        lines.append(b"Content-Length: %d" % len(body))
    for name, value in headers:
        lines.append(name.encode("latin-1") + b": " + (value.encode("latin-1", "replace")
                                                        if isinstance(value, str) else value))
    return b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")


# -- the generators: one per class of input -------------------------------------------------------

UNICODE = ["é", "日本", "𝔘", "\u202e", "\u0000", "\ufeff", "١٢٣", "ｌｉｍｉｔ", "\ud800"]
SQLISH = ["' OR 1=1 --", "1; DROP TABLE fills", "\" OR \"\"=\"", "1 UNION SELECT * FROM orders", "%27%20OR%201=1",
          "BTCUSDT' --", "*", "%", "_", "\\", "NULL", "1e309", "0x10", "-0", "+5", " 5", "5 ", "٣"]
NUMBERS = ["0", "1", "-1", "1000", "1001", "5000", "9" * 19, "9" * 40, "-" + "9" * 30, "1.5", "1e3", "NaN", "inf",
           "", " ", "0x1f", "00001", "2**63", str(2**63), str(2**63 - 1), str(2**64), "1_000", "１２"]
DATES = ["2024-08-08", "2024-13-45T25:61:61Z", "yesterday", "1700000000", "-1700000000000000000", "17e17", "now"]


def pct(rng: random.Random, text: str) -> str:
    """`text` percent-encoded, partly, wholly or not at all (invalid escapes included)."""
    from urllib.parse import quote
    mode = rng.randrange(4)
    if mode == 0:
        return quote(text, safe="", errors="surrogatepass")
    if mode == 1:
        return text.replace(" ", "+").replace("&", "%26").replace("#", "%23")
    if mode == 2:
        return text + rng.choice(["%", "%z", "%ff", "%c3", "%00", "%%"])
    return "".join(c if c.isascii() and c.isprintable() and c not in " #" else quote(c, errors="surrogatepass") for c in text)


def g_path(rng: random.Random):
    base = rng.choice(ENDPOINTS + ["/", "/api", "/api/v1", "/api/v2/trades", "/static/x.js", "/admin"])
    kind = rng.randrange(8)
    if kind == 0:
        path = base + "/" * rng.randrange(1, 3)
    elif kind == 1:
        path = "/" + "/".join(rng.choice(["..", ".", "%2e%2e", "api", "v1", "%2f", "trades", ""])
                              for _ in range(rng.randrange(1, 8)))
    elif kind == 2:
        path = base + pct(rng, rng.choice(UNICODE) * rng.randrange(1, 50))
    elif kind == 3:
        path = "/" + "a" * rng.choice([100, 1000, 3000, 5000])
    elif kind == 4:
        path = base.upper()
    elif kind == 5:
        path = rng.choice(["*", "http://evil.example/health", "health", "//health", "/health#frag", "/health?"])
    elif kind == 6:
        path = base + ";" + pct(rng, rng.choice(SQLISH))
    else:
        path = base
    method = "GET" if rng.random() < 0.7 else rng.choice(["POST", "HEAD", "OPTIONS"])
    return method, path, [], None, path


def g_method(rng: random.Random):
    path = rng.choice(ENDPOINTS)
    method = rng.choice(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE", "CONNECT", "get",
                         "FOO", "PROPFIND", "M-SEARCH", "G\x01T", "A" * 40, "GET\tX", ""])
    headers, body = [], None
    if method in ("POST", "PUT", "PATCH") and rng.random() < 0.5:
        headers, body = [("Content-Type", "application/json")], b'{"action": "HALT", "reason": "m"}'
    return method, path, headers, body, path


def g_query(rng: random.Random):
    path = rng.choice(["/api/v1/trades", "/api/v1/trades", "/api/v1/positions", "/api/v1/status", "/metrics",
                       "/health", "/api/v1/risk/state"])
    names = ["limit", "since", "symbol", "LIMIT", "limt", "sym bol", "", "limit[]", rng.choice(UNICODE)]
    values = NUMBERS + SQLISH + DATES + UNICODE + ["BTCUSDT", "btcusdt", "ETH-USDT", "A" * 21, "x" * 5000]
    parts = []
    for _ in range(rng.choice([1, 1, 2, 3, 5, 20, 200])):
        name = rng.choice(names)
        parts.append(pct(rng, name) + ("=" + pct(rng, rng.choice(values)) if rng.random() < 0.9 else ""))
    sep = rng.choice(["&", "&", ";", "&&"])
    return "GET", path + "?" + sep.join(parts), [], None, path


def g_header(rng: random.Random):
    path = rng.choice(ENDPOINTS)
    method = "POST" if path == "/api/v1/control" else "GET"
    kind = rng.randrange(6)
    if kind == 0:  # one huge header, under and over gunicorn's 8 KiB field limit
        headers = [("X-Big", "h" * rng.choice([1000, 8000, 8200, 20_000, 70_000]))]
    elif kind == 1:  # many headers, around gunicorn's limit of 100
        headers = [(f"X-H{i}", str(i)) for i in range(rng.choice([50, 99, 101, 150]))]
    elif kind == 2:  # broken header lines
        headers = [(rng.choice(["X Bad", "X-Bad:", "(", "X\x00", "Ünï", ""]), rng.choice(["v", "", "\x7f", "a\rb"]))]
    elif kind == 3:
        headers = [("Host", rng.choice(["", "a b", "évil", "x" * 3000, "[::1", "127.0.0.1:99999", "a:b:c"]))]
    elif kind == 4:
        headers = [("Content-Length", rng.choice(["-1", "abc", "1e3", "99999999999999999999", "0, 5", " 5"])),
                   ("Content-Type", "application/json")]
    else:
        headers = [("Transfer-Encoding", rng.choice(["chunked, gzip", "gzip", "identity", "chunked"])),
                   ("Content-Length", "5")]
    body = b'{"action": "HALT", "reason": "h"}' if method == "POST" and kind != 4 else None
    if body is not None and not any(n.lower() == "content-type" for n, _ in headers):
        headers.append(("Content-Type", "application/json"))
    return method, path, headers, body, path


def g_auth(rng: random.Random):
    path = rng.choice(RISK_PATHS)
    value = rng.choice([
        "", "Bearer", "Bearer ", "bearer " + TOKEN[:-1], "Basic " + TOKEN, "Bearer " + TOKEN + "x",
        "Bearer " + "t" * rng.choice([100, 5000, 8100]), "Bearer\t" + TOKEN, "Bearer  " + TOKEN + " ",
        "Bearer " + rng.choice(UNICODE), "Token " + TOKEN, "Bearer " + TOKEN + "\x00", "Bearer é" + TOKEN,
        "Digest username=x", "Bearer " + TOKEN + ", Bearer x"])
    headers = [("Authorization", value)] if rng.random() < 0.9 else [("Authorization", "a"), ("Authorization", "b")]
    if path == "/api/v1/control":
        headers.append(("Content-Type", "application/json"))
        return "POST", path, headers, b'{"action": "HALT", "reason": "a"}', path
    return "GET", path, headers, None, path


def g_body(rng: random.Random):
    headers = [("Authorization", "Bearer " + TOKEN)] if rng.random() < 0.8 else []
    ctype = rng.choice(["application/json"] * 6 + ["text/plain", "application/x-www-form-urlencoded", "",
                        "application/json; charset=latin-1", "application/json; charset=utf-8", "*/*",
                        "multipart/form-data; boundary=zz", "application/vnd.x+json", "application/json;;;"])
    if ctype:
        headers.append(("Content-Type", ctype))
    depth = rng.choice([2, 10, 17, 100, 1000, 1500, 2047, 3000, 100_000])
    pick = rng.randrange(12)
    if pick == 0:
        body = b"[" * depth + b"]" * depth
    elif pick == 1:
        body = b'{"a":' * depth + b"1" + b"}" * depth
    elif pick == 2:
        body = b'{"action": "HALT", "reason": ' + b"[" * depth + b"]" * depth + b"}"
    elif pick == 3:
        body = bytes(rng.randrange(256) for _ in range(rng.choice([1, 10, 100, 4096, 5000])))
    elif pick == 4:
        body = b"x" * rng.choice([4096, 4097, 65_536, 1_000_000])
    elif pick == 5:
        body = rng.choice([b"", b"null", b"[]", b'"HALT"', b"1e999999", b"-" + b"9" * 5000, b"NaN", b"{", b"}",
                           b'{"action": "HALT", "reason": "x"} trailing', b"\xef\xbb\xbf{}", b"\xff\xfe{\x00}\x00"])
    else:  # a valid body, mutated
        obj = {"action": rng.choice(["HALT", "RESUME", "FLATTEN", "STATE", "halt", "", None, 1, ["HALT"]]),
               "reason": rng.choice(["fuzz", "", " ", "r" * 501, "\ud800", "日本", 5, None, {"x": 1}]),
               "by": rng.choice(["", "me", "b" * 81, 0, "\x00"])}
        for _ in range(rng.randrange(3)):
            obj[rng.choice(["extra", "ACTION", "action ", "__proto__", "é"])] = rng.choice([1, "x", [], {}])
        if rng.random() < 0.3:
            del obj[rng.choice(list(obj))]
        body = json.dumps(obj, ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")
        if rng.random() < 0.2:
            body = body.replace(b'"action"', b'"action": "RESUME", "action"', 1)  # a duplicate key
        if rng.random() < 0.1:
            body = body[: rng.randrange(len(body))]
    if rng.random() < 0.1 and len(body) < 70_000:  # sent chunked, with no Content-Length
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 1000]), body[i:i + 1000])
                          for i in range(0, len(body), 1000))
        return "POST", "/api/v1/control", headers + [("Transfer-Encoding", "chunked")], chunks + b"0\r\n\r\n", \
            "/api/v1/control"
    return "POST", "/api/v1/control", headers, body, "/api/v1/control"


def g_control(rng: random.Random):
    """Valid requests to risk's endpoints with the token: 200 from TinyRisk, or its 502/503."""
    headers = [("Authorization", "Bearer " + TOKEN)]
    if rng.random() < 0.3:
        return "GET", "/api/v1/risk/state", headers, None, "/api/v1/risk/state"
    body = json.dumps({"action": rng.choice(["HALT", "RESUME", "FLATTEN"]),
                       "reason": f"fuzz {rng.randrange(10**9)}", "by": rng.choice(["", "ops"])}).encode()
    return "POST", "/api/v1/control", headers + [("Content-Type", "application/json")], body, "/api/v1/control"


def g_raw(rng: random.Random):
    """Not quite HTTP: the server may answer 4xx JSON, or close when the request never ended."""
    return rng.choice([
        b"GET /health\r\n\r\n", b"GET\r\n\r\n", b"\r\n\r\n", b"GET /health HTTP/1.1\n\n", b"GET /health HTTP/2.0\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: a\r\n X-Folded: b\r\n\r\n", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"GET /health HTTP/1.1\r\nHost: a\r\n",
        b"POST /api/v1/control HTTP/1.1\r\nHost: a\r\nContent-Length: 50\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + TOKEN.encode() + b"\r\n\r\n{\"action\"",  # a body cut short
        b"POST /api/v1/control HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + TOKEN.encode() + b"\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",  # a bad chunk size
        bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))) + b"\r\n\r\n",
        b"GET /health HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n",
    ]), None


CLASSES = {"path": g_path, "method": g_method, "query": g_query, "header": g_header, "auth": g_auth,
           "body": g_body, "control": g_control, "raw": g_raw}


def make_requests(run: FuzzRun) -> list[tuple[str, bytes, str, str | None]]:
    """(class, bytes, method, endpoint or None) for every request of the run, from its seed only."""
    rng = run.rng
    out = []
    for name, gen in CLASSES.items():
        for _ in range(run.n(PER_CLASS)):
            made = gen(rng)
            if name == "raw":
                out.append((name, made[0], "RAW", None))
                continue
            method, target, headers, body, endpoint = made
            out.append((name, request(method, target, headers, body), method, endpoint))
    rng.shuffle(out)
    return out


# -- the checks -----------------------------------------------------------------------------------

def check(kind: str, method: str, endpoint: str | None, status: int, headers: dict, body: bytes) -> str | None:
    """What is wrong with an answer, or None."""
    ctype = headers.get("content-type", "")
    if status == 0:
        return None if kind == "raw" else "closed without an answer"
    allowed = HEALTH_ERRORS if endpoint and "health" in endpoint and "live" not in endpoint else DEPENDENCY_ERRORS
    if status >= 500:
        codes = allowed.get(status, set())
        if (endpoint not in RISK_PATHS and allowed is DEPENDENCY_ERRORS) or not codes:
            return f"{status} from {endpoint}"
    if method == "HEAD" or (method == "OPTIONS" and status < 400):
        return None  # no body by definition / Flask's automatic OPTIONS: an empty 200
    if status >= 400:
        if not ctype.startswith("application/json"):
            return f"{status} answered as {ctype!r}: {body[:120]!r}"
        try:
            error = json.loads(body)["error"]
        except (ValueError, KeyError, TypeError):
            return f"{status} without the error shape: {body[:200]!r}"
        if not (isinstance(error, dict) and set(error) == {"code", "message"}
                and isinstance(error["code"], str) and isinstance(error["message"], str) and error["code"]):
            return f"{status} with a malformed error: {body[:200]!r}"
        if status >= 500 and error["code"] not in allowed[status]:
            return f"{status} with code {error['code']!r}"
        return None
    if endpoint == "/metrics" and status == 200:
        return None if ctype.startswith("text/plain") else f"/metrics answered as {ctype!r}"
    if not ctype.startswith("application/json"):
        return f"{status} answered as {ctype!r}"
    try:
        json.loads(body)
    except ValueError:
        return f"{status} with a body that is not JSON: {body[:200]!r}"
    return None


def snapshot(port: int) -> dict[str, tuple[int, object]]:
    """Every data view's status and body (/status without its `ts`, the time of the answer)."""
    out = {}
    for view in DATA_VIEWS:
        status, headers, body = send(port, request("GET", view), "GET")
        value: object = body.decode()
        if headers.get("content-type", "").startswith("application/json"):
            value = json.loads(body)
            if isinstance(value, dict):
                value.pop("ts", None)
        out[view] = (status, value)
    return out


def test_fuzz_the_api_under_gunicorn(tmp_path):
    run = FuzzRun("api")
    db_path = tmp_path / "qf.db"
    build_database(db_path)
    db_digest = hashlib.sha256(db_path.read_bytes()).hexdigest()
    requests = make_requests(run)
    risk = TinyRisk()
    proc, port, log_path = start_api(tmp_path, db_path, risk.endpoint)
    statuses = collections.Counter()
    by_class: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    failures: list[str] = []
    lock = threading.Lock()
    started = time.monotonic()
    try:
        before = snapshot(port)
        assert before["/api/v1/trades?limit=1000"][0] == 200 and len(before["/api/v1/trades?limit=1000"][1]["trades"]) == 60

        def one(item):
            index, (kind, raw, method, endpoint) = item
            try:
                status, headers, body = send(port, raw, method)
                problem = check(kind, method, endpoint, status, headers, body)
            except (OSError, AssertionError, ValueError, IndexError) as exc:
                status, problem = -1, f"no readable answer: {type(exc).__name__}: {exc}"
            with lock:
                run.count(kind)
                statuses[status] += 1
                by_class[kind][status] += 1
                if problem:
                    failures.append(f"#{index} {kind}: {problem}\n    request: {raw[:300]!r}")
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(one, enumerate(requests)))
        elapsed = time.monotonic() - started
        assert proc.poll() is None, run.why("the api died during the run")
        after = snapshot(port)
    finally:
        stop_process(proc, STOP_S)
        risk.close()
    log = log_path.read_text(errors="replace")
    run.report(requests_per_second=round(len(requests) / elapsed), statuses={str(k): v for k, v in sorted(statuses.items())},
               statuses_per_class={k: {str(s): n for s, n in sorted(v.items())} for k, v in sorted(by_class.items())},
               risk_answers=dict(sorted(risk.answers.items())), failures=len(failures))
    assert not failures, run.why(f"{len(failures)} bad answers:\n" + "\n".join(failures[:25]))
    assert after == before, run.why("the data views changed")
    assert hashlib.sha256(db_path.read_bytes()).hexdigest() == db_digest, run.why("the api wrote the database")
    assert proc.returncode == 0, run.why(f"the api did not stop cleanly: {proc.returncode}")
    for bad in ("event=internal_error", "Traceback", "WORKER TIMEOUT", "was sent SIGKILL"):
        assert bad not in log, run.why(f"{bad!r} in the api's log:\n{log[-3000:]}")
    assert log.count("Booting worker") == WORKERS, run.why("a worker died and was replaced")
    assert run.counts["control"] and risk.answers["reply"], run.why("no control request reached risk")
