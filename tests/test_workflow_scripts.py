"""The scripts the GitHub workflows and the Fly machine run, run for real: the health check against a
real `qf api` (healthy, unhealthy, unreachable) and the fake Telegram Bot API, the daily report against
a live API and a local git remote, the deploy against a local git remote, the Fly watchdog on a child
that stops answering. tests/test_deploy_files.py checks the workflow files themselves."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from shared.config import load
from tests.conftest import free_port, stop_process, wait_for
from tests.services.api.conftest import Beats
from tests.services.notifier.fake_bot_api import FakeBotApi

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "deploy" / "scripts"
HEALTH = SCRIPTS / "health-check.sh"
REPORT = SCRIPTS / "report.sh"
DEPLOY = SCRIPTS / "deploy.sh"
ENTRYPOINT = ROOT / "deploy" / "fly_entrypoint.py"
QF = Path(sys.executable).parent / "qf"
SERVICES = ("marketdata", "strategy", "risk", "broker")
# Shaped like real ones, made up for the tests.
BOT_TOKEN = "987654321:AAF3kQz9xV7cT2mWq8LrB5nYh4pJd6sE1uG"
API_TOKEN = "qf-api-token-Zt8rW2xKp9"
CHATS = (123456789, -1001234567890)  # a person and a group
START_S = 30.0  # bound on gunicorn's start
SCRIPT_S = 60.0  # bound on one script run


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without QF_ or QUANTUMFLOW_ variables, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QF_", "QUANTUMFLOW_", "GITHUB_"))}
    env.update(extra)
    return env


def run(script: Path, cwd: Path = ROOT, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script)], cwd=cwd, env=clean_env(**env), capture_output=True, text=True,
                          timeout=SCRIPT_S)


def output(out: subprocess.CompletedProcess) -> str:
    return out.stdout + out.stderr


def assert_no_secret(out: subprocess.CompletedProcess, *secrets: str) -> None:
    text = output(out)
    for secret in secrets:
        # the whole token, and a bot token's secret half (after the colon)
        assert secret not in text and secret.rpartition(":")[2] not in text, "a token reached the output"


def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


# -- a real `qf api` over a small trading history, with heartbeats a test can turn on and off -------

class LiveApi:
    """`qf api` (gunicorn, one worker) on a free port over `bench.api.make_db(fills=2000, days=1,
    seed=7)`, hearing heartbeats over TCP from a thread of the test while `beating` is set."""

    def __init__(self, tmp: Path) -> None:
        from bench.api import make_db
        db = tmp / "qf.db"
        make_db(str(db), fills=2000, days=1, seed=7)
        endpoints = {f"QF_{k}_PUB": f"tcp://127.0.0.1:{free_port()}" for k in ("MD", "BROKER", "RISK", "STRATEGY")}
        settings = {"QF_DB": str(db), "QF_RUN_DIR": str(tmp / "run"), "QF_SHABBAT_PAUSE": "false",
                    "QF_HEARTBEAT_MS": "200", "QF_SYMBOLS": "BTCUSDT,ETHUSDT", **endpoints}
        self.cfg = load(settings)
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = tmp / "api.log"
        self.beating = threading.Event()
        self._closed = threading.Event()
        self._beater = threading.Thread(target=self._beat, name="beats", daemon=True)
        self._beater.start()
        env = clean_env(**settings, QF_API_BIND=self.url.removeprefix("http://"), QF_API_WORKERS="1",
                        QF_API_TOKEN=API_TOKEN, PYTHONUNBUFFERED="1")
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "services.api"], cwd=ROOT, env=env, stdout=out,
                                         stderr=subprocess.STDOUT)
        wait_for(lambda: self.proc.poll() is not None or self._live(), START_S, "the api to start")
        assert self.proc.poll() is None, self.log.read_text()

    def _live(self) -> bool:
        try:
            return get(self.url + "/health/live")[0] == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def _beat(self) -> None:
        # The only thread that touches the PUB sockets, for their whole life.
        beats = Beats(self.cfg)
        try:
            while not self._closed.wait(0.05):  # the heartbeat period of this fake stack
                if self.beating.is_set():
                    beats.beat()
        finally:
            beats.close()

    def healthy(self) -> dict:
        self.beating.set()
        return wait_for(lambda: (lambda s, b: s == 200 and b)(*get(self.url + "/health")), 15, "/health = 200")

    def unhealthy(self) -> dict:
        self.beating.clear()
        return wait_for(lambda: (lambda s, b: s == 503 and b)(*get(self.url + "/health")), 15, "/health = 503")

    def close(self) -> None:
        try:
            assert stop_process(self.proc, 10) == 0, self.log.read_text()
        finally:
            self._closed.set()
            self._beater.join(5)


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    live = LiveApi(tmp_path_factory.mktemp("api"))
    yield live
    live.close()


@pytest.fixture
def bot():
    fake = FakeBotApi(BOT_TOKEN)
    yield fake
    fake.close()


def health_env(url: str, bot: FakeBotApi | None, **extra: str) -> dict[str, str]:
    env = {"QUANTUMFLOW_API_URL": url, "QUANTUMFLOW_HEALTH_ATTEMPTS": "2", "QUANTUMFLOW_HEALTH_RETRY_S": "0.1",
           "QUANTUMFLOW_HTTP_TIMEOUT_S": "5"}
    if bot is not None:
        env.update(QUANTUMFLOW_TELEGRAM_TOKEN=BOT_TOKEN, QUANTUMFLOW_TELEGRAM_CHAT_IDS=",".join(map(str, CHATS)),
                   QUANTUMFLOW_TELEGRAM_API=f"http://127.0.0.1:{bot.port}")
    env.update(extra)
    return env


# -- deploy/scripts/health-check.sh ---------------------------------------------------------------

def test_health_check_passes_on_a_healthy_api_and_sends_nothing(api, bot):
    body = api.healthy()
    assert body["problems"] == []
    out = run(HEALTH, **health_env(api.url, bot))
    assert out.returncode == 0, output(out)
    assert f"{api.url}/health answered 200: healthy" in out.stdout
    assert bot.requests == [], "a healthy API alerts nobody"
    assert_no_secret(out, BOT_TOKEN)


def test_health_check_alerts_on_telegram_naming_the_problems_and_fails(api, bot):
    body = api.unhealthy()
    assert body["problems"], body
    out = run(HEALTH, **health_env(api.url, bot))
    assert out.returncode == 1, output(out)
    sends = bot.sends()
    assert sorted(r.chat_id for r in sends) == sorted(CHATS), "one alert to each chat"
    assert all(r.method == "sendMessage" and r.path == f"/bot{BOT_TOKEN}/sendMessage" for r in sends)
    assert all(r.content_type == "application/x-www-form-urlencoded" for r in sends)
    text = sends[0].text
    assert sends[1].text == text
    assert text.startswith(f"QuantumFlow is unhealthy: {api.url}/health answered 503")
    for name in SERVICES:  # each silent service on a line of its own, in the API's words
        assert any(line.startswith(f"- {name}: ") for line in text.splitlines()), text
    assert "attempt 2 of 2" in out.stdout and "UNHEALTHY" in out.stderr
    assert_no_secret(out, BOT_TOKEN)


@pytest.mark.parametrize("case", ["unreachable", "not-health-json"])
def test_health_check_alerts_when_the_api_is_unreachable_or_answers_something_else(api, bot, case):
    if case == "unreachable":
        url, expected = f"http://127.0.0.1:{free_port()}", "could not be reached: curl: (7)"
        env = health_env(url, bot)
    else:  # a proxy's error page, a wrong path: no `problems` to name
        url, expected = api.url, "answered 404\n- the answer is not /health's JSON"
        env = health_env(url, bot, QUANTUMFLOW_HEALTH_PATH="/api/v1/no-such-thing")
    out = run(HEALTH, **env)
    assert out.returncode == 1, output(out)
    texts = bot.texts()
    assert len(texts) == len(CHATS)
    assert texts[0].startswith("QuantumFlow is unhealthy: ") and expected in texts[0], texts[0]
    assert_no_secret(out, BOT_TOKEN)


def test_health_check_says_when_telegram_refuses_and_still_fails(bot):
    bot.default = ("400", "Bad Request: chat not found")
    out = run(HEALTH, **health_env(f"http://127.0.0.1:{free_port()}", bot, QUANTUMFLOW_HEALTH_ATTEMPTS="1"))
    assert out.returncode == 1, output(out)
    assert len(bot.sends(status=400)) == len(CHATS)
    assert "Telegram refused the alert to chat 123456789: HTTP 400 Bad Request: chat not found" in out.stderr
    assert "(and the alert failed)" in out.stderr
    assert_no_secret(out, BOT_TOKEN)


def test_health_check_without_telegram_settings_fails_without_an_alert():
    out = run(HEALTH, **health_env(f"http://127.0.0.1:{free_port()}", None, QUANTUMFLOW_HEALTH_ATTEMPTS="1"))
    assert out.returncode == 1, output(out)
    assert "no Telegram alert: QUANTUMFLOW_TELEGRAM_TOKEN is not set" in out.stderr


@pytest.mark.parametrize("env, message", [
    ({}, "QUANTUMFLOW_API_URL is not set"),
    ({"QUANTUMFLOW_API_URL": "ftp://x"}, "must start with http:// or https://"),
    ({"QUANTUMFLOW_API_URL": "http://x", "QUANTUMFLOW_HEALTH_ATTEMPTS": "0"}, "QUANTUMFLOW_HEALTH_ATTEMPTS"),
    ({"QUANTUMFLOW_API_URL": "http://x", "QUANTUMFLOW_TELEGRAM_TOKEN": "not a token"}, "is not a bot token"),
    ({"QUANTUMFLOW_API_URL": "http://x", "QUANTUMFLOW_TELEGRAM_TOKEN": BOT_TOKEN}, "QUANTUMFLOW_TELEGRAM_CHAT_IDS"),
], ids=["no-url", "bad-url", "attempts", "bad-token", "no-chats"])
def test_health_check_refuses_bad_settings_with_exit_2(env, message):
    out = run(HEALTH, **env)
    assert out.returncode == 2 and message in out.stderr, output(out)
    assert "not a token" not in output(out)  # a malformed token is not quoted either


# -- deploy/scripts/report.sh ----------------------------------------------------------------------

README = """# QuantumFlow

