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

REPO = Path(__file__).resolve().parents[3]
START_S = 30.0  # bound on gunicorn's start (two forked workers importing Flask)
STOP_S = 10.0  # bound on a SIGTERM stop (graceful timeout is 5 s)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        assert wait_healthy(proc, f"{base}/health", log_path) == {"status": "ok", "db": "ok"}

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
