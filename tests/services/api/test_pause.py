"""/api/v1/status and /metrics show risk's stored state and the Shabbat pause of the calendar at the
app's clock: Jerusalem's Shabbat of Fri 2026-12-11 15:55 IST to Sat 2026-12-12 17:16 IST (`qf calendar`)."""
from __future__ import annotations

import dataclasses

import zoneinfo
from datetime import datetime

import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.api.app import create_app
from services.risk.core import StateChange
from services.risk.store import Outbox
from shared.config import load
from shared.db import RiskEvent
from shared.enums import TradingState

IST = zoneinfo.ZoneInfo("Asia/Jerusalem")
SHABBAT = {"start": "2026-12-11T15:55:00+02:00", "end": "2026-12-12T17:16:00+02:00", "kind": "shabbat",
           "name": "Shabbat"}
NEXT_SHABBAT = {"start": "2026-12-18T15:57:00+02:00", "end": "2026-12-19T17:19:00+02:00", "kind": "shabbat",
                "name": "Shabbat"}


def ns(text: str) -> int:
    """A Jerusalem wall time as ns since the epoch."""
    t = datetime.fromisoformat(text).replace(tzinfo=IST)
    return int(t.timestamp()) * 10**9 + t.microsecond * 1000


class Clock:
    """The app's wall clock, set by the test."""

    def __init__(self, now: int) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def clock():
    return Clock(ns("2026-12-10T12:00"))


@pytest.fixture
def client(api_config, db, clock):
    # the pause on (the shared fixture turns it off for tests on the wall clock; this clock is the test's)
    app = create_app(dataclasses.replace(api_config, shabbat=dataclasses.replace(api_config.shabbat, pause=True)),
                     clock=clock)
    yield app.test_client()
    handle = app.extensions["qf_db"]
    if handle.db is not None:
        handle.db.close()


def pause_of(client) -> dict:
    resp = client.get("/api/v1/status")
    assert resp.status_code == 200, resp.get_data(as_text=True)
    return resp.get_json()["pause"]


def gauges(client) -> dict[str, float]:
    resp = client.get("/metrics")
    assert resp.status_code == 200, resp.get_data(as_text=True)
    return {s.name + "".join(f'{{{k}="{v}"}}' for k, v in sorted(s.labels.items())): s.value
            for fam in text_string_to_metric_families(resp.get_data(as_text=True)) for s in fam.samples
            if s.name.startswith(("qf_trading_paused", "qf_shabbat_"))}


def test_a_day_before_shabbat_the_status_names_the_next_pause_and_its_flatten_window(client):
    assert pause_of(client) == {"enabled": True, "phase": "", "current": None, "next": SHABBAT,
                                "flatten_from": "2026-12-11T15:40:00+02:00"}


def test_in_the_flatten_window_the_phase_is_flatten_and_the_pause_still_next(client, clock):
    clock.now = ns("2026-12-11T15:45")
    assert pause_of(client) == {"enabled": True, "phase": "flatten", "current": None, "next": SHABBAT,
                                "flatten_from": "2026-12-11T15:40:00+02:00"}


def test_inside_the_pause_it_is_current_and_the_next_is_a_week_later(client, clock):
    clock.now = ns("2026-12-12T12:00")
    assert pause_of(client) == {"enabled": True, "phase": "paused", "current": SHABBAT, "next": NEXT_SHABBAT,
                                "flatten_from": "2026-12-18T15:42:00+02:00"}


@pytest.mark.parametrize("at, phase", [
    ("2026-12-11T15:40", "flatten"),  # the window opens QF_SHABBAT_FLATTEN_MIN (15) before candle-lighting
    ("2026-12-11T15:55", "paused"),  # the start is inside
    ("2026-12-12T17:16", ""),  # the end is not
])
def test_the_edges_of_the_window_and_the_pause(client, clock, at, phase):
    clock.now = ns(at)
    assert pause_of(client)["phase"] == phase
    clock.now -= 1
    assert pause_of(client)["phase"] == {"flatten": "", "paused": "flatten", "": "paused"}[phase]


def test_the_flatten_window_follows_QF_SHABBAT_FLATTEN_MIN_and_the_place_QF_SHABBAT_LOCATION(tmp_path, db):
    cfg = load({"QF_DB": str(tmp_path / "data" / "qf.db"), "QF_RUN_DIR": str(tmp_path / "run"),
                "QF_SHABBAT_FLATTEN_MIN": "60", "QF_SHABBAT_LOCATION": "New York", "QF_SHABBAT_PAUSE": "true"})
    client = create_app(cfg, clock=Clock(ns("2026-12-11T22:30"))).test_client()  # 15:30 EST
    body = pause_of(client)
    assert (body["phase"], body["next"]["start"], body["flatten_from"]) == (
        "flatten", "2026-12-11T16:10:00-05:00", "2026-12-11T15:10:00-05:00")


