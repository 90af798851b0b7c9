"""`qf backtest --sweep`: the real command over a slice of the shipped capture — each row equal to the
same settings backtested alone, the ranking, the CSV, two worker processes, failed runs as rows with
their exit status, bad sweeps refused before anything runs, Ctrl-C leaving no process and no files.

Each command runs in a session of its own, so what it started is its process group: "no process
left" is "no process of that group", read from /proc."""
from __future__ import annotations

import csv
import glob
import gzip
import json
import os
import signal
import subprocess
import sys
from decimal import Decimal

import pytest

from tests.conftest import SPOT_CAPTURE, clean_environ, fill_rows, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
SLICE_LINES = 25_000  # the snapshot is line 8; ~0.25 s of backtest
# Broker settings, which reach every strategy's results: on the slice each of the 4 runs differs
# (a 150 ms entry latency meets a later book than 1 ms: the depth stream steps every 100 ms).
LATENCY, FEE = ("1", "150"), ("0.001", "0.0004")
SWEEP = ["--latency-mode", "constant", "--sweep", f"broker_latency_ms={','.join(LATENCY)}",
         "--sweep", f"QF_BROKER_TAKER_FEE={','.join(FEE)}"]
TIMING = ("events_per_s", "db")  # the only keys of a summary that may differ between equal runs


