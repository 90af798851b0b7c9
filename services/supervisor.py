"""`qf up`: every service as a supervised OS process, with a live status line.

Restarts a service that dies (exponential backoff, reset after a healthy
minute, and says so), except one that exits with status 2: it says it cannot
start (a bad setting, a read-only or unusable database or directory, a damaged
journal; a lock-step replay that got stuck), which no restart fixes, so `qf up`
prints its line, stops everything and exits 2. Stops all cleanly on
Ctrl-C/SIGTERM. The same `Stack` drives the end-to-end tests and the
benchmarks, so what they measure is what a user runs. `qf up --lockstep`
gives the services `lockstep_env` (shared/lockstep.py)."""
from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
import time
import zoneinfo
from datetime import datetime, timedelta, timezone, tzinfo
from decimal import Decimal, InvalidOperation
from typing import Callable, Mapping

import zmq

from shared import curve
from shared.bus import Subscriber
from shared.config import SECTIONS, Config, bind_conflict, bind_endpoints, endpoints, load, mask_secrets, symbol_groups
from shared.errors import ConfigError, DecodeError
from shared.runtime import kind_of
from shared.shabbat import place

# Binding sides first; marketdata last so subscribers are connected when data flows.
SERVICES = ("broker", "risk", "api", "strategy", "notifier", "marketdata")
RESTART_BASE_S, RESTART_CAP_S, HEALTHY_AFTER_S = 0.5, 30.0, 60.0
CANNOT_START = 2  # a service's exit status for a problem only a person can fix (ConfigError, StorageError)
# `qf up --lockstep`: the conductor holds the capture's time still while the services work, so a
# service's wall-time wait for another must outlast any turn of the replay (the bounds of
# shared/config.py), and a strategy must not resend an order risk is still deciding.
LOCKSTEP_WAITS = {"QF_RISK_BROKER_TIMEOUT_MS": "60000", "QF_STRATEGY_TIMEOUT_MS": "60000", "QF_STRATEGY_RETRIES": "1"}
IPC_PATH_MAX = 100  # an ipc:// path longer than this (sun_path holds 107 bytes) goes over tcp instead


