"""`qf parity`: the matcher on hand-made rows (pure: rows in, report out), the command on real
databases, the broker's sessions row, and a free-running replay session of the real services
against the backtest of its capture — every order of both runs accounted for exactly once."""
from __future__ import annotations

import gzip
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from decimal import Decimal

import pytest

from services.backtest.pairing import ClockMap, FillView, Item, Run, compare
from services.backtest.parity import read_run
from shared import config as qfconfig
from tests.conftest import SPOT_CAPTURE, clean_environ, journal_stored, stop_process, tcp_env, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
TICKS = {"BTCUSDT": Decimal("0.01")}
WALL = 1_800_000_000_000_000_000  # the paper session's clock: far from the capture's
CAP = 1_723_161_250_000_000_000  # the capture's clock
MS = 1_000_000


def order(coid: str, ts: int, side: str = "BUY", exch: int | None = None, price: str = "100", qty: str = "0.001",
          latency_ms: int = 10, status: str = "FILLED", reason: str = "", mid: str = "100", denial: str = "",
          liquidity: str = "TAKER") -> Item:
    """An order as `read_run` gives it; `exch` (ms): one fill on the book of that exchange time."""
    fills = () if exch is None else (FillView(Decimal(price), Decimal(qty), Decimal(price) * Decimal(qty) / 1000,
                                              "USDT", liquidity, exch, ts + latency_ms * MS),)
    return Item("order", coid, "BTCUSDT", ts, order_id="o-" + coid, side=side, qty=Decimal(qty), status=status,
                reason=reason, arrival_ts=ts + latency_ms * MS, filled_qty=Decimal(qty if fills else "0"),
                avg_price=Decimal(price) if fills else None, decision_mid=Decimal(mid), arrival_mid=Decimal(mid),
                fills=fills, denial=denial)


def denied(coid: str, ts: int, code: str = "RATE_LIMIT") -> Item:
    return Item("denied", coid, "BTCUSDT", ts, reason=code, text="too many orders")


def ids(entries: list[dict], run: str) -> list[str]:
    return [e[run]["client_order_id"] for e in entries]


def accounted(report: dict, paper: list[str], backtest: list[str]) -> None:
    """Every paper and every backtest id is in the report exactly once (paired or alone)."""
    seen_p = ids(report["pairs"], "paper") + ids(report["paper_only"], "paper")
    seen_b = ids(report["pairs"], "backtest") + ids(report["backtest_only"], "backtest")
    assert sorted(seen_p) == sorted(paper), (seen_p, paper)
    assert sorted(seen_b) == sorted(backtest), (seen_b, backtest)


def run_of(items: list[Item], first: int | None = None, last: int | None = None) -> Run:
    items = sorted(items, key=lambda i: i.ts)
    return Run(items, first if first is not None else items[0].ts, last if last is not None else items[-1].ts)


# -- the matcher, on hand-made rows -----------------------------------------------------------------

def test_identical_runs_on_two_clocks_pair_by_fill_and_are_alike():
    hop = 2 * MS  # the paper order reached the broker 2 ms after its book: the strategy and risk hops
    paper = [order(f"p-{n}", WALL + n * 1_000 * MS + hop, "BUY" if n % 2 else "SELL", exch=1_723_161_000_000 + n * 1000)
             for n in range(1, 6)]
    backtest = [order(f"b-{n}", CAP + n * 1_000 * MS, "BUY" if n % 2 else "SELL", exch=1_723_161_000_000 + n * 1000)
                for n in range(1, 6)]
    report = compare(run_of(paper, WALL), run_of(backtest, CAP), TICKS, 1000 * MS)
    accounted(report, [i.client_order_id for i in paper], [i.client_order_id for i in backtest])
    assert [(p["paper"]["client_order_id"], p["backtest"]["client_order_id"], p["matched_by"]) for p in
            report["pairs"]] == [(f"p-{n}", f"b-{n}", "fill") for n in range(1, 6)]
    assert report["counts"] == {"paper_orders": 5, "paper_denied": 0, "backtest_orders": 5, "backtest_denied": 0,
                                     "matched": 5, "matched_by_fill": 5, "matched_by_time": 0, "alike": 5,
                                     "differ": 0, "paper_only": 0, "backtest_only": 0}
    assert report["clock"] == {"pairs": 5, "slope": 1.0, "offset_ns": WALL - CAP + hop}
    assert all(p["differences"] == [] and p["causes"] == [] and p["residual_ms"] == 0.0 for p in report["pairs"])
    assert report["first_difference_ts"] is None