Some text above.

<!-- report:start -->
(the daily report goes here)
<!-- report:end -->

Some text below.
"""


def git(cwd: Path, *args: str) -> str:
    out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30,
                         env=clean_env(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.com",
                                       GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.com"))
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.fixture
def checkout(tmp_path) -> Path:
    """A clone of a bare `origin` whose main holds a README with the report block."""
    origin, work = tmp_path / "origin.git", tmp_path / "work"
    git(tmp_path, "init", "--quiet", "--bare", "--initial-branch=main", str(origin))
    git(tmp_path, "clone", "--quiet", str(origin), str(work))
    git(work, "checkout", "--quiet", "-b", "main")
    (work / "README.md").write_text(README)
    (work / "fly.toml").write_text('app = "quantumflow"\n')
    git(work, "add", "README.md", "fly.toml")
    git(work, "commit", "--quiet", "-m", "initial")
    git(work, "push", "--quiet", "origin", "main")
    return work


def test_report_against_a_live_api_commits_readme_and_images_once(api, checkout):
    """`qf report --api` over the live API's CSV export: the README's block and the images are
    committed and pushed; a second run on the same data finds nothing to commit."""
    env = {"QUANTUMFLOW_API_URL": api.url, "QUANTUMFLOW_API_TOKEN": API_TOKEN, "QUANTUMFLOW_QF": str(QF),
           "QUANTUMFLOW_REPORT_COMMIT": "1", "QUANTUMFLOW_REPORT_PUSH": "1"}
    before = git(checkout, "rev-parse", "HEAD")
    out = run(REPORT, cwd=checkout, **env)
    assert out.returncode == 0, output(out)
    assert_no_secret(out, API_TOKEN)
    images = sorted(p.name for p in (checkout / "docs" / "report").glob("*.png"))
    assert images, f"no image in docs/report: {output(out)}"
    readme = (checkout / "README.md").read_text()
    assert readme.startswith("# QuantumFlow\n\nSome text above.\n") and readme.endswith("Some text below.\n")
    assert "(the daily report goes here)" not in readme
    head = git(checkout, "rev-parse", "HEAD")
    assert head != before and git(checkout, "rev-parse", "origin/main") == head
    assert git(checkout, "ls-remote", "origin", "refs/heads/main").split()[0] == head, "pushed"
    changed = set(git(checkout, "show", "--name-only", "--format=", "HEAD").splitlines())
    assert "README.md" in changed and {f"docs/report/{n}" for n in images} <= changed, changed
    assert all(f == "README.md" or f.startswith("docs/report/") for f in changed), "only README and images"
    assert "[skip ci]" in git(checkout, "log", "-1", "--format=%s")
    assert git(checkout, "log", "-1", "--format=%an") == "github-actions[bot]"

    again = run(REPORT, cwd=checkout, **env)
    assert again.returncode == 0, output(again)
    assert "README and images unchanged: nothing to commit" in again.stdout
    assert git(checkout, "rev-parse", "HEAD") == head, "a second run on the same data changes no byte"
    assert git(checkout, "status", "--porcelain") == ""


def test_report_puts_its_commit_on_top_of_a_main_that_moved(api, checkout, tmp_path):
    """Someone pushed to main while the report ran: the push is refused, the report commit is
    rebased onto the new main once and pushed. `qf` here is a stand-in that writes a fixed image
    and README block, so this checks the script's git steps alone (the test above runs the real one)."""
    fake_qf = tmp_path / "bin" / "qf"
    fake_qf.parent.mkdir()
    fake_qf.write_text(textwrap.dedent("""\
        #!/usr/bin/env bash
        set -euo pipefail
        mkdir -p docs/report && printf 'png' > docs/report/equity.png
        sed -i 's/(the daily report goes here)/| trades | 2000 |/' README.md
        """))
    fake_qf.chmod(0o755)
    other = tmp_path / "other"
    git(tmp_path, "clone", "--quiet", str(tmp_path / "origin.git"), str(other))
    (other / "NEWER").write_text("pushed while the report ran\n")
    git(other, "add", "NEWER")
    git(other, "commit", "--quiet", "-m", "newer")
    git(other, "push", "--quiet", "origin", "main")
    newer = git(other, "rev-parse", "HEAD")
    out = run(REPORT, cwd=checkout, QUANTUMFLOW_API_URL=api.url, QUANTUMFLOW_QF=str(fake_qf),
              QUANTUMFLOW_REPORT_COMMIT="1", QUANTUMFLOW_REPORT_PUSH="1")
    assert out.returncode == 0, output(out)
    assert "push refused; rebasing on origin/main" in out.stdout
    tip = git(checkout, "ls-remote", "origin", "refs/heads/main").split()[0]
    assert git(checkout, "rev-parse", "HEAD") == tip and git(checkout, "rev-parse", "HEAD~1") == newer
    assert set(git(checkout, "show", "--name-only", "--format=", tip).splitlines()) == \
        {"README.md", "docs/report/equity.png"}


