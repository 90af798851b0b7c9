"""The API under real gunicorn in a subprocess: health, trades and metrics over HTTP, SIGTERM stop."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from bench.common import free_port

REPO = Path(__file__).resolve().parents[3]
START_S = 30.0  # bound on gunicorn's start (two forked workers importing Flask)
STOP_S = 10.0  # bound on a SIGTERM stop (graceful timeout is 5 s)


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode()


def wait_healthy(proc: subprocess.Popen, url: str, log_path: Path) -> dict:
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline:
        try:
            status, _, body = get(url)
            if status == 200:
                return json.loads(body)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        try:  # the pause between attempts also notices a server that died
            proc.wait(timeout=0.1)
        except subprocess.TimeoutExpired:
            continue
        raise AssertionError(f"api exited with {proc.returncode}:\n{log_path.read_text()}")
    raise AssertionError(f"api not healthy within {START_S} s:\n{log_path.read_text()}")


def test_gunicorn_serves_the_api_and_stops_on_sigterm(tmp_path, api_config, add_fill, add_order):
    add_fill("BTCUSDT", "BUY", "0.00200000", "61837.63000000", fee="0.12367526")
    add_order("FILLED")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("QF_")}
    env.update({"QF_DB": api_config.common.db, "QF_API_BIND": f"127.0.0.1:{port}", "QF_API_WORKERS": "2",
                "QF_RUN_DIR": str(tmp_path / "run"), "QF_LOG_LEVEL": "INFO", "PYTHONUNBUFFERED": "1"})
    log_path = tmp_path / "api.log"
    base = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "services.api"], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        assert wait_healthy(proc, f"{base}/health/live", log_path) == {"status": "ok"}
        status, _, body = get(f"{base}/health")  # the database answers; no service beats here
        assert (status, json.loads(body)["db"], json.loads(body)["error"]["code"]) == (503, "ok", "unhealthy")

        status, ctype, body = get(f"{base}/api/v1/trades?symbol=btcusdt")
        assert (status, ctype) == (200, "application/json")
        (trade,) = json.loads(body)["trades"]
        assert (trade["price"], trade["qty"], trade["fee"]) == ("61837.63", "0.002", "0.12367526")

        status, ctype, body = get(f"{base}/metrics")
        assert status == 200 and ctype.startswith("text/plain")
        assert "qf_fills_total 1.0" in body and 'qf_orders{status="FILLED"} 1.0' in body

        status, _, body = get(f"{base}/api/v1/trades?limit=5000")
        assert status == 400 and json.loads(body)["error"]["code"] == "bad_param"

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=STOP_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=STOP_S)
    log = log_path.read_text()
    assert "event=api_starting" in log and f"bind=127.0.0.1:{port}" in log
    assert log.count("event=api_stopped") == 1, "only the master returns from run_api"


# -- issue #11: a missing, deleted, replaced database under real gunicorn with several workers ---

def _request(base: str, path: str, method: str = "GET", data: bytes | None = None,
             headers: dict | None = None) -> tuple[int, str, str]:
    req = urllib.request.Request(base + path, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode()


def _start_api(tmp_path, db_path: Path, workers: int = 3, **extra: str) -> tuple[subprocess.Popen, str, Path]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("QF_")}
    env.update({"QF_DB": str(db_path), "QF_API_BIND": f"127.0.0.1:{port}", "QF_API_WORKERS": str(workers),
                "QF_RUN_DIR": str(tmp_path / "run"), "QF_LOG_LEVEL": "INFO", "PYTHONUNBUFFERED": "1", **extra})
    log_path = tmp_path / "api.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "services.api"], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_S
    while True:  # any HTTP answer: the database may well be missing
        try:
            _request(base, "/health")
            return proc, base, log_path
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"api did not answer within {START_S} s:\n{log_path.read_text()}") from None
            time.sleep(0.05)  # polling interval of a bounded wait


def _stop_api(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(timeout=STOP_S) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=STOP_S)


def _make_db(path: Path, fill_ids: list[str]) -> None:
    """A database file built elsewhere (as the broker or a restore would), checkpointed, closed."""
    import sqlite3
    from decimal import Decimal

    from shared.db import FillRow, close_db, init_db
    made = init_db(str(path))
    with made.bind_ctx([FillRow]):
        for n, fid in enumerate(fill_ids):
            FillRow.create(fill_id=fid, order_id=f"o{n}", client_order_id=f"c-{fid}", symbol="BTCUSDT", side="BUY",
                           price=Decimal("100.5"), qty=Decimal("0.001"), fee=Decimal(0), fee_asset="USDT",
                           liquidity="TAKER", exch_ts=n, ts=1_000 + n)
    from shared import aggregates
    aggregates.rebuild()  # the rows the broker keeps beside its fills
    made.close()
    close_db()
    with sqlite3.connect(path) as con:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")


ROUNDS = 24  # requests per check, 4 at a time: they land on whichever of the 3 workers is free


def _all_answers(base: str, path: str) -> set[tuple[int, str]]:
    """(status, error code or the fill ids) of every answer to ROUNDS requests: every worker
    that takes one must give the same, so the set has one element when all agree."""
    from concurrent.futures import ThreadPoolExecutor

    def one(_):
        status, ctype, body = _request(base, path)
        assert ctype == "application/json", (status, ctype, body)
        parsed = json.loads(body)
        return status, (parsed["error"]["code"] if status >= 400 else
                        ",".join(sorted(t["fill_id"] for t in parsed.get("trades", []))))
    with ThreadPoolExecutor(4) as pool:
        return set(pool.map(one, range(ROUNDS)))


def test_gunicorn_workers_follow_the_database_file_missing_deleted_replaced_restored(tmp_path):
    target = tmp_path / "data" / "qf.db"
    proc, base, log_path = _start_api(tmp_path, target)
    try:
        # missing at start: 503 naming it, from every worker, and nothing is created
        assert _all_answers(base, "/health") == {(503, "db_missing")}
        assert _all_answers(base, "/api/v1/trades") == {(503, "db_missing")}
        assert not target.parent.exists()

        target.parent.mkdir()
        _make_db(tmp_path / "first.db", ["a1", "a2"])
        os.replace(tmp_path / "first.db", target)
        assert _all_answers(base, "/api/v1/trades") == {(200, "a1,a2")}  # the very next requests

        for suffix in ("", "-wal", "-shm"):  # deleted while every worker holds it open
            if Path(f"{target}{suffix}").exists():
                os.remove(f"{target}{suffix}")
        assert _all_answers(base, "/api/v1/trades") == {(503, "db_missing")}
        assert _all_answers(base, "/health") == {(503, "db_missing")}

        _make_db(tmp_path / "backup.db", ["a1", "a2"])
        os.replace(tmp_path / "backup.db", target)  # restored
        assert _all_answers(base, "/api/v1/trades") == {(200, "a1,a2")}

        _make_db(tmp_path / "other.db", ["b1"])
        os.replace(tmp_path / "other.db", target)  # replaced by another valid database, atomically
        assert _all_answers(base, "/api/v1/trades") == {(200, "b1")}
        assert _all_answers(base, "/health") == {(503, "unhealthy")}  # the database answers; no service beats here
    finally:
        _stop_api(proc)
    log = log_path.read_text()
    assert "event=db_gone" in log and "event=db_replaced" in log and "Traceback" not in log


def test_gunicorn_answers_what_it_refuses_itself_as_json(tmp_path):
    proc, base, log_path = _start_api(tmp_path, tmp_path / "qf.db", workers=1)
    host, port = base.removeprefix("http://").split(":")
    try:
        cases = {
            b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n": 431,
            b"GET /api/v1/trades?" + b"a=1&" * 3000 + b" HTTP/1.1\r\nHost: x\r\n\r\n": 414,
            b"NOT A REQUEST\r\n\r\n": 400,
            b"G\x01T / HTTP/1.1\r\n\r\n": 400,
            b"GET / HTTP/9.9\r\n\r\n": 400,
        }
        for raw, status in cases.items():
            with socket.create_connection((host, int(port)), timeout=5) as sock:
                sock.sendall(raw)
                answer = b""
                while chunk := sock.recv(65536):
                    answer += chunk
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 %d " % status), answer[:200]
            assert b"Content-Type: application/json" in head
            error = json.loads(body)["error"]
            assert error["code"] and error["message"], error
    finally:
        _stop_api(proc)


def _raw_answer(base: str, raw: bytes) -> tuple[int, dict]:
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(raw)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"Content-Type: application/json" in head, answer[:300]
    return int(head.split()[1]), json.loads(body)


def test_chunked_control_bodies_under_gunicorn(tmp_path):
    from services.api.app import CONTROL_MAX_BYTES
    token = "tok-chunked"
    proc, base, _ = _start_api(tmp_path, tmp_path / "qf.db", workers=1, QF_API_TOKEN=token,
                               QF_RISK_REP=f"tcp://127.0.0.1:{free_port()}", QF_RISK_CONTROL_TIMEOUT_MS="50")
    head = (b"POST /api/v1/control HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + token.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n")

    def chunked(body: bytes) -> bytes:
        return b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 1000]), body[i:i + 1000])
                        for i in range(0, len(body), 1000)) + b"0\r\n\r\n"
    try:
        # a malformed chunk size is raised by gunicorn while the app reads: was a 500
        status, body = _raw_answer(base, head + b"zz\r\n{}\r\n0\r\n\r\n")
        assert (status, body["error"]["code"]) == (400, "bad_param"), body
        # over the cap without a Content-Length: werkzeug stopped reading at the cap without a
        # word, so the first 4096 bytes were parsed as if whole (a 400 about the JSON, or worse)
        over = b'{"action": "HALT", "reason": "' + b"r" * CONTROL_MAX_BYTES + b'"}'
        status, body = _raw_answer(base, head + chunked(over))
        assert (status, body["error"]["code"]) == (413, "request_entity_too_large"), body
        # a valid chunked body is read whole and reaches risk (nothing listens: 503)
        status, body = _raw_answer(base, head + chunked(b'{"action": "HALT", "reason": "drill"}'))
        assert (status, body["error"]["code"]) == (503, "risk_unavailable"), body
    finally:
        _stop_api(proc)


# -- clients that connect and send nothing, or half a request -----------------------------------

def test_idle_and_half_sent_connections_hold_no_worker(tmp_path):
    """Two sync workers used to block on the first two connections that sent nothing or half a
    request (a browser's pre-connects do), until gunicorn's 30 s worker timeout killed them:
    /health/live went unanswered meanwhile. Now such connections wait outside the workers."""
    from services.api import worker

    db = tmp_path / "qf.db"
    _make_db(db, ["a1"])
    proc, base, log_path = _start_api(tmp_path, db, workers=2, QF_API_TOKEN="tok-3f9")  # control reads its body
    port = int(base.rsplit(":", 1)[1])
    held: list[socket.socket] = []
    try:
        def connect(data: bytes) -> socket.socket:
            s = socket.create_connection(("127.0.0.1", port), timeout=worker.REQUEST_S + 10)
            s.sendall(data)
            held.append(s)
            return s
        idle = [connect(b"") for _ in range(4)]
        half = [connect(b"GET /api/v1/status HTTP/1.1\r\nHost: x\r\n") for _ in range(4)]
        short = [connect(b"POST /api/v1/control HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"a") for _ in range(4)]
        # every worker is free for a whole request meanwhile (urlopen's own timeout is 5 s)
        for _ in range(10):
            assert _request(base, "/health/live")[0] == 200
        status, _, body = _request(base, "/api/v1/trades")
        assert status == 200 and [t["fill_id"] for t in json.loads(body)["trades"]] == ["a1"]
        # a request completed late is served as any other
        late = half[0]
        late.sendall(b"\r\n")
        assert late.recv(65536).startswith(b"HTTP/1.1 200 ")
        # the incomplete ones get a 408 in JSON once REQUEST_S has passed since their first byte
        for s in half[1:] + short:
            answer = s.recv(65536)
            assert answer.startswith(b"HTTP/1.1 408 Request Timeout"), answer[:200]
            assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
        assert all(s.fileno() >= 0 for s in idle)  # still open: idle ones wait up to IDLE_S, quietly
        # a chunked body is handed over with its head and read under the worker's socket timeout:
        # it holds one worker at most HANDLE_TIMEOUT_S, and says so in one line
        chunked = connect(b"POST /api/v1/control HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok-3f9\r\n"
                          b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"a")
        chunked.settimeout(worker.HANDLE_TIMEOUT_S + 10)
        answer = chunked.recv(65536)  # the API's body reader timed out: a JSON 400, the worker free again
        assert answer.startswith(b"HTTP/1.1 400 ") and b"application/json" in answer, answer[:300]
        assert _request(base, "/health/live")[0] == 200
    finally:
        for s in held:
            s.close()
        _stop_api(proc)
    log = log_path.read_text()
    assert "WORKER TIMEOUT" not in log and "Traceback" not in log, log[-2000:]


def test_a_request_is_whole_once_its_head_and_its_content_length_are_in():
    from services.api.worker import PEEK_BYTES, request_complete

    assert not request_complete(b"")
    assert not request_complete(b"GET / HTTP/1.1\r\nHost: x\r\n")
    assert request_complete(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    post = b"POST /c HTTP/1.1\r\nHost: x\r\ncontent-LENGTH: 5\r\n\r\n"
    assert not request_complete(post + b"abcd") and request_complete(post + b"abcde")
    assert request_complete(b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nab")
    assert request_complete(b"G" * PEEK_BYTES)  # gunicorn's own limits answer that one
    assert request_complete(b"GET / HTTP/1.1\nHost: x\n\n")  # bare newlines: gunicorn's parser judges