def test_a_price_difference_is_counted_in_ticks_with_the_latency_and_the_book_behind_it():
    paper = [order("p-1", WALL, exch=1000, price="100"),
             order("p-2", WALL + 500 * MS, "SELL", exch=1500, price="100.02", latency_ms=35, mid="100.025")]
    backtest = [order("b-1", CAP, exch=1000, price="100"),
                order("b-2", CAP + 500 * MS, "SELL", exch=1500, price="100.05", mid="100.055")]
    report = compare(run_of(paper), run_of(backtest), TICKS, 1000 * MS)
    accounted(report, ["p-1", "p-2"], ["b-1", "b-2"])
    pair = report["pairs"][1]
    assert pair["differences"] == ["price", "fee"]
    assert pair["fills"]["price_diff_ticks"] == "-3"  # 100.02 - 100.05 in ticks of 0.01
    assert pair["fills"]["paper_cost_ticks"] == "3"  # a sell 3 ticks lower: paper did worse
    assert pair["latency_ms"] == {"paper": 35.0, "backtest": 10.0}
    causes = {c["code"]: c for c in pair["causes"]}
    assert causes["latency"]["paper_ms"] == 35.0 and causes["latency"]["backtest_ms"] == 10.0
    assert causes["arrival_book"]["paper_mid"] == "100.025" and causes["arrival_book"]["backtest_mid"] == "100.055"
    assert report["counts"]["differ"] == 1 and report["first_difference_ts"] == CAP + 500 * MS


def test_orders_without_fills_and_risk_denials_pair_by_aligned_time_and_say_why_they_differ():
    paper = [order("p-1", WALL, exch=1000), order("p-2", WALL + 2000 * MS, exch=3000),
             denied("p-3", WALL + 1000 * MS + 40 * MS, "MAX_POSITION"),
             order("p-4", WALL + 1500 * MS, "SELL", status="REJECTED", reason="NO_LIQUIDITY")]
    backtest = [order("b-1", CAP, exch=1000), order("b-2", CAP + 2000 * MS, exch=3000),
                order("b-3", CAP + 1000 * MS, exch=2010),  # filled here, denied by risk in paper
                order("b-4", CAP + 1500 * MS, "SELL", status="REJECTED", reason="NO_LIQUIDITY")]
    report = compare(run_of(paper), run_of(backtest), TICKS, 1000 * MS)
    accounted(report, ["p-1", "p-2", "p-3", "p-4"], ["b-1", "b-2", "b-3", "b-4"])
    by = {p["backtest"]["client_order_id"]: p for p in report["pairs"]}
    assert by["b-3"]["paper"]["client_order_id"] == "p-3" and by["b-3"]["matched_by"] == "time"
    assert by["b-3"]["differences"] == ["kind"]
    assert [(c["code"], c["run"], c["risk_code"]) for c in by["b-3"]["causes"]] == [
        ("risk_denied", "paper", "MAX_POSITION")]
    assert by["b-4"]["paper"]["client_order_id"] == "p-4" and by["b-4"]["differences"] == []
    assert report["counts"]["paper_denied"] == 1 and report["counts"]["matched_by_time"] == 2


def test_the_nearest_fill_wins_and_what_is_left_is_alone_with_its_nearest_counterpart():
    paper = [order("p-1", WALL + 100 * MS, exch=1100), order("p-2", WALL + 9000 * MS, exch=9000)]
    backtest = [order("b-1", CAP, exch=1000), order("b-2", CAP + 100 * MS, exch=1100),
                order("b-3", CAP + 9000 * MS, exch=9000)]
    report = compare(run_of(paper, WALL - 5000 * MS), run_of(backtest), TICKS, 1000 * MS)
    accounted(report, ["p-1", "p-2"], ["b-1", "b-2", "b-3"])
    assert [(p["paper"]["client_order_id"], p["backtest"]["client_order_id"]) for p in report["pairs"]] == [
        ("p-1", "b-2"), ("p-2", "b-3")]  # exch 1100 = 1100, not 1000 (also within the tolerance)
    alone = report["backtest_only"][0]
    assert alone["backtest"]["client_order_id"] == "b-1" and alone["capture_ts"] == CAP
    assert alone["nearest"] == {"client_order_id": "p-1", "delta_ms": 100.0}
    assert [c["code"] for c in alone["causes"]] == ["unknown"]