def test_report_stops_with_the_apis_answer_before_drawing(api, checkout):
    out = run(REPORT, cwd=checkout, QUANTUMFLOW_API_URL=api.url + "/wrong-prefix", QUANTUMFLOW_API_TOKEN=API_TOKEN,
              QUANTUMFLOW_QF=str(QF), QUANTUMFLOW_REPORT_COMMIT="1")
    assert out.returncode == 1, output(out)
    assert "/wrong-prefix/api/v1/trades?format=csv answered 404" in out.stderr
    assert not (checkout / "docs").exists() and git(checkout, "status", "--porcelain") == ""
    assert_no_secret(out, API_TOKEN)


def test_report_refuses_bad_settings_with_exit_2(checkout):
    out = run(REPORT, cwd=checkout, QUANTUMFLOW_QF=str(QF))
    assert out.returncode == 2 and "QUANTUMFLOW_API_URL is not set" in out.stderr
    out = run(REPORT, cwd=checkout, QUANTUMFLOW_API_URL="http://x", QUANTUMFLOW_QF="no-such-qf-command")
    assert out.returncode == 2 and "the qf command (no-such-qf-command) is not installed" in out.stderr


# -- deploy/scripts/deploy.sh ----------------------------------------------------------------------

@pytest.fixture
def flyctl(tmp_path) -> tuple[Path, Path]:
    """A stand-in for Fly's CLI (the one part of a deploy that needs Fly itself): it records its
    arguments and whether it was given a token, and fails when FAIL is in its environment."""
    calls = tmp_path / "flyctl-calls.txt"
    exe = tmp_path / "bin" / "flyctl"
    exe.parent.mkdir()
    exe.write_text(textwrap.dedent(f"""\
        #!/usr/bin/env bash
        printf '%s token=%s\\n' "$*" "${{FLY_API_TOKEN:+set}}" >>{calls}
        [[ -z ${{FAIL:-}} ]]
        """))
    exe.chmod(0o755)
    return exe, calls