def qf(*args: str, env: dict | None = None, cwd: str = ROOT, timeout: float = 60) -> subprocess.CompletedProcess:
    """`qf backtest ARGS` in a clean environment and a session of its own; returns (its pid as `.pid`)
    once its whole process group is gone (bounded): no run, worker or helper process outlives it."""
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "backtest", *args], cwd=cwd,
                            env={**clean_environ(), "PYTHONPATH": ROOT, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    no_process_left(proc.pid)
    done = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    done.pid = proc.pid
    return done


def group(pgid: int) -> list[str]:
    """The processes of process group `pgid`: `pid command` each."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[2]) == pgid:
            out.append(f"{pid} {stat.split(' ', 2)[1]}")
    return out


def no_process_left(pgid: int) -> None:
    """The command's forkserver and resource tracker leave when their parent's pipe closes: shortly."""
    wait_for(lambda: not group(pgid), 10, f"process group {pgid} to be empty (left: {group(pgid)})")


def write_capture(path, lines: list[bytes]) -> str:
    with gzip.open(path, "wb") as fh:
        fh.write(b"\n".join(lines) + b"\n")
    return str(path)


@pytest.fixture(scope="module")
def capture_lines() -> list[bytes]:
    with gzip.open(SPOT_CAPTURE, "rb") as fh:
        return fh.read().splitlines()[:SLICE_LINES]


@pytest.fixture(scope="module")
def short_capture(tmp_path_factory, capture_lines) -> str:
    """The shipped capture's first SLICE_LINES lines: its snapshot and ~2.5 minutes of events."""
    return write_capture(tmp_path_factory.mktemp("slice") / "slice.jsonl.gz", capture_lines)


def test_a_2x2_sweep_runs_each_combination_as_the_single_backtest_would_in_two_processes(tmp_path, short_capture):
    runs = tmp_path / "runs"
    out = tmp_path / "ranked.csv"
    sweep = qf("--capture", short_capture, *SWEEP, "--jobs", "2", "--sweep-dir", str(runs), "--sweep-csv", str(out),
               "--json")
    assert sweep.returncode == 0, sweep.stderr
    rows = json.loads(sweep.stdout)
    assert sweep.stderr.strip() == f"csv          {out}"  # --json: no progress, the table on stdout only
    # every combination once, in the order the runs were numbered (the first axis slowest)
    by_run = {r["run"]: r for r in rows}
    assert sorted(by_run) == [1, 2, 3, 4]
    assert [by_run[n]["settings"] for n in (1, 2, 3, 4)] == [
        {"QF_BROKER_LATENCY_MS": lat, "QF_BROKER_TAKER_FEE": fee} for lat in LATENCY for fee in FEE]
    # ranked by net P&L, best first; the settings do change the results
    assert [r["rank"] for r in rows] == [1, 2, 3, 4]
    nets = [Decimal(r["net_pnl"]) for r in rows]
    assert nets == sorted(nets, reverse=True) and len(set(nets)) == 4
    assert all(r["error"] is None for r in rows)
    # in worker processes, two of them
    pids = {r["worker_pid"] for r in rows}
    assert len(pids) == 2 and sweep.pid not in pids, pids
    # each row is the single backtest of its settings: the same summary, the same fills, byte for byte
    for r in rows:
        db = str(tmp_path / f"alone-{r['run']}.db")
        alone = qf("--capture", short_capture, "--latency-mode", "constant", "--db", db, "--json", env=r["settings"])
        assert alone.returncode == 0, alone.stderr
        single = json.loads(alone.stdout)
        assert r["net_pnl"] == single["net_pnl"] and r["fills"] == single["fills"] > 0
        assert r["round_trips"] == single["round_trips"] and r["orders"] == single["orders"]
        assert {k: v for k, v in r["summary"].items() if k not in TIMING} == \
            {k: v for k, v in single.items() if k not in TIMING}
        assert r["db"] == str(runs / f"run-{r['run']}.db")
        assert fill_rows(r["db"]) == fill_rows(db)
    # the CSV is the same table
    with open(out, newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [int(t["rank"]) for t in table] == [r["rank"] for r in rows]
    assert list(table[0])[:4] == ["rank", "run", "QF_BROKER_LATENCY_MS", "QF_BROKER_TAKER_FEE"]
    for t, r in zip(table, rows):
        assert int(t["run"]) == r["run"] and t["QF_BROKER_TAKER_FEE"] == r["settings"]["QF_BROKER_TAKER_FEE"]
        assert t["net_pnl"] == r["net_pnl"] and t["fees"] == r["fees"] and t["max_drawdown"] == r["max_drawdown"]
        assert int(t["fills"]) == r["fills"] and int(t["round_trips"]) == r["round_trips"]
        assert float(t["sharpe"]) == r["sharpe"] and int(t["denied"]) == r["denied"] == 0
        assert t["error"] == "" and t["db"] == r["db"]


def test_a_run_that_fails_is_a_row_ranked_last_with_its_error_and_exit_4(tmp_path, short_capture):
    """QF_SYMBOLS=ethusdt: the capture has no book of it, which only the run finds out. The table
    for a person, and the CSV in the current directory by default."""
    run = qf("--capture", short_capture, "--sweep", "symbols=ethusdt,btcusdt", "--sweep", "broker_taker_fee=0.001,0.0004",
             cwd=str(tmp_path))
    assert run.returncode == 4, run.stderr
    lines = run.stdout.splitlines()
    header, body = lines[0].split(), lines[1:5]
    assert header[:4] == ["rank", "run", "SYMBOLS", "BROKER_TAKER_FEE"] and header[-1] == "error"
    for label in ("trades", "fills", "net", "fees", "Sharpe", "win", "maker", "orders", "denied"):
        assert label in header, label
    assert [line.split()[2] for line in body] == ["btcusdt", "btcusdt", "ethusdt", "ethusdt"]
    assert [line.split()[0] for line in body] == ["1", "2", "3", "4"]
    assert body[0].split()[3] == "0.0004"  # the lower fee loses less
    for line in body[2:]:
        assert "no book for ETHUSDT" in line
    csv_path = tmp_path / "sweep.csv"
    assert lines[5] == f"csv          {csv_path}"
    with open(csv_path, newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [t["QF_SYMBOLS"] for t in table] == ["btcusdt", "btcusdt", "ethusdt", "ethusdt"]
    assert table[0]["error"] == "" and "no book for ETHUSDT" in table[3]["error"] and table[3]["net_pnl"] == ""
    assert "sweep: 4 runs on " in run.stderr and "sweep: 4/4 runs done, 2 failed" in run.stderr  # no terminal
    assert "2 of 4 runs failed" in run.stderr and "run 1 (QF_SYMBOLS=ethusdt QF_BROKER_TAKER_FEE=0.001)" in run.stderr
    again = qf("--capture", short_capture, "--sweep", "broker_taker_fee=0.001", cwd=str(tmp_path))
    assert again.returncode == 2 and "sweep.csv exists" in again.stderr and "--overwrite" in again.stderr


def test_runs_ending_at_an_unrepaired_gap_keep_their_figures_and_exit_3(tmp_path, capture_lines):
    depth = [i for i, line in enumerate(capture_lines) if b"@depth" in line[:200]]
    cut = set(depth[1500:1503])  # past the first orders: the runs have fills before it
    gap = write_capture(tmp_path / "gap.jsonl.gz", [line for i, line in enumerate(capture_lines) if i not in cut])
    run = qf("--capture", gap, "--sweep", "broker_taker_fee=0.001,0.0004", "--json", "--sweep-csv",
             str(tmp_path / "s.csv"))
    assert run.returncode == 3, run.stderr
    rows = json.loads(run.stdout)
    assert [r["run"] for r in rows] == [1, 2]  # failed rows in run order
    for r in rows:
        assert r["error"].startswith("gap never repaired: BTCUSDT after update id ")
        assert r["fills"] is not None and r["summary"]["events"] > 0  # the figures stand
        assert not r["summary"]["gaps"][0]["repaired"]
    assert "2 of 2 runs failed" in run.stderr


@pytest.mark.parametrize("args, named", [
    (["--sweep", "strategy_imbalance"], "--sweep 'strategy_imbalance': expected KEY=V1,V2"),
    (["--sweep", "strategy_imbalanc=0.5,0.6"], "unknown setting (did you mean QF_STRATEGY_IMBALANCE?)"),
    (["--sweep", "QF_STRATEGY_IMBALANCE=0.5,1.5"], "--sweep QF_STRATEGY_IMBALANCE=1.5: must be between"),
    (["--sweep", "strategy_qty=0.001,abc"], "--sweep QF_STRATEGY_QTY=abc: not a decimal number"),
    (["--sweep", "strategy_qty=0.001,0.0010"], "--sweep QF_STRATEGY_QTY: 0.0010 given twice (as 0.001)"),
    (["--sweep", "strategy_qty=0.001", "--sweep", "QF_STRATEGY_QTY=0.002"], "QF_STRATEGY_QTY given twice"),
    (["--sweep", "strategy_qty="], "--sweep QF_STRATEGY_QTY: no values"),
    (["--sweep", "strategy_qty=0.001,,0.002"], "--sweep QF_STRATEGY_QTY: an empty value"),
    (["--sweep", "api_token=a,b"], "--sweep QF_API_TOKEN: a secret setting"),
    (["--sweep", "strategy_qty=" + ",".join(f"0.00{n}" for n in range(1, 10)),
      "--sweep", "strategy_cooldown_ms=" + ",".join(str(n) for n in range(12)),
      "--sweep", "broker_latency_ms=" + ",".join(str(n) for n in range(10))],
     "--sweep: 1,080 combinations (9 × 12 × 10), more than 1,000"),
    (["--sweep", "risk_daily_loss=0.02,0.005"],  # the soft threshold (0.01) above the hard one
     "--sweep run 2 (QF_RISK_DAILY_LOSS=0.005): QF_RISK_DAILY_LOSS: the soft threshold"),
    (["--sweep", "strategy_qty=0.001", "--db", "x.db"], "--db names one run's database"),
    (["--sweep", "strategy_qty=0.001", "--jobs", "0"], "--jobs 0: at least 1"),
    (["--jobs", "2"], "--jobs, --sweep-dir and --sweep-csv go with --sweep"),
])
def test_a_bad_sweep_is_one_line_naming_it_and_exit_2_before_anything_runs(tmp_path, short_capture, args, named):
    run = qf("--capture", short_capture, *args, cwd=str(tmp_path))
    assert run.returncode == 2, (run.stdout, run.stderr)
    err = run.stderr.strip()
    assert err.startswith("qf backtest: ") and "\n" not in err and named in err, err
    assert run.stdout == "" and os.listdir(tmp_path) == []  # no CSV, no database


def test_ctrl_c_stops_every_run_and_leaves_no_process_and_no_temporary_files(tmp_path):
    """The full capture, 6 runs on 2 processes (~3 s): Ctrl-C (SIGINT to the terminal's process
    group) once the first run's database exists."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    sweep = subprocess.Popen([sys.executable, "-m", "services.cli", "backtest", "--capture", SPOT_CAPTURE,
                              "--sweep", "broker_latency_ms=1,2,3,4,5,6", "--jobs", "2",
                              "--sweep-csv", str(tmp_path / "s.csv")],
                             cwd=ROOT, env={**clean_environ(), "PYTHONPATH": ROOT, "TMPDIR": str(tmp)},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for(lambda: glob.glob(str(tmp / "qf-sweep-*" / "run-*.db")), 30, "the first run's database")
        os.killpg(sweep.pid, signal.SIGINT)
        stdout, stderr = sweep.communicate(timeout=30)
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
            sweep.wait(10)
    assert sweep.returncode == 130, stderr
    assert "sweep stopped (Ctrl-C) after" in stderr and "Traceback" not in stderr, stderr
    assert stdout == "" and not (tmp_path / "s.csv").exists()
    no_process_left(sweep.pid)
    assert os.listdir(tmp) == []  # the runs' databases went with their temporary directory


def test_a_temporary_directory_too_long_for_the_forkservers_socket_takes_spawn(tmp_path, monkeypatch):
    """The forkserver listens on a unix socket under TMPDIR (at most 107 bytes on Linux): a
    longer TMPDIR made every sweep fail with `AF_UNIX path too long`."""
    import tempfile
    from services.backtest import sweep
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    assert sweep._context().get_start_method() == "spawn"
    with sweep._context().Pool(1) as pool:
        assert pool.apply(len, ("abc",)) == 3  # a worker starts under the long TMPDIR
    monkeypatch.setattr(tempfile, "tempdir", "/tmp")
    assert sweep._context().get_start_method() == "forkserver"  # where it fits, as before