def test_with_the_pause_off_the_status_says_so_and_nothing_else(tmp_path, db):
    cfg = load({"QF_DB": str(tmp_path / "data" / "qf.db"), "QF_RUN_DIR": str(tmp_path / "run"),
                "QF_SHABBAT_PAUSE": "false"})
    client = create_app(cfg, clock=Clock(ns("2026-12-12T12:00"))).test_client()
    assert pause_of(client) == {"enabled": False, "phase": "", "current": None, "next": None,
                                "flatten_from": None}
    assert gauges(client) == {'qf_trading_paused{reason="shabbat"}': 0, "qf_shabbat_flattening": 0}


def test_the_status_keeps_its_keys_and_takes_its_ts_from_the_clock(client, clock):
    body = client.get("/api/v1/status").get_json()
    assert set(body) == {"fills", "orders", "equity", "positions", "ts", "risk_state", "pause", "trading_state",
                         "services", "feeds"}  # the first seven are the contract; three were added (issue #15)
    assert body["ts"] == clock.now


# -- risk's stored state ----------------------------------------------------------------------

def store_state(db, ts: int, state: TradingState, code: str, reason: str, by: str) -> None:
    """A STATE row as risk's Outbox writes it."""
    outbox = Outbox()
    outbox.state_change(StateChange(ts, state, TradingState.ACTIVE, code, reason, by))
    with db.bind_ctx([RiskEvent]):
        for row in outbox.events:
            RiskEvent.create(**row)


def add_denial(db, ts: int) -> None:
    with db.bind_ctx([RiskEvent]):
        RiskEvent.create(ts=ts, kind="DENIED", code="SHABBAT", text="paused", client_order_id=f"c{ts}",
                         symbol="BTCUSDT", state="PAUSED_SHABBAT")


def test_no_state_change_stored_reads_active(client):
    assert client.get("/api/v1/status").get_json()["risk_state"] == {
        "state": "ACTIVE", "code": "", "reason": "", "by": "", "ts": None}


def test_the_newest_stored_state_change_is_shown_with_its_author(client, db):
    store_state(db, 100, TradingState.HALTED, "HALT", "maintenance [planned]", "api:ops")
    store_state(db, 200, TradingState.PAUSED_SHABBAT, "SHABBAT",
                "Shabbat: from Fri 2026-12-11 15:55 IST to Sat 2026-12-12 17:16 IST", "calendar")
    add_denial(db, 300)  # a later denial is not a state change
    assert client.get("/api/v1/status").get_json()["risk_state"] == {
        "state": "PAUSED_SHABBAT", "code": "SHABBAT",
        "reason": "Shabbat: from Fri 2026-12-11 15:55 IST to Sat 2026-12-12 17:16 IST", "by": "calendar",
        "ts": 200}
    store_state(db, 200, TradingState.HALTED, "HALT", "same instant, written after", "api")
    assert client.get("/api/v1/status").get_json()["risk_state"]["code"] == "HALT"


def test_a_state_row_without_an_author_keeps_its_whole_text(client, db):
    with db.bind_ctx([RiskEvent]):  # as an older risk wrote them
        RiskEvent.create(ts=5, kind="STATE", code="DAILY_LOSS", text="equity 9000", state="HALTED")
    assert client.get("/api/v1/status").get_json()["risk_state"] == {
        "state": "HALTED", "code": "DAILY_LOSS", "reason": "equity 9000", "by": "", "ts": 5}


def test_a_writer_in_the_middle_of_a_transaction_neither_blocks_the_status_nor_shows_through(client, db):
    store_state(db, 100, TradingState.HALTED, "HALT", "first", "api")
    assert client.get("/api/v1/status").get_json()["risk_state"]["reason"] == "first"
    with db.atomic():  # risk's flush, not committed yet: the read-only reader sees the last commit
        db.execute_sql("INSERT INTO risk_events (ts, kind, code, text, client_order_id, symbol, state) "
                       "VALUES (200, 'STATE', 'RESUME', 'second [by api]', '', '', 'ACTIVE')")
        assert client.get("/api/v1/status").get_json()["risk_state"]["reason"] == "first"
    assert client.get("/api/v1/status").get_json()["risk_state"]["reason"] == "second"


# -- metrics ------------------------------------------------------------------------------------

SHABBAT_START_S, SHABBAT_END_S = 1_796_997_300, 1_797_088_560  # Fri 2026-12-11 13:55, Sat 15:16 UTC


@pytest.mark.parametrize("at, paused, flattening, start, end", [
    ("2026-12-10T12:00", 0, 0, SHABBAT_START_S, SHABBAT_END_S),
    ("2026-12-11T15:45", 0, 1, SHABBAT_START_S, SHABBAT_END_S),
    ("2026-12-12T12:00", 1, 0, SHABBAT_START_S, SHABBAT_END_S),  # the current pause
    ("2026-12-12T17:16", 0, 0, SHABBAT_START_S + 7 * 86_400 + 120, SHABBAT_END_S + 7 * 86_400 + 180),
])
def test_metrics_give_the_phase_and_the_current_or_next_pause(client, clock, at, paused, flattening, start, end):
    clock.now = ns(at)
    assert gauges(client) == {'qf_trading_paused{reason="shabbat"}': paused, "qf_shabbat_flattening": flattening,
                              "qf_shabbat_next_start_timestamp_seconds": start,
                              "qf_shabbat_next_end_timestamp_seconds": end}