class Child:
    """One service process and its restart bookkeeping."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        self.name, self.argv, self.env = name, argv, env
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0
        self.failures = 0
        self.restart_at: float | None = None
        self.restarts = 0
        self.gave_up = False  # exited with CANNOT_START: not restarted
        self.pump: threading.Thread | None = None
        self.tail: collections.deque[str] = collections.deque(maxlen=300)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


SPLIT = ("marketdata", "strategy")  # the services QF_SYMBOLS groups run once per group
PORT_STEP = 10  # group i's derived tcp ports and metrics ports: the first group's + 10·i


def _shifted(endpoint: str, i: int) -> str:
    """Group `i`'s endpoint derived from the first group's: a tcp port + PORT_STEP·i, an ipc
    path with `-{i+1}` before its extension."""
    if i == 0:
        return endpoint
    if endpoint.startswith("tcp://"):
        host, _, port = endpoint.rpartition(":")
        return f"{host}:{int(port) + PORT_STEP * i}"
    if endpoint.startswith("ipc://"):
        root, ext = os.path.splitext(endpoint)
        return f"{root}-{i + 1}{ext}"
    raise ConfigError(f"{endpoint}: symbol groups run in separate processes, which reach each other over "
                      f"tcp:// or ipc:// only")


def _group_endpoints(setting: str, value: str, n: int) -> list[str]:
    given = endpoints(value)
    if len(given) == n:
        return list(given)
    if len(given) == 1:
        return [_shifted(given[0], i) for i in range(n)]
    raise ConfigError(f"{setting} lists {len(given)} endpoints for {n} QF_SYMBOLS groups: give one (the "
                      f"others are derived from it) or one per group")


def _metrics_bind(bind: str, i: int) -> str:
    host, _, port = bind.rpartition(":")
    return bind if not bind or i == 0 or port == "0" else f"{host}:{int(port) + PORT_STEP * i}"


def _group_buses(cfg: Config, env: Mapping[str, str]) -> tuple[tuple, list[str], list[str]]:
    """(QF_SYMBOLS groups, marketdata PUB endpoint of each, strategy PUB endpoint of each)."""
    groups = symbol_groups(env.get("QF_SYMBOLS", "btcusdt"))
    if len(groups) == 1:
        return groups, list(endpoints(cfg.bus.md_pub)), list(endpoints(cfg.bus.strategy_pub))
    if cfg.bus.lockstep:
        raise ConfigError("QF_SYMBOLS: a lock-step replay runs one marketdata process; its symbols cannot "
                          "be split into ';' groups")
    return (groups, _group_endpoints("QF_MD_PUB", cfg.bus.md_pub, len(groups)),
            _group_endpoints("QF_STRATEGY_PUB", cfg.bus.strategy_pub, len(groups)))


def listener_env(cfg: Config, env: Mapping[str, str]) -> dict[str, str]:
    """`env` as the processes that hear every group get it (risk, the broker, the API, the
    notifier, `qf up`'s status line): QF_MD_PUB and QF_STRATEGY_PUB list every group's."""
    _, md, st = _group_buses(cfg, env)
    return {**env, "QF_MD_PUB": ",".join(md), "QF_STRATEGY_PUB": ",".join(st)}


def processes(cfg: Config, env: Mapping[str, str], services: tuple[str, ...] = SERVICES
              ) -> list[tuple[str, str, dict[str, str]]]:
    """(name, service, environment) of each process `qf up` runs for `services` under `env`
    (whose config is `cfg`). QF_SYMBOLS groups (`a,b;c`) give marketdata and the strategy one
    process per group (`marketdata.1`, `strategy.1`, ...: QF_INSTANCE), each with its group's
    symbols and its own PUB endpoint (listed in QF_MD_PUB / QF_STRATEGY_PUB, or derived from
    the one given: a tcp port + 10 per group, an ipc path with `-2`, `-3`); a strategy hears its
    group's marketdata only, and risk, the broker, the API and the notifier hear them all.
    Raises ConfigError for a grouping these settings cannot serve."""
    groups, md, st = _group_buses(cfg, env)
    if len(groups) == 1:
        return [(s, s, dict(env)) for s in services]
    _check_group_binds(cfg, md, st)
    common = listener_env(cfg, env)
    out = []
    for service in services:
        if service not in SPLIT:
            out.append((service, service, common))
            continue
        for i, group in enumerate(groups):
            own = {**common, "QF_SYMBOLS": ",".join(s.lower() for s in group), "QF_INSTANCE": str(i + 1),
                   "QF_MD_PUB": md[i], "QF_STRATEGY_PUB": st[i],
                   "QF_MD_METRICS_BIND": _metrics_bind(cfg.md.metrics_bind, i),
                   "QF_STRATEGY_METRICS_BIND": _metrics_bind(cfg.strategy.metrics_bind, i)}
            if cfg.md.record:
                root, ext = cfg.md.record.split(".jsonl", 1)
                own["QF_MD_RECORD"] = f"{root}-{i + 1}.jsonl{ext}"
            out.append((f"{service}.{i + 1}", service, own))
    return out


def _check_group_binds(cfg: Config, md: list[str], st: list[str]) -> None:
    """Raises ConfigError when an address derived for a group (its PUB endpoints, its metrics
    ports: PORT_STEP apart) is one another process binds too (shared.config.bind_conflict)."""
    split = ("QF_MD_PUB", "QF_STRATEGY_PUB", "QF_MD_METRICS_BIND", "QF_STRATEGY_METRICS_BIND")
    binds = [(var, e) for var, e in bind_endpoints({name: getattr(cfg, name) for name in SECTIONS})
             if var not in split]
    for i in range(len(md)):
        group = f" (group {i + 1})"
        binds += [("QF_MD_PUB" + group, md[i]), ("QF_STRATEGY_PUB" + group, st[i])]
        binds += [(var + group, _metrics_bind(bind, i)) for var, bind in
                  (("QF_MD_METRICS_BIND", cfg.md.metrics_bind), ("QF_STRATEGY_METRICS_BIND", cfg.strategy.metrics_bind))
                  if bind]
    problem = bind_conflict(binds)
    if problem:
        raise ConfigError(f"QF_SYMBOLS groups: {problem}")


class Stack:
    """Starts, watches, restarts and stops the service processes (`processes`)."""

    def __init__(self, env: Mapping[str, str], services: tuple[str, ...] = SERVICES,
                 on_line: Callable[[str, str], None] | None = None,
                 on_event: Callable[[str], None] | None = None, restart: bool = True) -> None:
        # ConfigError: the grouping cannot be served (a bad setting reaches the services first)
        plan = processes(load(env), env, services) if ";" in env.get("QF_SYMBOLS", "") else \
            [(s, s, env) for s in services]
        self.children = [Child(name, [sys.executable, "-m", "services.cli", service], dict(own))
                         for name, service, own in plan]
        self.on_line = on_line or (lambda name, line: None)
        self.on_event = on_event or (lambda text: None)
        self.restart = restart
        self.stopping = False
        self._threads: list[threading.Thread] = []

    def child(self, name: str) -> Child:
        return next(c for c in self.children if c.name == name)

    def _spawn(self, c: Child) -> None:
        c.proc = subprocess.Popen(c.argv, env=c.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, bufsize=1, text=True, errors="replace")
        c.started_at = time.monotonic()
        c.restart_at = None
        t = threading.Thread(target=self._pump, args=(c, c.proc), daemon=True, name=f"out-{c.name}")
        t.start()
        c.pump = t
        self._threads.append(t)

    def _pump(self, c: Child, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            line = mask_secrets(line.rstrip("\n"))  # also what a service printed without our logging
            c.tail.append(line)
            self.on_line(c.name, line)
        proc.stdout.close()

    def start(self) -> None:
        for c in self.children:
            self._spawn(c)

    def poll(self, now: float | None = None) -> None:
        """Notice exits and restart what is due. Call it from the owner's loop."""
        now = time.monotonic() if now is None else now
        for c in self.children:
            if c.proc is None or self.stopping:
                continue
            code = c.proc.poll()
            if c.gave_up:
                continue
            if code is not None and c.restart_at is None:
                if not self.restart:
                    continue
                if code == CANNOT_START:
                    c.gave_up = True
                    self.on_event(f"{c.name} cannot start (exit status 2): {self.last_words(c)}; not restarting it")
                    continue
                ran = now - c.started_at
                c.failures = 0 if ran >= HEALTHY_AFTER_S else c.failures + 1
                delay = min(RESTART_CAP_S, RESTART_BASE_S * 2 ** max(0, c.failures - 1))
                c.restart_at = now + delay
                self.on_event(f"{c.name} exited with code {code} after {ran:.1f}s; restarting in {delay:.1f}s")
            elif code is not None and now >= c.restart_at:
                c.restarts += 1
                self.on_event(f"restarting {c.name} (restart #{c.restarts})")
                self._spawn(c)

    def last_words(self, c: Child) -> str:
        """The last line `c` printed (its error, when it exited): read once its output is drained."""
        if c.pump is not None:
            c.pump.join(timeout=2)
        return next((line for line in reversed(c.tail) if line.strip()), "(no output)")

    @property
    def failed(self) -> list[str]:
        """Services that exited with status 2 and are not restarted."""
        return [c.name for c in self.children if c.gave_up]

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        c = self.child(name)
        if c.running:
            c.proc.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> dict[str, int | None]:
        """SIGTERM every process (reverse start order), SIGKILL what is left after
        `timeout`; returns exit codes."""
        self.stopping = True
        for c in reversed(self.children):
            if c.running:
                c.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for c in reversed(self.children):
            if c.proc is None:
                continue
            try:
                c.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.on_event(f"{c.name} did not stop within {timeout:.0f}s; killing it")
                c.proc.kill()
                c.proc.wait(5)
        for t in self._threads:
            t.join(timeout=2)
        return {c.name: (c.proc.returncode if c.proc else None) for c in self.children}

    @property
    def up(self) -> int:
        return sum(c.running for c in self.children)


PAUSE_AHEAD = timedelta(hours=24)  # the status line names the next Shabbat or Yom Tov pause this far ahead


def _pause_time(iso: object, zone: tzinfo | None) -> datetime:
    """A pause's ISO-8601 time (with its offset) in `zone` when that zone agrees on the offset,
    else at its own offset. Raises ValueError or TypeError for anything else."""
    t = datetime.fromisoformat(iso)  # TypeError for a non-string
    if t.tzinfo is None:
        raise ValueError(f"{iso!r} has no UTC offset")
    if zone is not None and (local := t.astimezone(zone)).utcoffset() == t.utcoffset():
        return local
    return t


def _hhmm(t: datetime) -> str:
    return t.strftime("%a %H:%M %Z")  # Sat 17:16 IST (a bare offset reads UTC+02:00)


def risk_text(risk: Mapping, now_ns: int, zone: tzinfo | None = None) -> str:
    """The status line's risk part: risk's state in force and, when its heartbeat carries a
    `pause` ({"phase", "start", "end", "kind", "name"}), the Shabbat or Yom Tov pause: its end
    while paused, its start while flattening, or its start when it comes within PAUSE_AHEAD.
    Times in `zone` (the pauses' place). A pause it cannot read is left out."""
    state = risk.get("state", "-")
    text = f"risk {state}"
    pause = risk.get("pause")
    if not isinstance(pause, Mapping):
        return text
    try:
        start, end = _pause_time(pause["start"], zone), _pause_time(pause["end"], zone)
    except (KeyError, TypeError, ValueError):
        return text
    name, phase = str(pause.get("name") or "the pause")[:60], pause.get("phase")
    if phase == "paused":  # a HALT outranks a pause: risk stays HALTED after it
        return f"{text} until {_hhmm(end)} ({name})" if state == "PAUSED_SHABBAT" else \
            f"{text}; {name} until {_hhmm(end)}"
    if phase == "flatten":
        return f"{text}: {name} at {_hhmm(start)}, flattening" if state == "REDUCING" else \
            f"{text}; {name} at {_hhmm(start)}"
    now = datetime.fromtimestamp(now_ns / 1e9, timezone.utc)
    if phase == "" and timedelta(0) <= start - now <= PAUSE_AHEAD:
        return f"{text} | next pause {_hhmm(start)}"
    return text


class StatusMonitor:
    """Listens to the heartbeats on the PUB sockets and summarises them. `clock` (ns since the
    epoch) tells how near risk's next pause is."""

    def __init__(self, cfg: Config, clock: Callable[[], int] = time.time_ns) -> None:
        keys = curve.load(cfg, "api")  # the operator's view: it listens as the API does (shared/curve.py)
        self.subs = [Subscriber(ep, ["heartbeat."], 1000, curve=keys) for ep in
                     (cfg.bus.md_pub, cfg.bus.broker_pub, cfg.bus.risk_pub, cfg.bus.strategy_pub)]
        self.lockstep = bool(cfg.bus.lockstep)
        self.stats: dict[str, dict] = {}
        self.status: dict[str, str] = {}
        self._rate_ref: tuple[float, int] | None = None
        self.book_rate = 0.0
        self.clock = clock
        self.zone = zoneinfo.ZoneInfo(place(cfg.shabbat.location).tz)  # the pauses' local time

    def drain(self) -> None:
        for sub in self.subs:
            while True:
                try:
                    _, msg = sub.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                except DecodeError:
                    continue
                self.stats[msg.service] = msg.stats or {}
                self.status[msg.service] = msg.status
        counts = [s.get("book_events") for name, s in self.stats.items() if kind_of(name) == "marketdata"]
        events = sum(counts) if counts and all(isinstance(n, int) for n in counts) else None
        if isinstance(events, int):
            now = time.monotonic()
            if self._rate_ref and now - self._rate_ref[0] >= 1.0:
                self.book_rate = (events - self._rate_ref[1]) / (now - self._rate_ref[0])
                self._rate_ref = (now, events)
            elif self._rate_ref is None or events < self._rate_ref[1]:
                self._rate_ref = (now, events)

    def line(self, up: int, total: int) -> str:
        broker, risk = self.stats.get("broker", {}), self.stats.get("risk", {})
        feeds = {name: st for name, st in sorted(self.status.items()) if kind_of(name) == "marketdata"}
        if not feeds:
            md = "no heartbeat yet"
        elif len(set(feeds.values())) == 1:  # one process, or all of them saying the same
            md = next(iter(feeds.values())) + (f" ({len(feeds)} processes)" if len(feeds) > 1 else "")
        else:
            md = ", ".join(f"{name} {st}" for name, st in feeds.items())
        equity = risk.get("equity", broker.get("equity"))
        try:
            equity = f"{Decimal(str(equity)).quantize(Decimal('0.01')):,}"
        except (InvalidOperation, ValueError):
            equity = "-"
        # a service that is up but not well (the broker on a full disk, say) says so here, not only in its log
        trouble = [f"{name} {st}" for name, st in sorted(self.status.items())
                   if kind_of(name) != "marketdata" and st != "ok"]
        services = f"services {up}/{total} up" + (f" ({', '.join(trouble)})" if trouble else "")
        feed = f"lock-step replay {md}" if self.lockstep else md
        # the OFI strategy counts its signals; the imbalance one has none
        counted = [s["signals"] for name, s in self.stats.items() if kind_of(name) == "strategy" and "signals" in s]
        signals = f" | signals {sum(counted)}" if counted and all(isinstance(n, int) for n in counted) else ""
        return (f"{services} | feed {feed} | book {self.book_rate:.1f}/s | "
                f"orders {broker.get('orders', '-')} | fills {broker.get('fills', '-')}{signals} | "
                f"equity {equity} | {risk_text(risk, self.clock(), self.zone)}")

    def close(self) -> None:
        for s in self.subs:
            s.close()


def run_up(cfg: Config, env: Mapping[str, str], out=None) -> int:
    """The `qf up` loop: start the stack, show status, stop on a signal (returns 0) or when a
    service cannot start (returns 2)."""
    out = out or sys.stdout
    tty = out.isatty()
    lock = threading.Lock()
    status = {"line": ""}

    def emit(text: str) -> None:
        text = mask_secrets(text)
        with lock:
            if tty:
                out.write("\r\x1b[K" + text + "\n" + status["line"])
            else:
                out.write(text + "\n")
            out.flush()

    # The handler only appends to a list. A threading.Event would be wrong here: Event.set()
    # takes the lock that the main thread holds for a moment inside Event.wait(), and a second
    # signal landing then (a second Ctrl-C, one forwarded by `timeout`) deadlocked `qf up`
    # for good, its children stopped and never reaped.
    stopping: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: stopping.append(signum))
    mode = f"lock-step replay of {cfg.md.feed.path}: each event once the services are done with the last" \
        if cfg.bus.lockstep else f"feed {cfg.md.feed}"
    width = [10]  # the name column: as wide as the longest process name (`marketdata.2`)
    try:
        stack = Stack(env, on_line=lambda n, l: emit(f"{n:<{width[0]}} | {l}"),
                      on_event=lambda t: emit(f"{'qf up':<{width[0]}} | {t}"))
        width[0] = max(10, *(len(c.name) for c in stack.children))
        emit(f"{'qf up':<10} | starting {', '.join(c.name for c in stack.children)} ({mode}); "
             f"Ctrl-C stops everything")
        if cfg.bus.curve_keys:  # every party runs here: a missing key is told once, before anything starts
            for party in curve.PARTIES:
                curve.load(cfg, party)
        monitor = StatusMonitor(load(listener_env(cfg, env)))
    except ConfigError as exc:
        emit(f"{'qf up':<10} | {exc}")
        return CANNOT_START
    stack.start()
    last_plain = 0.0
    code = 0
    try:
        while not stopping:
            time.sleep(0.2)  # a signal's handler runs at once; the loop notices within 0.2 s
            if stopping:  # Ctrl-C at a terminal stops the services too: their exits are no crash
                break
            stack.poll()
            if stack.failed:  # restarting would fail the same way, and the stack is no use without it
                emit(f"{'qf up':<10} | {', '.join(stack.failed)} cannot start; fix the line above and run qf up again")
                code = CANNOT_START
                break
            monitor.drain()
            line = monitor.line(stack.up, len(stack.children))
            with lock:
                status["line"] = line
                if tty:
                    out.write("\r\x1b[K" + line)
                    out.flush()
            if not tty and time.monotonic() - last_plain >= 10:
                last_plain = time.monotonic()
                emit(f"{'qf up':<10} | status {line}")
    finally:
        emit(f"{'qf up':<10} | stopping")
        codes = stack.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):  # stopped: a signal during interpreter shutdown must not
            signal.signal(sig, signal.SIG_IGN)  # turn the clean stop into a -2 (as in `qf <service>`)
        monitor.close()
        emit(f"{'qf up':<10} | stopped: " + ", ".join(f"{k}={v}" for k, v in codes.items()))
    return code


