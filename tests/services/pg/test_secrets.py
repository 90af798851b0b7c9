"""The database password never reaches any output with a real PostgreSQL server: `qf up`, `qf config`, errors.

tests/test_secrets.py shows it with no server answering; here the server answers, so the
services get past the connection (or are refused by it) and print what they print then."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from urllib.parse import quote

import pytest

from tests import pg
from tests.conftest import ROOT, SPOT_CAPTURE, clean_environ, tcp_env, wait_for
from tests.test_secrets import _api_answer, _assert_clean, qf_up, services

pytestmark = pytest.mark.e2e


def _forms(password: str) -> tuple[str, ...]:
    """The password as it may appear: as the server knows it, and as the URL spells it."""
    return password, quote(password, safe="")


def test_qf_up_on_a_real_server_never_prints_the_password(tmp_path, pg_server, pg_url):
    settings = tcp_env(tmp_path, QF_DB=pg_url, QF_REPLAY_LOOP="true", QF_API_TOKEN="tok-pg-secret-token")
    env = {**clean_environ(), **settings, "PYTHONUNBUFFERED": "1"}
    answers = []
    with qf_up(env, "--feed", f"replay:{SPOT_CAPTURE}", "--speed", "20") as (proc, out, err):
        # the stack runs on the server: fills stored, the API answers from them
        wait_for(lambda: proc.poll() is not None or pg.rows(pg_url, 'SELECT 1 FROM "fills" LIMIT 1'), 60,
                 "fills stored on the server")
        assert proc.poll() is None, out.text[-3000:]
        for path in ("/health", "/api/v1/status", "/api/v1/trades?limit=5", "/api/v1/pnl"):
            answers.append(wait_for(lambda: (a := _api_answer(settings["QF_API_BIND"], path))[0] == 200 and a, 30,
                                    f"the api to answer {path}"))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    text = out.text + err.text
    _assert_clean(text, (*_forms(pg_server.password), settings["QF_API_TOKEN"]), "qf up")
    _assert_clean(json.dumps(answers), _forms(pg_server.password), "the api")
    assert json.loads(answers[2][1])["trades"], answers[2]
    config_lines = [line for line in text.splitlines() if "event=config " in line]
    assert len(config_lines) >= 5 and all(' QF_DB=postgresql://qf:***@127.0.0.1:' in line for line in config_lines)
    assert "stopped: broker=0, risk=0, api=0, strategy=0, notifier=0, marketdata=0" in text, text[-3000:]


def test_qf_config_with_a_real_url_never_prints_the_password(pg_server, pg_url):
    proc = subprocess.run([sys.executable, "-m", "services.cli", "config"], cwd=ROOT,
                          env={**clean_environ(), "QF_DB": pg_url}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "`QF_DB`" in proc.stdout  # the settings' defaults, never the environment's
    _assert_clean(proc.stdout + proc.stderr, _forms(pg_server.password), "qf config")


def test_a_wrong_password_is_one_line_naming_host_and_database_not_the_password(tmp_path, pg_server, pg_url):
    """Each service on its own (their raw output, as a container runtime collects it): broker and
    risk stop with status 2 and one line naming user, host, port and database; the API answers
    503 db_unavailable; none of them prints the wrong password or the right one."""
    wrong = "wrong-Pa55@/%"
    url = pg_url.replace(quote(pg_server.password, safe=""), quote(wrong, safe=""))
    assert url != pg_url
    settings = tcp_env(tmp_path, QF_DB=url)
    env = {**clean_environ(), **settings, "PYTHONUNBUFFERED": "1"}
    with services(("broker", "risk", "api"), env) as (procs, readers):
        for name in ("broker", "risk"):
            assert procs[name].wait(60) == 2, readers[name][0].text + readers[name][1].text
        answer = wait_for(lambda: (a := _api_answer(settings["QF_API_BIND"], "/api/v1/status"))[0] and a, 30,
                          "the api to answer")
    name = pg_url.rsplit("/", 1)[1]
    where = f"postgresql://qf@127.0.0.1:{pg_server.port}/{name}"
    for service in ("broker", "risk"):
        lines = readers[service][1].text.splitlines()
        assert lines == [f"qf {service}: cannot use the database {where}: connection to server at \"127.0.0.1\", "
                         f"port {pg_server.port} failed: FATAL:  password authentication failed for user \"qf\""], lines
    assert answer[0] == 503 and json.loads(answer[1])["error"]["code"] == "db_unavailable", answer
    for service, (o, e) in readers.items():
        for secret in (wrong, pg_server.password):
            _assert_clean(o.text + e.text, _forms(secret), service)
    _assert_clean(answer[1], _forms(wrong), "the api")
    assert procs["api"].returncode == 0
