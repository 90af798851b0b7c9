"""Fly.io entrypoint: hand the root-owned volume to the `qf` user, drop root, run `qf ARGS`;
for `qf up`, watch /health and end the machine's main process when the pipeline stays dead.

Fly mounts volumes owned by root; QuantumFlow runs as the unprivileged `qf`
user (as in docker compose), so this is the only code that runs as root, and
only for the chown. fly.toml's `[processes] app = "up"` arrives here as
argv, so the machine runs `qf up`: every service under the supervisor, over
ipc:// sockets, with the SQLite file on the volume.

Why a watchdog here: Fly never restarts a machine for a failing health check
(its checks only steer the proxy's routing and deploys); it restarts one when
the main process exits non-zero (fly.toml's `[[restart]]`, on-failure). `qf up`
restarts a service process that dies, but a pipeline whose processes live on
without doing their work (a feed that never resyncs, a loop stuck on a lock)
is invisible to it and plain in /health. So `up` runs as this process's child:
after a grace period for the first sync, /health failing for QUANTUMFLOW_WATCHDOG_FAIL_S
on end stops `qf up` (SIGTERM: it flushes and closes the database) and exits 1,
and Fly boots the machine afresh. Fly's SIGTERM is passed on to `qf up`, whose
exit status is this process's. The settings are not QF_ ones (`qf` refuses
unknown QF_ variables): QUANTUMFLOW_WATCHDOG_URL, _GRACE_S, _FAIL_S (0: off),
_INTERVAL_S."""
import os
import pwd
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

DATA_DIR = "/data"
USER = "qf"
HEALTH_URL = "http://127.0.0.1:8000/health"
GRACE_S = 600.0  # the API's start, every book's first snapshot and sync (minutes on one shared vCPU)
FAIL_S = 300.0  # unhealthy this long without a break: restart (a resync takes seconds)
INTERVAL_S = 15.0  # as fly.toml's checks
PROBE_TIMEOUT_S = 5.0
STOP_GRACE_S = 25.0  # under fly.toml's kill_timeout (30 s)


def probe(url: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when `url` answers 200, else what went wrong (its status and body's start, or the error)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return None if resp.status == 200 else f"HTTP {resp.status}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}: {exc.read(300).decode(errors='replace')}"
    except (OSError, ValueError) as exc:  # refused, timed out, reset
        return f"unreachable: {exc}"


def say(text: str) -> None:
    print(f"qf-fly-entrypoint | {text}", flush=True)


def watch(cmd: list[str], url: str = HEALTH_URL, grace_s: float = GRACE_S, fail_s: float = FAIL_S,
          interval_s: float = INTERVAL_S, stop_grace_s: float = STOP_GRACE_S) -> int:
    """Run `cmd`, passing SIGTERM/SIGINT on; return its exit status when it ends, or 1 after
    stopping it because `url` failed for `fail_s` seconds on end (never in the first `grace_s`;
    `fail_s` <= 0: no watching)."""
    child = subprocess.Popen(cmd)
    stopping: list[int] = []

    def forward(signum, _frame) -> None:
        stopping.append(signum)
        if child.poll() is None:
            child.send_signal(signum)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    started = time.monotonic()
    failing_since = None
    while True:
        try:
            return child.wait(timeout=interval_s)
        except subprocess.TimeoutExpired:
            pass
        now = time.monotonic()
        if stopping or fail_s <= 0 or now - started < grace_s:
            continue
        problem = probe(url, min(PROBE_TIMEOUT_S, interval_s))
        if problem is None:
            if failing_since is not None:
                say(f"watchdog: {url} healthy again after {now - failing_since:.0f} s")
            failing_since = None
            continue
        if failing_since is None:
            failing_since = now
        say(f"watchdog: {url} failing for {now - failing_since:.0f} s of {fail_s:.0f}: {problem}")
        if now - failing_since >= fail_s and not stopping:
            say(f"watchdog: restarting the machine: stopping qf up (pid {child.pid})")
            child.terminate()
            try:
                child.wait(timeout=stop_grace_s)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
            return 1


def _setting(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    try:
        return float(raw) if raw else default
    except ValueError:
        say(f"{name}={raw!r} is not a number of seconds: using {default}")
        return default


def main(argv: list[str]) -> None:
    user = pwd.getpwnam(USER)
    if os.getuid() == 0:
        if os.path.isdir(DATA_DIR):
            # Only the mount point: files below it are created by `qf` itself.
            os.chown(DATA_DIR, user.pw_uid, user.pw_gid)
        os.setgroups([])
        os.setgid(user.pw_gid)
        os.setuid(user.pw_uid)
    os.environ["HOME"] = user.pw_dir
    os.environ["USER"] = os.environ["LOGNAME"] = USER
    args = argv or ["up"]
    if args != ["up"]:  # a one-off command (`fly ssh console`, `fly machine run … status`): qf itself
        os.execvp("qf", ["qf", *args])
    sys.exit(watch(["qf", *args], url=os.environ.get("QUANTUMFLOW_WATCHDOG_URL") or HEALTH_URL,
                   grace_s=_setting("QUANTUMFLOW_WATCHDOG_GRACE_S", GRACE_S),
                   fail_s=_setting("QUANTUMFLOW_WATCHDOG_FAIL_S", FAIL_S),
                   interval_s=_setting("QUANTUMFLOW_WATCHDOG_INTERVAL_S", INTERVAL_S)))


if __name__ == "__main__":
    main(sys.argv[1:])