def child_env(base: Mapping[str, str] | None = None, **overrides: str) -> dict[str, str]:
    """The environment for service processes: `base` (default os.environ) plus overrides."""
    env = dict(os.environ if base is None else base)
    env.update(overrides)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def lockstep_env(cfg: Config, env: Mapping[str, str]) -> dict[str, str]:
    """What `qf up --lockstep` adds to the services' environment `env` (whose config is `cfg`):
    QF_LOCKSTEP (the conductor's endpoint, `ipc://<run dir>/lockstep.sock`, or a free loopback
    port when that path is too long for a socket), QF_REPLAY_SPEED=0 (the conductor paces
    nothing) and LOCKSTEP_WAITS; QF_LOCKSTEP and the waits stay as the user set them, if set."""
    out = {"QF_REPLAY_SPEED": "0"}
    if not env.get("QF_LOCKSTEP", "").strip():
        out["QF_LOCKSTEP"] = lockstep_endpoint(cfg.common.run_dir)
    for name, value in LOCKSTEP_WAITS.items():
        if name not in env:
            out[name] = value
    return out


def lockstep_endpoint(run_dir: str) -> str:
    """`ipc://<run_dir>/lockstep.sock` (absolute), or `tcp://127.0.0.1:<free port>` when that
    path is too long for a Unix socket."""
    path = os.path.join(os.path.abspath(run_dir), "lockstep.sock")
    if len(path.encode()) <= IPC_PATH_MAX:
        return f"ipc://{path}"
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"
