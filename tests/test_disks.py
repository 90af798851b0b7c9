"""Real disks that fill up or are read-only (a tmpfs per test): services stay up or say why in one line."""
from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
import threading
import time
from decimal import Decimal as D

import pytest
import zmq

from services.marketdata.record import Recorder
from services.marketdata.sync import Market
from services.supervisor import Stack, StatusMonitor
from shared import messages
from shared.bus import Publisher, Subscriber
from shared.config import load
from shared.enums import OrderKind, Side
from shared.journal import journal_path
from shared.runtime import Liveness
from shared.messages import Ack, Alert, Book, Decision, Error, Heartbeat, OrderRequest
from tests.conftest import ROOT, SPOT_CAPTURE, clean_environ, journal_stored, tcp_env, wait_for

WAIT_S = 20.0  # bound of a wait on a process (start-up imports take ~1 s on a busy machine)
ANSWER_S = 1.0  # bound of every answer while the disk is full: refused at once, never left to time out
RECOVER_S = 5.0  # bound from space returning to the broker filling orders again (its probe backs off to 1 s)
RISK = {"QF_SYMBOLS": "btcusdt", "QF_HEARTBEAT_MS": "100", "QF_START_CASH": "100000", "QF_RISK_LOT_SIZE": "0.001",
        "QF_RISK_TICK_SIZE": "0.25", "QF_RISK_MIN_NOTIONAL": "0", "QF_RISK_ORDERS_PER_S": "1000",
        "QF_RISK_ORDERS_PER_MIN": "60000", "QF_RISK_STALE_BOOK_MS": "60000", "QF_RISK_MAX_POSITION": "100",
        "QF_RISK_MAX_NOTIONAL": "1000000", "QF_RISK_MAX_ORDER_NOTIONAL": "1000000",
        "QF_BROKER_LATENCY_MODE": "constant", "QF_BROKER_LATENCY_MS": "0"}


def book(n: int) -> Book:
    return Book(ts=time.time_ns(), symbol="BTCUSDT", exch_ts=n, update_id=n, bids=[[99.75, 50.0]],
                asks=[[100.25, 50.0]], mid=100.0, spread=0.5, spread_bps=50.0, imbalance=0.0, microprice=100.0,
                recv_ts=time.time_ns())


def order(coid: str, qty: str = "0.01") -> OrderRequest:
    return OrderRequest(ts=time.time_ns(), client_order_id=coid, strategy="disk", symbol="BTCUSDT", side=Side.BUY,
                        kind=OrderKind.MARKET, qty=D(qty))


def ask(endpoint: str, msg, timeout_s: float = ANSWER_S):
    """One request on a fresh REQ socket: the decoded answer and how long it took, or (None, timeout)."""
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        started = time.perf_counter()
        sock.send(messages.encode(msg))
        if not sock.poll(int(timeout_s * 1000)):
            return None, timeout_s
        return messages.decode(sock.recv(), messages.REQUESTS), time.perf_counter() - started
    finally:
        sock.close(linger=0)


class Books(threading.Thread):
    """The test's marketdata: one BTCUSDT book every 20 ms."""

    def __init__(self, endpoint: str) -> None:
        super().__init__(daemon=True, name="md")
        self.endpoint, self.stop = endpoint, threading.Event()

    def run(self) -> None:
        pub, n = Publisher(self.endpoint, 1000), 0
        try:
            while not self.stop.wait(0.02):  # pacing of a feed, not synchronisation
                n += 1
                pub.publish("book.BTCUSDT", book(n))
        finally:
            pub.close()


