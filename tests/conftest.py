"""Fixtures shared by the whole suite: free ports, explicit configs, bounded waits."""
from __future__ import annotations

import contextlib
import os
import subprocess
import time
from typing import Callable, Iterator

import pytest

from shared import config as qfconfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")
SPOT_CAPTURE = os.path.join(DATA, "binance-spot-btcusdt-20240808.jsonl.gz")
USDM_CAPTURE = os.path.join(DATA, "binance-usdm-btcusdt-20240718.jsonl.gz")


from bench.common import free_port  # noqa: E402,F401 - one chooser for tests and benchmarks


def wait_for(predicate: Callable[[], object], timeout: float, what: str, step: float = 0.02,
             explain: Callable[[], str] | None = None):
    """Poll `predicate` until it returns something truthy; fail after `timeout` s (with what
    `explain()` says about the state it was left in, when given)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            state = f": {explain()}" if explain is not None else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}{state}")
        time.sleep(step)  # polling interval of a bounded wait, not synchronisation


def stop_process(proc: subprocess.Popen, grace_s: float = 15.0) -> int:
    """SIGTERM `proc` if it still runs and wait for it; SIGKILL it after `grace_s`. Returns its
    exit status (a test asserts 0 for a clean stop; -9 means it had to be killed)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            return proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait(10)


def journal_stored(db: str, timeout: float = 5.0, run_dir: str = "") -> None:
    """Wait until the broker has stored what its journal holds (it does within milliseconds of
    its answers): only then does another process reading the database `db` see every fill told.
    A server's (`db` a URL) journal is in the broker's QF_RUN_DIR: give `run_dir`."""
    from shared.journal import journal_path
    if "://" in db and not run_dir:
        raise ValueError("journal_stored: a database URL's journal is in the broker's run_dir: give it")
    path = journal_path(db, run_dir)
    wait_for(lambda: not os.path.exists(path) or os.path.getsize(path) == 0, timeout,
             f"the broker to store its journal {path}", step=0.002)


def tcp_env(tmp_path, **extra: str) -> dict[str, str]:
    """QF_ settings for a stack on free loopback ports with its own database."""
    env = {
        "QF_MD_PUB": f"tcp://127.0.0.1:{free_port()}",
        "QF_RISK_REP": f"tcp://127.0.0.1:{free_port()}",
        "QF_BROKER_REP": f"tcp://127.0.0.1:{free_port()}",
        "QF_BROKER_PUB": f"tcp://127.0.0.1:{free_port()}",
        "QF_RISK_PUB": f"tcp://127.0.0.1:{free_port()}",
        "QF_STRATEGY_PUB": f"tcp://127.0.0.1:{free_port()}",
        "QF_API_BIND": f"127.0.0.1:{free_port()}",
        "QF_DB": str(tmp_path / "qf.db"),
        "QF_RUN_DIR": str(tmp_path / "run"),
        "QF_HEARTBEAT_MS": "200",
        # on the wall clock a test must not depend on the weekday: the pauses are tested with a
        # clock they move (tests/services/risk/test_pause.py, tests/test_pause.py)
        "QF_SHABBAT_PAUSE": "false",
    }
    env.update(extra)
    return env


def ipc_env(tmp_path, **extra: str) -> dict[str, str]:
    env = tcp_env(tmp_path, **extra)
    sock = tmp_path / "sock"
    for key, name in (("QF_MD_PUB", "md"), ("QF_RISK_REP", "risk"), ("QF_BROKER_REP", "broker"),
                      ("QF_BROKER_PUB", "broker-pub"), ("QF_RISK_PUB", "risk-pub"),
                      ("QF_STRATEGY_PUB", "strategy-pub")):
        env[key] = f"ipc://{sock}/{name}.sock"
    env.update(extra)
    return env


def clean_environ() -> dict[str, str]:
    """os.environ without any QF_ variable, for subprocesses given explicit settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith("QF_")}


def fill_rows(db: str) -> list[tuple]:
    """Every row of `db`'s fills table, in fill_id order (read-only): what byte-for-byte comparisons hold."""
    import sqlite3
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
        return con.execute("SELECT * FROM fills ORDER BY fill_id").fetchall()


