"""`qf book` as a user runs it: a real subprocess on the real captures and on broken copies."""

import gzip
import json
import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import orjson
import pytest

ROOT = Path(__file__).resolve().parents[3]
_SCRIPT = Path(sys.executable).with_name("qf")  # the console script `make venv` installs
QF = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "services.cli"]


def qf_book(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QF_")}
    return subprocess.run([*QF, "book", *args], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env=env)


def write_gz(path: Path, records: list[dict]) -> Path:
    path.write_bytes(gzip.compress(b"".join(orjson.dumps(r) + b"\n" for r in records)))
    return path


def is_depth(rec: dict) -> bool:
    return rec["k"] == "ws" and "@depth" in rec["m"]["stream"]


def test_spot_book_is_one_json_object(spot_path):
    out = qf_book("--capture", str(spot_path), "--symbol", "btcusdt", "--depth", "3")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 1
    book = json.loads(lines[0])
    assert {"symbol", "update_id", "bids", "asks", "events"} <= set(book)
    assert book["symbol"] == "BTCUSDT" and book["update_id"] == 50093696318 and book["events"] == 6493
    # Decimal strings, best first, exactly the capture's numbers.
    assert book["bids"] == [["61602.01", "1.67177"], ["61602", "0.09122"], ["61601.75", "0.03197"]]
    assert book["asks"][0] == ["61602.02", "2.66795"] and len(book["asks"]) == 3
    for side in ("bids", "asks"):
        for p, q in book[side]:
            assert type(p) is str and type(q) is str and Decimal(q) > 0
    assert Decimal(book["asks"][0][0]) < Decimal(book["asks"][1][0]) < Decimal(book["asks"][2][0])


def test_full_depth_and_usdm_market(spot_path, usdm_path):
    full = json.loads(qf_book("--capture", str(spot_path), "--symbol", "BTCUSDT").stdout)
    assert len(full["bids"]) == 1971 and len(full["asks"]) == 2962
    out = qf_book("--capture", str(usdm_path), "--symbol", "btcusdt", "--market", "usdm", "--depth", "1")
    assert out.returncode == 0, out.stderr
    book = json.loads(out.stdout)
    assert book["update_id"] == 4984057064916 and book["events"] == 9017
    assert book["bids"] == [["63867.4", "0.002"]] and book["asks"] == [["63867.5", "5.045"]]


def test_no_snapshot_prints_no_book_and_names_update_ids(tmp_path, spot_records):
    path = write_gz(tmp_path / "nosnap.jsonl.gz", [r for r in spot_records[:2000] if r["k"] != "snapshot"])
    out = qf_book("--capture", str(path), "--symbol", "btcusdt")
    assert out.returncode != 0 and out.stdout == ""
    assert "no snapshot for BTCUSDT" in out.stderr and "U=50093239189 u=50093239202" in out.stderr


def test_unrepaired_gap_prints_no_book_and_names_update_ids(tmp_path, spot_records):
    recs = spot_records[:2000]
    depth_idx = [i for i, r in enumerate(recs) if is_depth(r)]
    prev, lost = recs[depth_idx[49]]["m"]["data"], recs[depth_idx[50]]["m"]["data"]
    nxt = recs[depth_idx[51]]["m"]["data"]
    path = write_gz(tmp_path / "gap.jsonl.gz", recs[:depth_idx[50]] + recs[depth_idx[50] + 1:])
    out = qf_book("--capture", str(path), "--symbol", "btcusdt", "--depth", "5")
    assert out.returncode != 0 and out.stdout == ""
    assert f"after update id {prev['u']} came U={nxt['U']} u={nxt['u']}" in out.stderr
    assert lost["U"] == prev["u"] + 1  # the missing ids are exactly the lost event's


def test_wrong_market_is_refused_with_update_ids(usdm_path):
    # Futures ids are not contiguous: read as spot, the chain breaks at once.
    out = qf_book("--capture", str(usdm_path), "--symbol", "btcusdt", "--market", "spot")
    assert out.returncode != 0 and out.stdout == ""
    assert "ends unsynced" in out.stderr and "after update id" in out.stderr


@pytest.mark.parametrize("content, message", [
    (None, "No such file"), (b"{not json\n", "not JSON"), (b"", "no depth events for BTCUSDT"),
])
def test_unreadable_capture(tmp_path, content, message):
    path = tmp_path / "c.jsonl"
    if content is not None:
        path.write_bytes(content)
    out = qf_book("--capture", str(path), "--symbol", "btcusdt")
    assert out.returncode != 0 and out.stdout == "" and message in out.stderr