def test_the_nearest_counterpart_is_of_the_same_side_on_either_side_in_time():
    paper = [order("p-0", WALL, exch=500), order("p-1", WALL + 1050 * MS, "BUY", exch=5000),
             order("p-2", WALL + 1300 * MS, "SELL", exch=6000), order("p-3", WALL + 600 * MS, "SELL", exch=7000)]
    backtest = [order("b-0", CAP, exch=500), order("b-x", CAP + 1000 * MS, "SELL", status="CANCELLED")]
    report = compare(run_of(paper), run_of(backtest), TICKS, 10 * MS)
    accounted(report, ["p-0", "p-1", "p-2", "p-3"], ["b-0", "b-x"])
    (alone,) = report["backtest_only"]
    # p-1 is nearer (50 ms later) but a BUY; the SELLs are 300 ms later and 400 ms earlier
    assert alone["nearest"] == {"client_order_id": "p-2", "delta_ms": 300.0}


def test_the_paper_session_starting_late_or_stopping_early_is_named():
    paper = [order("p-2", WALL + 2000 * MS, exch=3000), order("p-3", WALL + 3000 * MS, exch=4000)]
    backtest = [order("b-1", CAP + 1000 * MS, exch=2000), order("b-2", CAP + 2000 * MS, exch=3000),
                order("b-3", CAP + 3000 * MS, exch=4000), order("b-4", CAP + 9000 * MS, exch=10000)]
    report = compare(run_of(paper, WALL + 1500 * MS, WALL + 5000 * MS), run_of(backtest, CAP, CAP + 10_000 * MS),
                     TICKS, 1000 * MS)
    accounted(report, ["p-2", "p-3"], ["b-1", "b-2", "b-3", "b-4"])
    causes = {a["backtest"]["client_order_id"]: a["causes"][0] for a in report["backtest_only"]}
    assert causes["b-1"]["code"] == "session_started_after" and causes["b-1"]["s"] == 0.5
    assert causes["b-4"]["code"] == "session_stopped_before" and causes["b-4"]["s"] == 4.0


def test_paper_orders_beyond_the_capture_are_named_and_a_looped_replay_pairs_only_once():
    backtest = [order("b-1", CAP, exch=1000)]
    paper = [order("p-1", WALL, exch=1000), order("p-2", WALL + 5000 * MS, exch=1000)]  # the replay's second pass
    report = compare(run_of(paper), run_of(backtest, CAP - 100 * MS, CAP + 1000 * MS), TICKS, 1000 * MS)
    accounted(report, ["p-1", "p-2"], ["b-1"])
    assert report["pairs"][0]["paper"]["client_order_id"] == "p-1"
    (alone,) = report["paper_only"]
    assert alone["capture_ts"] == CAP + 5000 * MS and alone["causes"][0]["code"] == "after_capture"