class Listener(threading.Thread):
    """Every alert of the broker and risk, and the broker's latest heartbeat."""

    def __init__(self, *endpoints: str) -> None:
        super().__init__(daemon=True, name="listener")
        self.subs = [Subscriber(ep, ["alert.", "heartbeat."], 10_000) for ep in endpoints]
        self.alerts: list[Alert] = []
        self.beat: Heartbeat | None = None  # the broker's latest
        self.beats: set[str] = set()  # services heard from: their alerts cannot be missed any more
        self.stop = threading.Event()

    def run(self) -> None:
        poller = zmq.Poller()
        for s in self.subs:
            poller.register(s.sock, zmq.POLLIN)
        try:
            while not self.stop.is_set():
                for sock, _ in poller.poll(50):
                    sub = next(s for s in self.subs if s.sock is sock)
                    msg = sub.recv()[1]
                    if isinstance(msg, Alert):
                        self.alerts.append(msg)
                    elif isinstance(msg, Heartbeat):
                        self.beats.add(msg.service)
                        if msg.service == "broker":
                            self.beat = msg
        finally:
            for s in self.subs:
                s.close()

    def of(self, service: str, code: str) -> list[str]:
        return [a.severity for a in list(self.alerts) if a.service == service and a.code == code]


def fill_to_the_last_byte(disk, db: str) -> None:
    """Fill `disk` with the database's WAL and the broker's journal empty: SQLite would otherwise
    write small transactions into WAL pages it already has (and the journal records into the
    page it has), so a full disk would not stop them. A write between the checkpoint and the
    filler grows the WAL again: then once more."""
    def sealed() -> bool:
        journal_stored(db)
        con = sqlite3.connect(db, timeout=5)
        try:
            wait_for(lambda: con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0, 10,
                     "a WAL checkpoint with no reader in the way")
        finally:
            con.close()
        disk.fill()
        return os.path.getsize(db + "-wal") == 0 and os.path.getsize(journal_path(db, "")) == 0
    wait_for(sealed, 30, "a full disk with an empty WAL and journal")