def test_deploy_deploys_mains_head(checkout, flyctl):
    exe, calls = flyctl
    sha = git(checkout, "rev-parse", "HEAD")
    out = run(DEPLOY, cwd=checkout, FLY_API_TOKEN="fly-secret-123", QUANTUMFLOW_DEPLOY_SHA=sha,
              QUANTUMFLOW_FLYCTL=str(exe))
    assert out.returncode == 0, output(out)
    assert calls.read_text() == "deploy --remote-only --config fly.toml --wait-timeout 10m token=set\n"
    assert f"deployed {sha[:12]}" in out.stdout
    assert_no_secret(out, "fly-secret-123")


def test_deploy_skips_a_commit_that_main_has_moved_past(checkout, flyctl, tmp_path):
    exe, calls = flyctl
    sha = git(checkout, "rev-parse", "HEAD")
    other = tmp_path / "other"
    git(tmp_path, "clone", "--quiet", str(tmp_path / "origin.git"), str(other))
    (other / "NEWER").write_text("a newer commit, its CI still running\n")
    git(other, "add", "NEWER")
    git(other, "commit", "--quiet", "-m", "newer")
    git(other, "push", "--quiet", "origin", "main")
    out = run(DEPLOY, cwd=checkout, FLY_API_TOKEN="fly-secret-123", QUANTUMFLOW_DEPLOY_SHA=sha,
              QUANTUMFLOW_FLYCTL=str(exe))
    assert out.returncode == 0, output(out)
    assert "skipped (the newer commit's CI run deploys it)" in out.stdout
    assert not calls.exists(), "flyctl must not run for an older commit"