def test_a_faster_replay_runs_the_paper_clock_slower_and_the_map_follows_it():
    speed = 4
    paper = [order(f"p-{n}", WALL + n * 1000 * MS // speed, exch=1_000_000 + n * 1000) for n in range(10)]
    backtest = [order(f"b-{n}", CAP + n * 1000 * MS, exch=1_000_000 + n * 1000) for n in range(10)]
    backtest.append(order("b-x", CAP + 4500 * MS, "SELL", status="REJECTED", reason="NO_LIQUIDITY"))
    paper.append(order("p-x", WALL + 4500 * MS // speed, "SELL", status="REJECTED", reason="NO_LIQUIDITY"))
    report = compare(run_of(paper), run_of(backtest), TICKS, 200 * MS, replay_speed=speed)
    accounted(report, [i.client_order_id for i in paper], [i.client_order_id for i in backtest])
    assert report["clock"]["slope"] == pytest.approx(1 / speed)
    assert {(p["paper"]["client_order_id"], p["backtest"]["client_order_id"]) for p in report["pairs"]} >= {
        ("p-x", "b-x")}
    assert report["counts"]["alike"] == 11


def test_the_clock_map_inverts_and_shrugs_off_one_slow_hop():
    points = [(CAP + n * 10 ** 9, WALL + n * 10 ** 9 // 2) for n in range(20)]
    points[7] = (points[7][0], points[7][1] + 300 * MS)  # one order 300 ms late
    clock = ClockMap.fit(points)
    assert clock.slope == pytest.approx(0.5)
    assert clock.to_paper(CAP + 3 * 10 ** 9) == WALL + 3 * 10 ** 9 // 2
    assert clock.to_capture(WALL + 6 * 10 ** 9) == CAP + 12 * 10 ** 9
    assert clock.residual_ns(*points[7]) == 300 * MS
    assert clock.residual_ns(*points[8]) == 0


def test_without_a_filled_pair_and_on_other_clocks_nothing_is_guessed():
    paper = [order("p-1", WALL, status="REJECTED", reason="NO_BOOK")]
    backtest = [order("b-1", CAP, status="REJECTED", reason="NO_BOOK")]
    report = compare(run_of(paper), run_of(backtest), TICKS, 1000 * MS)
    accounted(report, ["p-1"], ["b-1"])
    assert report["clock"] is None and report["counts"]["matched"] == 0
    assert report["paper_only"][0]["causes"][0]["code"] == "no_clock"


def test_read_run_folds_a_denial_of_a_known_order_into_it_and_keeps_one_per_denied_id(tmp_path):
    from shared.db import close_db, init_db
    db = str(tmp_path / "x.db")
    init_db(db)
    close_db()
    with sqlite3.connect(db) as con:
        con.execute("INSERT INTO orders (order_id, client_order_id, strategy, symbol, side, kind, tif, qty, status, "
                    "filled_qty, reason, created_ts, updated_ts, arrival_ts) VALUES ('o1', 'c1', 's', 'BTCUSDT', "
                    "'BUY', 'MARKET', 'GTC', '0.001', 'FILLED', '0.001', '', 1000, 2501000, 2501000)")
        con.execute("INSERT INTO fills (fill_id, order_id, client_order_id, symbol, side, price, qty, fee, fee_asset, "
                    "liquidity, exch_ts, ts) VALUES ('f1', 'o1', 'c1', 'BTCUSDT', 'BUY', '100', '0.001', '0.0001', "
                    "'USDT', 'TAKER', 5, 2501000)")
        for ts, coid, code in ((3_000_000, "c1", "BROKER_UNAVAILABLE"), (4_000_000, "c2", "RATE_LIMIT"),
                               (4_100_000, "c2", "RATE_LIMIT")):
            con.execute("INSERT INTO risk_events (ts, kind, code, text, client_order_id, symbol, state) VALUES "
                        "(?, 'DENIED', ?, '', ?, 'BTCUSDT', 'ACTIVE')", (ts, code, coid))
    with sqlite3.connect(db) as con:
        con.row_factory = sqlite3.Row
        run = read_run(con)
    assert [(i.kind, i.client_order_id, i.denial or i.reason) for i in run.items] == [
        ("order", "c1", "BROKER_UNAVAILABLE"), ("denied", "c2", "RATE_LIMIT")]
    assert run.items[0].latency_ms == 2.5 and run.items[0].first_exch == 5
    assert run.items[0].fills[0].price == Decimal("100")
    assert (run.first_ts, run.last_ts) == (1000, 4_000_000)


# -- the broker records its settings --------------------------------------------------------------

def _broker_env(tmp_path) -> dict[str, str]:
    return tcp_env(tmp_path, QF_STRATEGY_COOLDOWN_MS="321", QF_API_TOKEN="hunter2")


def test_the_broker_records_its_settings_at_start_with_secrets_masked(tmp_path):
    from services.broker.service import BrokerService
    cfg = qfconfig.load(_broker_env(tmp_path))
    BrokerService(cfg, clock=lambda: 42).close()
    with sqlite3.connect(cfg.common.db) as con:
        rows = con.execute("SELECT ts, service, settings FROM sessions").fetchall()
    assert [(ts, service) for ts, service, _ in rows] == [(42, "broker")]
    settings = json.loads(rows[0][2])
    assert settings == cfg.effective() and settings["QF_STRATEGY_COOLDOWN_MS"] == "321"
    assert settings["QF_API_TOKEN"] == "***" and "hunter2" not in rows[0][2]


def test_a_sessions_row_the_database_refuses_does_not_stop_the_broker(tmp_path, caplog):
    from services.broker.service import BrokerService
    cfg = qfconfig.load(_broker_env(tmp_path))
    with sqlite3.connect(cfg.common.db) as con:  # a table of that name the row does not fit
        con.execute("CREATE TABLE sessions (id INTEGER PRIMARY KEY, other TEXT NOT NULL)")
    BrokerService(cfg).close()
    assert any(r.getMessage() == "session_not_recorded" for r in caplog.records)


# -- the command ------------------------------------------------------------------------------------

def qf(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """The real command in a clean environment (no QF_* of the caller's)."""
    return subprocess.run([sys.executable, "-m", "services.cli", *args], cwd=ROOT,
                          env={**clean_environ(), **(env or {})}, capture_output=True, text=True, timeout=timeout)


def short_capture(path, seconds: float) -> str:
    """The first `seconds` of the shipped capture (its snapshot comes in the first seconds)."""
    with gzip.open(SPOT_CAPTURE, "rb") as src, gzip.open(path, "wb") as out:
        first = None
        for line in src:
            t = json.loads(line)["t"]
            first = t if first is None else first
            if t - first > seconds * 1e9:
                break
            out.write(line)
    return str(path)


@pytest.fixture(scope="module")
def capture20(tmp_path_factory):
    return short_capture(tmp_path_factory.mktemp("cap") / "c20.jsonl.gz", 20)


def add_session(db: str, settings: dict[str, str], ts: int = 1) -> None:
    from shared.db import close_db, init_db
    init_db(db)  # the sessions table, as a broker of this version makes it
    close_db()
    with sqlite3.connect(db) as con:
        con.execute("INSERT INTO sessions (ts, service, settings) VALUES (?, 'broker', ?)", (ts, json.dumps(settings)))


def test_a_backtest_database_as_the_paper_session_is_alike_in_every_order(tmp_path, capture20):
    """The same capture and settings on the same clock: every order pairs by its fill, alike."""
    paper = str(tmp_path / "paper.db")
    made = qf("backtest", "--capture", capture20, "--db", paper, "--seed", "7")
    assert made.returncode == 0, made.stderr
    add_session(paper, {**qfconfig.load({}).effective(), "QF_BROKER_SEED": "7", "QF_GONE_SETTING": "x"})
    out = str(tmp_path / "bt.db")
    run = qf("parity", "--db", paper, "--capture", capture20, "--json", "--out", out)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    with sqlite3.connect(paper) as con:
        coids = [r[0] for r in con.execute("SELECT client_order_id FROM orders")]
    assert coids and report["counts"]["alike"] == report["counts"]["matched"] == len(coids)
    assert ids(report["pairs"], "paper") == ids(report["pairs"], "backtest")  # the same seed: the same ids
    assert report["clock"]["offset_ns"] == 0 and report["clock"]["slope"] == 1.0
    assert "broker session" in report["settings"]["source"] and report["settings"]["dropped"] == ["QF_GONE_SETTING"]
    assert os.path.exists(out) and report["backtest_db"] == out
    text = qf("parity", "--db", paper, "--capture", capture20)
    assert text.returncode == 0, text.stderr
    for label in ("parity ", "settings ", "clocks ", "orders ", "matched ", "alone ", "first diff ", "pairs ("):
        assert label in text.stdout, (label, text.stdout)
    assert text.stdout.count(": alike, ") == len(coids)


def test_the_session_settings_drive_the_backtest_and_the_latency_difference_is_a_number(tmp_path, capture20):
    paper = str(tmp_path / "paper.db")
    assert qf("backtest", "--capture", capture20, "--db", paper).returncode == 0
    add_session(paper, {"QF_BROKER_LATENCY_MODE": "constant", "QF_BROKER_LATENCY_MS": "50"})
    run = qf("parity", "--db", paper, "--capture", capture20, "--json")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["pairs"] and report["backtest_db"] is None
    assert all(p["latency_ms"] == {"paper": 10.0, "backtest": 50.0} for p in report["pairs"])
    differing = [p for p in report["pairs"] if p["differences"]]
    for p in differing:
        assert {"code": "latency", "paper_ms": 10.0, "backtest_ms": 50.0}.items() <= next(
            c for c in p["causes"] if c["code"] == "latency").items()
    # --config over the session's settings
    conf = tmp_path / "qf.env"
    conf.write_text("QF_BROKER_LATENCY_MS=10\n")
    again = json.loads(qf("parity", "--db", paper, "--capture", capture20, "--json", "--config", str(conf)).stdout)
    assert again["counts"]["alike"] == again["counts"]["matched"] == len(report["pairs"])
    assert str(conf) in again["settings"]["source"]


@pytest.mark.parametrize("case", ["missing db", "not sqlite", "not ours", "not a capture", "missing capture"])
def test_bad_input_is_one_line_naming_the_file_and_exit_2(tmp_path, capture20, case):
    paper, capture = str(tmp_path / "paper.db"), capture20
    if case == "missing db":
        paper = str(tmp_path / "nope.db")
    elif case == "not sqlite":
        (tmp_path / "paper.db").write_text("hello\n" * 100)
    elif case == "not ours":
        with sqlite3.connect(paper) as con:
            con.execute("CREATE TABLE other (x)")
    else:
        from shared.db import close_db, init_db
        init_db(paper)
        close_db()
        if case == "not a capture":
            capture = str(tmp_path / "notes.txt")
            (tmp_path / "notes.txt").write_text("not json\n")
        elif case == "missing capture":
            capture = str(tmp_path / "gone.jsonl.gz")
    run = qf("parity", "--db", paper, "--capture", capture)
    assert run.returncode == 2, (run.stdout, run.stderr)
    assert run.stderr.strip().count("\n") == 0 and run.stdout == ""
    assert (capture if "capture" in case else paper) in run.stderr, run.stderr


# -- a free-running replay session of the real services ------------------------------------------------

def test_a_free_running_replay_session_is_accounted_for_order_by_order(tmp_path):
    """`qf up --feed replay:CAPTURE --speed 4` over the first 60 s of the shipped capture, as real
    processes (15 s); stopped once the replay is done; then `qf parity` against the backtest of it."""
    capture = short_capture(tmp_path / "c60.jsonl.gz", 60)
    # the imbalance strategy: ofi's features run on the service's wall clock, 4x slower than the
    # capture's here, so a replay at speed 4 is not the backtest's market for it
    settings = tcp_env(tmp_path, QF_STRATEGY_KIND="imbalance")
    env = {**clean_environ(), **settings, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "up", "--feed", f"replay:{capture}",
                             "--speed", "4"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    db = settings["QF_DB"]
    try:
        wait_for(lambda: any('event="replay finished"' in line for line in lines) or proc.poll() is not None, 90,
                 "the replay to finish")
        assert proc.poll() is None, "".join(lines)[-3000:]

        seen = {"last": None}

        def settled() -> bool:  # the last orders answered and stored: orders unchanged over 0.5 s
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
                now = con.execute("SELECT count(*), max(updated_ts) FROM orders").fetchone()
            same, seen["last"] = now == seen["last"], now
            return same
        wait_for(settled, 20, "the broker's orders to stop changing", step=0.5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, "".join(lines)[-3000:]
    finally:
        if proc.poll() is None:
            stop_process(proc, 15)
        try:  # nothing of `qf up`'s process group survives a failed test
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        reader.join(10)
    journal_stored(db)

    run = qf("parity", "--db", db, "--capture", capture, "--json")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    with sqlite3.connect(db) as con:
        paper = [r[0] for r in con.execute("SELECT client_order_id FROM orders")]
        paper += [r[0] for r in con.execute("SELECT DISTINCT client_order_id FROM risk_events WHERE kind = 'DENIED' "
                                            "AND client_order_id NOT IN (SELECT client_order_id FROM orders)")]
    backtest_n = report["counts"]["backtest_orders"] + report["counts"]["backtest_denied"]
    seen_b = ids(report["pairs"], "backtest") + ids(report["backtest_only"], "backtest")
    assert len(paper) >= 5, "the session should have traded"
    accounted(report, paper, seen_b)
    assert len(seen_b) == len(set(seen_b)) == backtest_n
    assert "broker session" in report["settings"]["source"]  # the session's own settings
    c = report["counts"]
    assert c["matched"] >= 0.5 * max(len(paper), backtest_n), c
    assert report["clock"]["slope"] == pytest.approx(0.25, rel=0.05)  # speed 4: a quarter paper second per capture s
    for p in report["pairs"]:
        assert all(isinstance(x, float) for x in p["latency_ms"].values() if x is not None)
        for cause in p["causes"]:
            if cause["code"] == "latency":
                assert isinstance(cause["paper_ms"], float) and isinstance(cause["backtest_ms"], float)
            if cause["code"] == "decision_delay":
                assert isinstance(cause["ms"], float)
    assert all(e["causes"] for e in report["paper_only"] + report["backtest_only"])
