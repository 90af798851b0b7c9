"""A password in QF_DB never reaches any output: a whole `qf up`, each service on its own, `qf config`.

The services cannot reach the database named (no PostgreSQL server answers, the driver may not
even be installed): what matters is that nothing they print on the way, config lines, error
lines of the failed attempts, tracebacks, restart notices and the API's answers, holds it."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import uuid

import pytest

from tests.conftest import ROOT, SPOT_CAPTURE, clean_environ, free_port, tcp_env, wait_for

pytestmark = pytest.mark.e2e

SERVICES = ("broker", "risk", "api", "strategy", "marketdata")


def _secrets() -> tuple[str, str]:
    tag = uuid.uuid4().hex[:12]
    return f"pw-{tag}-Sekr3t", f"qp-{tag}-T0ken"


def _postgres_url(password: str, query_secret: str) -> str:
    # a port where nothing listens: every connection attempt fails, and says so
    return f"postgresql://qf:{password}@127.0.0.1:{free_port()}/qf?password={query_secret}&sslmode=disable"


def _api_answer(bind: str, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{bind}{path}", timeout=2) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


class _Reader:
    """Collects a process's output on a thread (a pipe must be drained while it runs)."""

    def __init__(self, stream) -> None:
        self.lines: list[str] = []
        self.thread = threading.Thread(target=lambda: self.lines.extend(stream), daemon=True)
        self.thread.start()

    @property
    def text(self) -> str:
        return "".join(self.lines)


def _assert_clean(text: str, secrets: tuple[str, ...], where: str) -> None:
    for secret in secrets:
        assert secret not in text, f"{where} printed the secret {secret!r}:\n" + "\n".join(
            line for line in text.splitlines() if secret in line)[:3000]


@contextlib.contextmanager
def qf_up(env: dict[str, str], *args: str):
    """`qf up *args` with `env`, its stdout and stderr collected: yields (process, stdout, stderr).
    A process still running at the end (the test failed before stopping it) is killed with its
    session; the readers have read everything when the block is left."""
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "up", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    out, err = _Reader(proc.stdout), _Reader(proc.stderr)
    try:
        yield proc, out, err
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        out.thread.join(10)
        err.thread.join(10)


@contextlib.contextmanager
def services(names: tuple[str, ...], env: dict[str, str]):
    """Each service of `names` on its own (`qf NAME`), as a container runtime starts them, with
    their raw stdout and stderr collected: yields ({name: process}, {name: (stdout, stderr)}).
    At the end each one still running is stopped (SIGTERM, then SIGKILL after 20 s), and the
    readers have read everything."""
    procs = {name: subprocess.Popen([sys.executable, "-m", "services.cli", name], cwd=ROOT, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in names}
    readers = {name: (_Reader(p.stdout), _Reader(p.stderr)) for name, p in procs.items()}
    try:
        yield procs, readers
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        for o, e in readers.values():
            o.thread.join(10)
            e.thread.join(10)


def test_qf_up_never_prints_the_database_password(tmp_path):
    password, query_secret = _secrets()
    settings = tcp_env(tmp_path, QF_DB=_postgres_url(password, query_secret), QF_REPLAY_LOOP="true",
                       QF_API_TOKEN="tok-" + uuid.uuid4().hex)
    env = {**clean_environ(), **settings, "PYTHONUNBUFFERED": "1"}
    answers = []
    with qf_up(env, "--feed", f"replay:{SPOT_CAPTURE}", "--speed", "20") as (proc, out, err):
        # broker and risk fail on the database: restarted with backoff (a failure `qf up` judges
        # beyond a restart, exit status 2, stops it instead: both are fine here)
        wait_for(lambda: proc.poll() is not None or ("restarting broker (restart #2)" in out.text
                                                     and "restarting risk (restart #2)" in out.text),
                 60, "broker and risk to fail on the database and be restarted twice")
        if proc.poll() is None:
            wait_for(lambda: all(f"{name:<10} | " in out.text for name in SERVICES), 30, "every service's lines")

            def api_says_unavailable():
                answer = _api_answer(settings["QF_API_BIND"], "/api/v1/trades")
                answers.append(answer)
                return answer[0] == 503
            wait_for(api_says_unavailable, 30, "the api to answer 503")
            answers.append(_api_answer(settings["QF_API_BIND"], "/health"))
            assert json.loads(answers[-1][1])["error"]["code"] == "db_unavailable", answers[-1]
            wait_for(lambda: "| status services" in out.text, 30, "a status line")
            proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) in (0, 2)
    text = out.text + err.text
    _assert_clean(text, (password, query_secret, settings["QF_API_TOKEN"]), "qf up")
    _assert_clean(json.dumps(answers), (password, query_secret), "the api")
    # not vacuous: the settings were printed, masked, by the services, and more than once
    config_lines = [line for line in text.splitlines() if "event=config " in line]
    assert len(config_lines) >= 3, text[-3000:]
    assert all('QF_DB="postgresql://qf:***@127.0.0.1:' in line and "password=***&sslmode=disable" in line
               and "QF_API_TOKEN=***" in line for line in config_lines), config_lines[0]


@pytest.mark.parametrize("kind", ["postgresql", "sqlite"])
def test_each_service_on_its_own_never_prints_the_password(tmp_path, kind):
    """Without `qf up` in between (it masks what passes through it too): each service's own
    stdout and stderr, as a container runtime would collect them."""
    password, query_secret = _secrets()
    if kind == "postgresql":
        url = _postgres_url(password, query_secret)
    else:  # a peewee sqlite URL whose parameters cannot be used: the services fail on them
        url = f"sqlite:///{tmp_path}/qf.db?password={password}&api_key={query_secret}"
    settings = tcp_env(tmp_path, QF_DB=url, QF_FEED=f"replay:{SPOT_CAPTURE}", QF_REPLAY_LOOP="true",
                       QF_REPLAY_SPEED="20")
    env = {**clean_environ(), **settings, "PYTHONUNBUFFERED": "1"}
    answers = []
    with services(SERVICES, env) as (procs, readers):
        # broker and risk stop by themselves on a database they cannot open
        for name in ("broker", "risk"):
            procs[name].wait(60)
            assert procs[name].returncode != 0, readers[name][0].text
        answers.append(wait_for(lambda: (a := _api_answer(settings["QF_API_BIND"], "/health"))[0] and a, 30,
                                "the api to answer"))
        answers.append(_api_answer(settings["QF_API_BIND"], "/api/v1/status"))
        wait_for(lambda: all("event=config" in readers[n][0].text for n in SERVICES), 30, "every config line")
    for name, (o, e) in readers.items():
        _assert_clean(o.text, (password, query_secret), f"{name}'s stdout")
        _assert_clean(e.text, (password, query_secret), f"{name}'s stderr")
        assert "***" in o.text, f"{name} printed no masked config line:\n{o.text[-2000:]}"
    _assert_clean(json.dumps(answers), (password, query_secret), "the api")
    assert all(status == 503 for status, _ in answers), answers
    assert procs["api"].returncode == 0


def test_qf_config_never_prints_the_password(tmp_path):
    password, query_secret = _secrets()
    env = {**clean_environ(), "QF_DB": _postgres_url(password, query_secret)}
    proc = subprocess.run([sys.executable, "-m", "services.cli", "config"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "`QF_DB`" in proc.stdout
    _assert_clean(proc.stdout + proc.stderr, (password, query_secret), "qf config")