@pytest.mark.timeout(240)
def test_a_full_disk_keeps_broker_and_risk_up_refusing_new_orders_until_space_returns(tmp_path, small_disk):
    settings = tcp_env(tmp_path, QF_DB=str(small_disk.path / "qf.db"), QF_RUN_DIR=str(small_disk.path / "run"),
                       **RISK)
    cfg = load(settings)
    env = {**clean_environ(), **settings, "PYTHONUNBUFFERED": "1"}
    md, listener = Books(cfg.bus.md_pub), Listener(cfg.bus.broker_pub, cfg.bus.risk_pub)
    md.start()
    listener.start()
    events: list[str] = []
    stack = Stack(env, services=("broker", "risk"), on_event=events.append)  # what `qf up` runs: restarts on exit
    monitor = StatusMonitor(cfg)  # `qf up`'s status line

    def status_line() -> str:
        monitor.drain()
        return monitor.line(stack.up, len(stack.children))
    broker_ep, risk_ep = cfg.bus.broker_rep, cfg.bus.risk_rep
    told: dict[str, dict] = {}  # every fill an ack told of, by fill_id
    untold: set[str] = set()  # orders sent to be filled whose answer said no fill (or came after ANSWER_S)
    refused: list[str] = []
    try:
        stack.start()

        def filled(coid: str, endpoint: str = broker_ep):
            """The answer to a new order when it filled (its fills noted as told), else None."""
            stack.poll()
            reply, _ = ask(endpoint, order(coid))
            if isinstance(reply, Decision):  # through risk: the broker's ack inside
                status, fills = (reply.order.status.value, reply.order.fills) if reply.order else (None, ())
            elif isinstance(reply, Ack):
                status, fills = reply.status.value, reply.fills
            else:
                status = None
            if status != "FILLED":
                untold.add(coid)
                return None
            told.update((f.fill_id, f.to_wire()) for f in fills)
            return reply

        # a new id each try: an order sent before the broker has a book is REJECTED NO_BOOK, and
        # a repeat of its id gets that answer again (never a second order)
        warm = iter(range(1_000_000))
        kept = wait_for(lambda: filled(f"warm-{next(warm)}"), WAIT_S, "the broker to fill an order")
        for i in range(5):
            assert filled(f"before-{i}"), i
        assert wait_for(lambda: filled(f"via-risk-{next(warm)}", risk_ep), WAIT_S,
                        "risk to approve an order the broker fills")
        pids = {c.name: c.proc.pid for c in stack.children}
        wait_for(lambda: listener.beat is not None and listener.beat.stats["store"] == "ok", WAIT_S, "a heartbeat")
        # the listener hears both PUBs (a SUB connects a while after the PUB binds): no alert can be missed
        wait_for(lambda: listener.beats >= {"broker", "risk"}, WAIT_S, "heartbeats from broker and risk")

        fill_to_the_last_byte(small_disk, cfg.common.db)

        # full: every new order is refused at once with the typed reason; nothing executes
        first, first_s = ask(broker_ep, order("full-0"))
        assert isinstance(first, Error) and first.code == "STORE_UNAVAILABLE", first
        refused.append("full-0")
        slowest = first_s
        for i in range(1, 21):
            reply, took = ask(broker_ep, order(f"full-{i}"))
            assert isinstance(reply, Error) and reply.code == "STORE_UNAVAILABLE", (i, reply)
            refused.append(f"full-{i}")
            slowest = max(slowest, took)
        # repeats: a known order gets its answer (from the cache), a refused one is refused again
        again, _ = ask(broker_ep, order(kept.client_order_id))
        assert isinstance(again, Ack) and (again.order_id, again.fills) == (kept.order_id, kept.fills)
        again, _ = ask(broker_ep, order("full-0"))
        assert isinstance(again, Error) and again.code == "STORE_UNAVAILABLE"
        # risk keeps deciding (fail closed: the broker said no), its denial row cannot be written
        decision, took = ask(risk_ep, order("risk-full"))
        assert isinstance(decision, Decision) and decision.verdict.value == "REJECTED", decision
        refused.append("risk-full")
        wait_for(lambda: listener.beat.stats["store"] == "frozen", WAIT_S, "the heartbeat to show the outage")
        wait_for(lambda: status_line().startswith("services 2/2 up (broker store_unavailable) |"), WAIT_S,
                 "qf up's status line to show the outage")
        wait_for(lambda: listener.of("broker", "STORE_UNAVAILABLE") == ["error"], WAIT_S, "the broker's alert")
        wait_for(lambda: listener.of("risk", "STORE_UNAVAILABLE") == ["error"], WAIT_S, "risk's alert")
        for alert in listener.alerts:  # the alerts name the real problem (not the failed rollback after it)
            if alert.code == "STORE_UNAVAILABLE":
                assert "full" in alert.text or "no space left" in alert.text, alert.text
        stack.poll()
        assert all(c.running for c in stack.children) and {c.name: c.proc.pid for c in stack.children} == pids

        # space returns: the broker finds it by itself and fills again
        small_disk.free()
        freed = time.monotonic()
        n = iter(range(1_000_000))
        wait_for(lambda: filled(f"after-{next(n)}"), RECOVER_S + ANSWER_S, "the broker to fill orders again")
        recovered_s = time.monotonic() - freed
        assert recovered_s <= RECOVER_S + ANSWER_S
        assert wait_for(lambda: filled(f"risk-after-{next(n)}", risk_ep), WAIT_S, "risk to approve again")
        wait_for(lambda: listener.of("broker", "STORE_UNAVAILABLE") == ["error", "resolved"], WAIT_S,
                 "the broker's alert resolved")
        wait_for(lambda: listener.of("risk", "STORE_UNAVAILABLE") == ["error", "resolved"], WAIT_S,
                 "risk's alert resolved")
        wait_for(lambda: status_line().startswith("services 2/2 up |"), WAIT_S, "qf up's status line to clear")
        stack.poll()
        assert {c.name: c.proc.pid for c in stack.children} == pids and not any("exited" in e for e in events)
        assert stack.child("broker").restarts == stack.child("risk").restarts == 0
        for alert in listener.alerts:
            print(f"\nalert.{alert.service} {alert.severity} {alert.code}: {alert.text}")
        print(f"\nfirst STORE_UNAVAILABLE after {first_s * 1e3:.1f} ms, slowest {slowest * 1e3:.1f} ms; "
              f"orders filled again {recovered_s:.2f} s after space returned")
    except BaseException:
        for c in stack.children:
            print(f"--- {c.name} (last lines)\n" + "\n".join(list(c.tail)[-40:]))
        raise
    finally:
        codes = stack.stop()
        monitor.close()
        md.stop.set()
        listener.stop.set()
        md.join(5)
        listener.join(5)
    assert codes == {"broker": 0, "risk": 0}, (codes, list(stack.child("broker").tail)[-20:])
    # every fill an ack told of is stored exactly once, as told; nothing of a refused order is. A
    # fill no ack told of may be stored only for an order whose answer the test did not see fill
    # (an answer later than ANSWER_S on a busy machine, given up by the test, not by the broker)
    assert os.path.getsize(journal_path(cfg.common.db, cfg.common.run_dir)) == 0
    con = sqlite3.connect(cfg.common.db)
    try:
        rows = con.execute("SELECT fill_id, client_order_id, price, qty FROM fills").fetchall()
        assert len(rows) == len({r[0] for r in rows})
        assert {r[0]: (r[2], r[3]) for r in rows if r[0] in told} == {k: (f["price"], f["qty"]) for k, f in told.items()}
        assert all(r[1] in untold for r in rows if r[0] not in told), [r for r in rows if r[0] not in told]
        marks = ",".join("?" * len(refused))
        assert con.execute(f"SELECT COUNT(*) FROM orders WHERE client_order_id IN ({marks})", refused).fetchone() \
            == (0,)
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        con.close()