def test_deploy_fails_clearly(checkout, flyctl):
    exe, calls = flyctl
    sha = git(checkout, "rev-parse", "HEAD")
    out = run(DEPLOY, cwd=checkout, QUANTUMFLOW_DEPLOY_SHA=sha, QUANTUMFLOW_FLYCTL=str(exe))
    assert out.returncode == 2 and "FLY_API_TOKEN is not set" in out.stderr
    out = run(DEPLOY, cwd=checkout, FLY_API_TOKEN="t", QUANTUMFLOW_DEPLOY_SHA="0" * 40, QUANTUMFLOW_FLYCTL=str(exe))
    assert out.returncode == 2 and "not the commit to deploy" in out.stderr
    out = run(DEPLOY, cwd=checkout, FLY_API_TOKEN="t", QUANTUMFLOW_DEPLOY_SHA=sha, QUANTUMFLOW_FLYCTL=str(exe),
              FAIL="1")
    assert out.returncode == 1 and f"flyctl deploy failed for {sha[:12]}" in out.stderr
    assert not (set(calls.read_text().splitlines()) - {"deploy --remote-only --config fly.toml --wait-timeout 10m "
                                                       "token=set"})


# -- deploy/fly_entrypoint.py: the watchdog that lets Fly restart a machine whose pipeline died ------

