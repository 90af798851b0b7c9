"""`qf calendar` as a real process: the table, the JSON, the settings it reads, and bad input."""
from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timedelta, timezone

from tests.conftest import ROOT, clean_environ


def qf(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", *args], env={**clean_environ(), **env},
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_json_lists_the_merged_pauses_in_local_time():
    proc = qf("calendar", "--location", "new york", "--from", "2026-09-10", "--to", "2026-10-05", "--json")
    assert proc.returncode == 0, proc.stderr
    pauses = json.loads(proc.stdout)
    assert [(p["start"], p["end"], p["kind"], p["name"]) for p in pauses] == [
        ("2026-09-11T18:53:00-04:00", "2026-09-13T19:50:00-04:00", "shabbat+yom_tov", "Rosh Hashana I–II + Shabbat"),
        ("2026-09-18T18:41:00-04:00", "2026-09-19T19:39:00-04:00", "shabbat", "Shabbat"),
        ("2026-09-20T18:38:00-04:00", "2026-09-21T19:36:00-04:00", "yom_tov", "Yom Kippur"),
        ("2026-09-25T18:29:00-04:00", "2026-09-27T19:26:00-04:00", "shabbat+yom_tov", "Sukkot I–II + Shabbat"),
        ("2026-10-02T18:18:00-04:00", "2026-10-04T19:14:00-04:00", "shabbat+yom_tov",
         "Shemini Atzeret + Simchat Torah + Shabbat"),
    ]
    for p in pauses:
        assert datetime.fromisoformat(p["start"]).utcoffset() == timedelta(hours=-4)


def test_table_names_the_place_and_the_rules():
    proc = qf("calendar", "--from", "2027-04-20", "--to", "2027-04-30")  # the default place: Jerusalem
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == ("Shabbat and Yom Tov pauses for Jerusalem (31.7690°N, 35.2163°E, Asia/Jerusalem), "
                        "2027-04-20 to 2027-04-30")
    assert "40 min before sunset" in lines[1] and "8.5° below the horizon" in lines[1] and "one day" in lines[1]
    rows = [line for line in lines if line.startswith(("Wed", "Thu", "Fri", "Sat", "Sun", "Mon", "Tue"))]
    assert [r.split()[-2:] for r in rows] == [["Pesach", "I"], ["shabbat", "Shabbat"], ["Pesach", "VII"],
                                           ["shabbat", "Shabbat"]]
    assert rows[0].startswith("Wed 2027-04-21 ") and " IDT  Thu 2027-04-22 " in rows[0] and " yom_tov " in rows[0]


def test_settings_and_location_override():
    proc = qf("calendar", "--location", "São Paulo", "--from", "2026-12-07", "--to", "2026-12-13",
              QF_SHABBAT_LOCATION="London", QF_SHABBAT_TZEIT="72min", QF_SHABBAT_CANDLES_MIN="20")
    assert proc.returncode == 0, proc.stderr
    assert "São Paulo (23.5475°S, 46.6361°W, America/Sao_Paulo)" in proc.stdout
    assert "20 min before sunset" in proc.stdout and "72 minutes after sunset" in proc.stdout
    coords = qf("calendar", "--location", "59.91,10.75,Europe/Oslo", "--from", "2026-06-15", "--to", "2026-06-21",
                "--json", QF_SHABBAT_YOM_TOV="false")
    assert coords.returncode == 0, coords.stderr
    (pause,) = json.loads(coords.stdout)
    assert pause["start"].startswith("2026-06-19T") and pause["end"].startswith("2026-06-21T01:")  # lowest sun


def test_default_range_is_today_utc_and_thirty_days():
    before = datetime.now(timezone.utc).date()
    proc = qf("calendar", "--location", "London")
    after = datetime.now(timezone.utc).date()
    assert proc.returncode == 0, proc.stderr
    first = proc.stdout.splitlines()[0]
    assert any(first.endswith(f"{d} to {d + timedelta(days=30)}") for d in {before, after}), first
    assert len([line for line in proc.stdout.splitlines() if " Shabbat" in line]) >= 4


def test_no_pause_in_range():
    proc = qf("calendar", "--location", "London", "--from", "2026-12-07", "--to", "2026-12-09")
    assert proc.returncode == 0 and proc.stdout.splitlines()[-1] == "(no pause in this range)"
    empty = qf("calendar", "--location", "London", "--from", "2026-12-07", "--to", "2026-12-09", "--json")
    assert empty.returncode == 0 and json.loads(empty.stdout) == []


def test_bad_input_is_one_line_and_exit_2():
    cases = [
        (["--from", "2026-13-01"], "--from '2026-13-01'"),
        (["--from", "07/12/2026"], "is not a date like"),
        (["--from", "2026-12-07", "--to", "2026-12-01"], "--to 2026-12-01 is before --from 2026-12-07"),
        (["--from", "2026-01-01", "--to", "2032-01-01"], "at most 1830"),
        (["--location", "Atlantis"], "--location: unknown place 'Atlantis': name one of Jerusalem"),
        (["--location", "95,0,UTC"], "latitude 95 is outside -90..90"),
    ]
    for args, needle in cases:
        proc = qf("calendar", *args)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, (args, proc.stderr)
        assert proc.stdout == ""
    bad_setting = qf("calendar", QF_SHABBAT_TZEIT="dusk")
    assert bad_setting.returncode == 2 and "QF_SHABBAT_TZEIT='dusk'" in bad_setting.stderr
    assert len(bad_setting.stderr.strip().splitlines()) == 1


def test_qf_config_lists_the_shabbat_settings():
    proc = qf("config")
    assert proc.returncode == 0, proc.stderr
    for name in ("QF_SHABBAT_LOCATION", "QF_SHABBAT_YOM_TOV", "QF_SHABBAT_CANDLES_MIN", "QF_SHABBAT_TZEIT",
                 "QF_SHABBAT_FLATTEN_MIN"):
        assert f"`{name}`" in proc.stdout