def run_lockstep(capture: str, env: dict[str, str], timeout_s: float) -> tuple[list[tuple], float, list[str]]:
    """`qf up --feed replay:CAPTURE --lockstep` with `env` (QF_DB among it) until marketdata logs
    "lockstep done" (AssertionError with the output's tail after `timeout_s`), then stopped, its whole
    process group with it. Returns (the fills rows, read after the stop, wall seconds to "lockstep
    done", output lines)."""
    import signal
    import sys
    import threading

    lines: list[str] = []
    done = threading.Event()
    t0 = time.perf_counter()
    up = subprocess.Popen([sys.executable, "-m", "services.cli", "up", "--feed", f"replay:{capture}", "--lockstep"],
                          cwd=ROOT, env={**env, "PYTHONUNBUFFERED": "1"},
                          stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def pump() -> None:
        for line in up.stdout:
            lines.append(line.rstrip("\n"))
            if "lockstep done" in line:
                done.set()
    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        if not done.wait(timeout_s):
            raise AssertionError(f"the lock-step replay did not finish in {timeout_s:.0f} s:\n"
                                 + "\n".join(lines[-60:]))
        wall = time.perf_counter() - t0
    finally:
        os.killpg(up.pid, signal.SIGTERM)
        try:
            up.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait(timeout=10)
        reader.join(timeout=10)
    # read once the stack stopped: the broker's last fills may still be in its journal at "lockstep
    # done" (durable, not yet stored in SQLite); a broker stopped cleanly has stored them all
    return fill_rows(env["QF_DB"]), wall, lines


@pytest.fixture
def make_config(tmp_path):
    def make(**env: str) -> qfconfig.Config:
        return qfconfig.load(tcp_env(tmp_path, **env))
    return make


class SmallDisk:
    """A real, small file system (tmpfs) mounted at `path` for one test: `fill()` takes every
    free byte with a filler file, `free()` deletes it, `read_only()` / `read_write()` remount it."""

    def __init__(self, path) -> None:
        self.path = path
        self.filler = os.path.join(str(path), "filler")

    def fill(self) -> int:
        """Write the filler until the file system refuses a single byte; returns bytes written."""
        written = 0
        with open(self.filler, "ab", buffering=0) as f:
            for chunk in (1 << 20, 1 << 12, 1):
                block = b"\0" * chunk
                while True:
                    try:
                        n = f.write(block)
                    except OSError:
                        break
                    written += n or 0
                    if not n:
                        break
        return written

    def free(self) -> None:
        os.unlink(self.filler)

    def read_only(self) -> None:
        """Remount read-only (refused while a file on it is open for writing)."""
        import subprocess
        subprocess.run(["mount", "-o", "remount,ro", str(self.path)], check=True, capture_output=True)

    def read_write(self) -> None:
        import subprocess
        subprocess.run(["mount", "-o", "remount,rw", str(self.path)], check=True, capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs at tmp_path/disk, unmounted after the test (which stops its processes
    first). Skips, saying why, where mounting is not permitted (needs root or CAP_SYS_ADMIN)."""
    import subprocess
    path = tmp_path / "disk"
    path.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0755", "tmpfs", str(path)],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot mount a tmpfs for a real full or read-only disk: {exc}")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for a real full or read-only disk: {done.stderr.strip()}")
    try:
        yield SmallDisk(path)
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)  # a straggler holds a file


@pytest.fixture(autouse=True)
def _stop_api_watchers():
    """The API's bus watchers (services/control/watch.py) a test's apps started end with the test."""
    yield
    import sys
    watch = sys.modules.get("services.control.watch")
    if watch is not None:
        watch.BusWatch.close_all()


def renamed_capture(src: str, dst, symbol: str) -> str:
    """The real spot BTCUSDT capture `src` written to `dst` with its symbol renamed to `symbol`
    (stream names, events, the snapshot): a second market for tests of several symbols, whose
    prices are BTC's. Returns `dst` as a string."""
    import gzip
    with gzip.open(src, "rb") as fin, gzip.open(dst, "wb", compresslevel=1) as fout:
        for line in fin:
            fout.write(line.replace(b"btcusdt", symbol.lower().encode()).replace(b"BTCUSDT", symbol.upper().encode()))
    return str(dst)


@contextlib.contextmanager
def running(stack, *closing) -> Iterator[dict]:
    """Start `stack` (services.supervisor.Stack); on a failure print each process's last lines;
    on the way out stop it (SIGTERM, at most 15 s) and close `closing`. Yields the dict its exit
    codes go into, for the caller to check after."""
    codes: dict = {}
    try:
        stack.start()
        yield codes
    except BaseException:
        for c in stack.children:
            print(f"--- {c.name} (last lines)\n" + "\n".join(list(c.tail)[-30:]))
        raise
    finally:
        codes.update(stack.stop(timeout=15))
        for thing in closing:
            thing.close()


def all_up(stack, but: tuple[str, ...] = ()) -> None:
    """Every process of `stack` (but those named) still runs and was never restarted."""
    kept = [c for c in stack.children if c.name not in but]
    assert all(c.running for c in kept), {c.name: list(c.tail)[-5:] for c in kept}
    assert not any(c.restarts for c in kept)


def capture_head(after_snapshot: int = 3000) -> list[bytes]:
    """The shipped spot capture's lines up to `after_snapshot` records past its snapshot: the
    start of a short capture that tests then damage (tests/services/*/test_*damaged*.py)."""
    import gzip
    lines = gzip.open(SPOT_CAPTURE, "rb").read().splitlines(keepends=True)
    return lines[:_snapshot_index(lines) + after_snapshot]


def depth_line(lines: list[bytes], after: int = 50) -> int:
    """Index in `lines` of the first depth event `after` records past the snapshot."""
    return next(i for i in range(_snapshot_index(lines) + after, len(lines)) if b"depthUpdate" in lines[i])


def _snapshot_index(lines: list[bytes]) -> int:
    return next(i for i, line in enumerate(lines) if b'"k":"snapshot"' in line)