# A child standing in for `qf up`: serves GET /health with the status its file holds (200 or
# 503; "503x3" answers 503 three times, then 200), counts the requests, exits 0 on SIGTERM.
CHILD = textwrap.dedent("""\
    import http.server, pathlib, signal, sys
    port, state = int(sys.argv[1]), pathlib.Path(sys.argv[2])
    hits = state.with_suffix(".hits")
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            mode = state.read_text().strip()
            n = len(hits.read_text()) if hits.exists() else 0
            with hits.open("a") as f:
                f.write(".")
            code = 200 if mode == "200" or (mode == "503x3" and n >= 3) else 503
            self.send_response(code)
            self.send_header("Content-Length", "0")
            self.end_headers()
        def log_message(self, *a):
            pass
    server = http.server.HTTPServer(("127.0.0.1", port), H)
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    server.serve_forever()
    """)


def start_watchdog(tmp_path: Path, mode: str, fail_s: float) -> tuple[subprocess.Popen, Path]:
    port = free_port()
    state = tmp_path / "health"
    state.write_text(mode)
    code = (f"import sys; sys.path.insert(0, {str(ENTRYPOINT.parent)!r}); import fly_entrypoint as f; "
            f"sys.exit(f.watch([sys.executable, '-c', {CHILD!r}, '{port}', {str(state)!r}], "
            f"url='http://127.0.0.1:{port}/health', grace_s=0, fail_s={fail_s}, interval_s=0.05, stop_grace_s=5))")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=clean_env(PYTHONUNBUFFERED="1"))
    return proc, state.with_suffix(".hits")


def hits(path: Path) -> int:
    return len(path.read_text()) if path.exists() else 0


def test_watchdog_stops_qf_up_and_exits_1_when_health_keeps_failing(tmp_path):
    proc, hit_file = start_watchdog(tmp_path, "503", fail_s=0.3)
    try:
        code = proc.wait(timeout=20)
    finally:
        stop_process(proc, 5)
    out = proc.stdout.read()
    assert code == 1, out
    assert "watchdog: restarting the machine: stopping qf up" in out
    assert "HTTP 503" in out and hits(hit_file) >= 2


def test_watchdog_rides_out_a_short_failure_and_passes_sigterm_on(tmp_path):
    proc, hit_file = start_watchdog(tmp_path, "503x3", fail_s=30)
    try:
        wait_for(lambda: hits(hit_file) >= 6 or proc.poll() is not None, 20, "the watchdog to probe six times")
        assert proc.poll() is None, proc.stdout.read()
        proc.send_signal(signal.SIGTERM)  # Fly stopping the machine: `qf up` gets it and exits 0
        code = proc.wait(timeout=10)
    finally:
        stop_process(proc, 5)
    out = proc.stdout.read()
    assert code == 0, out
    assert "healthy again after" in out and "restarting" not in out