# -- starting on a disk that cannot be used ------------------------------------------------------------


def start(service: str, settings: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", service, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**clean_environ(), **settings, "PYTHONPATH": ROOT})


def one_line(proc: subprocess.CompletedProcess, *words: str) -> str:
    """The process exited 2 with exactly one line on stderr, naming what `words` say, and no traceback."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert len(lines) == 1 and "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-2000:]
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


@pytest.mark.parametrize("service", ["broker", "risk"])
def test_starting_on_a_read_only_database_directory_says_so_in_one_line(tmp_path, small_disk, service):
    db = small_disk.path / "qf.db"
    settings = tcp_env(tmp_path, QF_DB=str(db))
    small_disk.read_only()
    line = one_line(start(service, settings), f"qf {service}: cannot write {small_disk.path}/", "read-only file system")
    assert str(db) in line  # the database or its journal beside it


@pytest.mark.parametrize("service", ["broker", "risk", "strategy", "marketdata"])
def test_starting_with_a_read_only_run_dir_says_so_in_one_line(tmp_path, small_disk, service):
    settings = tcp_env(tmp_path, QF_RUN_DIR=str(small_disk.path / "run"), QF_FEED=f"replay:{SPOT_CAPTURE}")
    small_disk.read_only()
    one_line(start(service, settings), f"qf {service}: ", str(small_disk.path / "run"), "read-only file system")


def test_recording_into_a_read_only_directory_says_so_in_one_line(tmp_path, small_disk):
    settings = tcp_env(tmp_path, QF_FEED=f"replay:{SPOT_CAPTURE}", QF_MD_RECORD=str(small_disk.path / "cap.jsonl.gz"))
    small_disk.read_only()
    one_line(start("marketdata", settings), "qf marketdata: cannot write", str(small_disk.path),
             "read-only file system")


@pytest.mark.parametrize("service", ["broker", "risk"])
def test_a_database_path_that_cannot_be_used_says_so_in_one_line(tmp_path, small_disk, service):
    (tmp_path / "a-dir.db").mkdir()
    (tmp_path / "garbage.db").write_bytes(os.urandom(8192))
    (tmp_path / "ro").mkdir()
    one_line(start(service, tcp_env(tmp_path, QF_DB=str(tmp_path / "a-dir.db"))), str(tmp_path / "a-dir.db"),
             "it is a directory")
    one_line(start(service, tcp_env(tmp_path, QF_DB=str(tmp_path / "garbage.db"))), str(tmp_path / "garbage.db"),
             "not a SQLite database")
    small_disk.read_only()  # a directory that does not exist and cannot be made
    one_line(start(service, tcp_env(tmp_path, QF_DB=str(small_disk.path / "data" / "qf.db"))),
             f"cannot create directory {small_disk.path / 'data'}", "read-only file system")


@pytest.mark.timeout(120)
def test_qf_up_reports_a_service_that_cannot_start_and_stops_instead_of_restarting_it(tmp_path, small_disk):
    settings = tcp_env(tmp_path, QF_DB=str(small_disk.path / "qf.db"), QF_FEED=f"replay:{SPOT_CAPTURE}")
    small_disk.read_only()
    proc = subprocess.run([sys.executable, "-m", "services.cli", "up"], cwd=ROOT, capture_output=True, text=True,
                          timeout=90, env={**clean_environ(), **settings, "PYTHONPATH": ROOT, "PYTHONUNBUFFERED": "1"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    ours = "\n".join(line for line in out.splitlines() if line.startswith(("broker ", "risk ", "qf up ")))
    assert "Traceback" not in ours and "restarting broker" not in ours and "restarting risk" not in ours, out[-3000:]
    # broker and risk both fail; whichever is noticed first stops the stack
    said = re.findall(r"^qf up +\| (broker|risk) cannot start \(exit status 2\): (qf \1: cannot write (\S+): "
                      r"read-only file system); not restarting it$", out, re.M)
    assert said and "run qf up again" in out, out[-3000:]
    for name, line, path in said:
        assert f"{name:<10} | {line}" in out and path.startswith(str(small_disk.path / "qf.db")), out[-3000:]


# -- the recorder on a full disk ---------------------------------------------------------------------------


def test_a_full_disk_stops_the_recording_not_the_feed_and_recording_resumes(small_disk):
    now = [0.0]
    rec = Recorder(str(small_disk.path / "cap.jsonl"), clock=lambda: now[0])
    frame = b'{"stream":"btcusdt@aggTrade","data":{"e":"aggTrade","p":"1.0","q":"2.0"}}'
    rec.ws(1, frame, Market.SPOT)
    rec.tick(now[0] + 1)
    small_disk.fill()
    for i in range(2000):  # ~200 KB: more than the buffer, so the disk is asked
        rec.ws(i, frame, Market.SPOT)
        rec.tick(now[0])
    assert rec.failing == "no space left on device" and rec.dropped > 0
    small_disk.free()
    now[0] += 10  # past RETRY_S
    rec.ws(99, frame, Market.SPOT)
    assert rec.failing is None and len(rec.segments) == 2
    assert rec.tick(now[0]) is True  # the new segment asks for its own snapshots
    rec.close()
    with open(rec.segments[1], "rb") as f:
        assert f.read().count(b"\n") == 1


def test_a_liveness_file_the_disk_refuses_is_reported_never_raised(small_disk, caplog):
    live = Liveness(str(small_disk.path / "run"), "broker")
    assert live.touch() is True
    small_disk.read_only()  # as a disk with errors is remounted under a running service
    assert [live.touch() for _ in range(3)] == [False] * 3  # the loop that calls it goes on
    assert live.failing == "read-only file system" and live.failures == 3
    assert [r.message for r in caplog.records].count("liveness_touch_failed") == 1  # once, not every beat
    small_disk.read_write()
    assert live.touch() is True and live.failing is None
