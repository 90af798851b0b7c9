"""A black-box tester's findings, over a real SQLite file: /stats follows its window, cursors are
checked (endpoint and integrity), refusals speak JSON's and the API's words (no Python internals),
equity's range and widened interval are said, and a damaged money value is never served."""
from __future__ import annotations

import sqlite3
from contextlib import closing

import pytest

from services.control import queries
from tests.services.api.test_app import error_of
from tests.services.api.test_control import auth, settings

T0 = 1_800_000_000_000_000_000  # 2027-01-15T08:00:00Z
S = 1_000_000_000


def fill_db(add_fill) -> None:
    """Two round trips of BTCUSDT (one win, one loss), 4 fills a minute apart from T0."""
    add_fill("BTCUSDT", "BUY", "1", "100", fee="0.1", ts=T0)
    add_fill("BTCUSDT", "SELL", "1", "110", fee="0.11", ts=T0 + 60 * S)  # +9.79
    add_fill("BTCUSDT", "BUY", "2", "100", fee="0.2", ts=T0 + 120 * S)
    add_fill("BTCUSDT", "SELL", "2", "99", fee="0.198", ts=T0 + 180 * S)  # -2.398


def sql(api_config, statement: str, *params) -> None:
    with closing(sqlite3.connect(api_config.common.db)) as con, con:
        con.execute(statement, params)


# -- 1. /stats follows its window ----------------------------------------------------------------

def test_stats_without_a_window_are_all_time(client, add_fill):
    fill_db(add_fill)
    body = client.get("/api/v1/stats").get_json()
    assert (body["fills"], body["round_trips"], body["wins"], body["losses"]) == (4, 2, 1, 1)
    assert (body["notional"], body["fees"]) == ("608", {"USDT": "0.608"})
    assert body["window"] == {"from": None, "to": None, "applies_to": list(queries.STATS_WINDOWED),
                              "all_time": list(queries.STATS_ALL_TIME)}
    # a window holding every fill gives the same fill figures, from the fills themselves
    whole = client.get(f"/api/v1/stats?from=0&to={T0 + 3600 * S}").get_json()
    for key in queries.STATS_WINDOWED:
        assert whole[key] == body[key], key
    # (that window is answered from the tallies; read fill by fill it gives the same figures)
    rows = list(queries.PositionRow.select(
        queries.PositionRow.symbol, queries.PositionRow.fills, queries.PositionRow.trips, queries.PositionRow.wins,
        queries.PositionRow.gross_win, queries.PositionRow.gross_loss, queries.PositionRow.maker_fills,
        queries.PositionRow.notional, queries.PositionRow.maker_notional, queries.PositionRow.slip_n,
        queries.PositionRow.slip_sum, queries.PositionRow.slip_cost).tuples())
    assert queries._window_fills(0, 2**63 - 1) == queries._all_time_fills(queries.positions(), rows)


@pytest.mark.parametrize("query", ["from=2030-01-01T00:00:00Z", "to=2020-01-01T00:00:00Z",
                                   "from=2027-01-15T20:00:00Z&to=2027-01-15T19:00:00Z", f"from={T0}&to={T0}"])
def test_stats_over_an_empty_window_have_no_fills(client, add_fill, add_equity, query):
    fill_db(add_fill)
    add_equity(T0, "10000", "10000")
    add_equity(T0 + 3600 * S, "10010", "10010")
    body = client.get(f"/api/v1/stats?{query}").get_json()
    assert (body["fills"], body["notional"], body["fees"], body["maker_share"]) == (0, "0", {}, None)
    assert body["slippage"] == {"fills": 0, "mean_per_unit": None, "cost": "0", "cost_bps": None}
    assert body["equity"]["hourly_closes"] == 0
    # the round trips are all time whatever the window, and the answer says so
    assert body["round_trips"] == 2 and "round_trips" in body["window"]["all_time"]
    assert "fills" in body["window"]["applies_to"] and "round_trips" not in body["window"]["applies_to"]


def test_stats_over_part_of_the_fills(client, add_fill):
    fill_db(add_fill)
    body = client.get(f"/api/v1/stats?from={T0 + 60 * S}&to={T0 + 180 * S}").get_json()  # the 2nd and 3rd fills
    assert (body["fills"], body["notional"], body["fees"]) == (2, "310", {"USDT": "0.31"})
    assert body["window"]["from"] == T0 + 60 * S and body["window"]["to"] == T0 + 180 * S
    rfc = client.get("/api/v1/stats?from=2027-01-15T08:01:00Z&to=2027-01-15T08:03:00Z").get_json()
    assert rfc["fills"] == 2 and rfc["notional"] == "310"


def test_the_window_reads_the_fills_over_the_ts_index(db):
    plan = " ".join(str(r) for r in db.execute_sql(
        "EXPLAIN QUERY PLAN " + queries._FILL_STATS.format(p="?"), (0, 1)).fetchall())
    assert "USING INDEX" in plan and "SCAN fills" not in plan.replace("USING INDEX", ""), plan


# -- 2. cursors the API did not make -------------------------------------------------------------

def test_cursors_page_through_and_refuse_what_this_endpoint_did_not_give(client, add_fill, add_order):
    for i in range(5):
        add_fill("BTCUSDT", "BUY", "1", "10", ts=T0 + i)
    for _ in range(3):
        add_order("FILLED")
    first = client.get("/api/v1/trades?limit=2").get_json()
    cursor = first["next_cursor"]
    second = client.get(f"/api/v1/trades?limit=2&cursor={cursor}").get_json()
    assert [t["ts"] for t in first["trades"] + second["trades"]] == [T0 + 4, T0 + 3, T0 + 2, T0 + 1]
    orders_cursor = client.get("/api/v1/orders?limit=1").get_json()["next_cursor"]
    assert client.get(f"/api/v1/orders?limit=1&cursor={orders_cursor}").status_code == 200
    edited = cursor[:-1] + ("0" if cursor[-1] != "0" else "1")
    forged = cursor.replace(cursor.split(".")[1], "7fffffffffffffff")
    for path, bad in [("trades", "1.5"), ("trades", "7fffffffffffffff.zzz"), ("trades", edited),
                      ("trades", forged), ("orders", cursor), ("trades", orders_cursor), ("signals", cursor),
                      ("trades", "t." + cursor), ("trades", cursor + "0"), ("trades", "x" * 300)]:
        body = error_of(client.get(f"/api/v1/{path}?cursor={bad}"), 400)
        assert body == {"code": "bad_param",
                        "message": "cursor: not one this endpoint gave (pass the next_cursor of its previous page)"}, \
            (path, bad, body)


# -- 3. messages without Python internals ---------------------------------------------------------

@pytest.mark.parametrize("body,kind", [("null", "null"), ("[]", "an array"), ('"x"', "a string"), ("5", "a number"),
                                       ("1.5", "a number"), ("true", "true/false")])
def test_a_control_body_that_is_not_an_object_says_what_it_is(tmp_path, body, kind):
    from services.api.app import create_app
    from shared.config import load
    api = create_app(load(settings(tmp_path))).test_client()
    resp = api.post("/api/v1/control", data=body, content_type="application/json", headers=auth())
    assert error_of(resp, 400)["message"] == f"the body must be a JSON object, not {kind}"
    resp = api.post("/api/v1/control", json={"action": None, "reason": "x"}, headers=auth())
    assert error_of(resp, 400)["message"] == "action must be HALT, RESUME or FLATTEN, got null"


def test_a_lone_surrogate_reason_is_named_as_such(tmp_path):
    from services.api.app import create_app
    from shared.config import load
    api = create_app(load(settings(tmp_path))).test_client()
    resp = api.post("/api/v1/control", data=b'{"action": "HALT", "reason": "\\ud800"}',
                    content_type="application/json", headers=auth())
    assert error_of(resp, 400)["message"] == "reason holds a character UTF-8 cannot carry (a lone surrogate)"


@pytest.mark.parametrize("value,message", [
    ("2026-12-07T20:00:00%2B99:00", "from: not a real time: offset +99:00 is not between -23:59 and +23:59"),
    ("2026-12-07T20:00:00-24:00", "from: not a real time: offset -24:00 is not between -23:59 and +23:59"),
    ("2026-12-07T20:00:00%2B05:60", "from: not a real time: offset +05:60 is not between -23:59 and +23:59"),
    ("2026-02-30T00:00:00Z", "from: not a real time: day 30 is not between 01 and 28 in 2026-02"),
    ("2026-13-01T00:00:00Z", "from: not a real time: month 13 is not between 01 and 12"),
    ("2026-12-07T24:00:00Z", "from: not a real time: hour 24 is not between 00 and 23"),
    ("0000-01-01T00:00:00Z", "from: not a real time: year 0000 is before 0001"),
])
def test_an_unreal_time_is_said_in_the_apis_words(client, value, message):
    body = error_of(client.get(f"/api/v1/equity?from={value}"), 400)
    assert body["message"] == message
    assert "timedelta" not in body["message"]


def test_an_offset_at_the_edges_is_taken(client):
    assert client.get("/api/v1/equity?from=2026-12-07T20:00:00%2B23:59").status_code == 200
    assert client.get("/api/v1/equity?from=2026-12-07T20:00:00-23:59").status_code == 200


@pytest.mark.parametrize("limit", ["1001", "9223372036854775808", "99999999999999999999999999", "9" * 5000])
def test_a_limit_over_the_maximum_says_so_whatever_its_size(client, limit):
    for path in ("trades", "orders", "signals"):
        assert error_of(client.get(f"/api/v1/{path}?limit={limit}"), 400)["message"] == "limit: over the maximum 1000"
    assert error_of(client.get("/api/v1/trades?limit=0"), 400)["message"] == "limit: under the minimum 1"
    assert client.get("/api/v1/trades?limit=00000000000000000000005").status_code == 200  # leading zeros: 5


def test_a_time_of_many_digits_is_clamped_like_any_other(client, add_fill):
    add_fill("BTCUSDT", "BUY", "1", "10", ts=T0)
    assert client.get(f"/api/v1/trades?to={'9' * 30}").get_json()["count"] == 1


# -- 4. equity: the default range and a widened interval, said ----------------------------------

def test_equity_default_from_is_never_before_the_epoch(client):
    body = client.get("/api/v1/equity?to=1").get_json()
    assert (body["from"], body["to"], body["points"]) == (0, 1, [])


def test_a_widened_interval_is_said_in_the_answer(client):
    body = client.get("/api/v1/equity?from=0&to=1800000000000000000&interval=1m").get_json()
    assert body["requested_interval_s"] == 60 and body["interval_widened_from"] == 60
    assert body["interval_s"] == 3_628_800
    assert body["note"].startswith("interval 1m would make 30,000,000 points over this range")
    assert "widened to 3628800 s, at most 500 points" in body["note"]
    kept = client.get("/api/v1/equity?from=0&to=600000000000&interval=1m").get_json()  # 10 points: as asked
    assert (kept["interval_s"], kept["interval_widened_from"], kept["note"]) == (60, None, None)
    auto = client.get("/api/v1/equity?from=0&to=1800000000000000000").get_json()  # auto: not widened from anything
    assert auto["interval_widened_from"] is None and auto["requested_interval_s"] is None


# -- 5. a damaged value is not served as money -----------------------------------------------------

NOT_AN_AMOUNT = "the database holds a value that is not an amount: "


def test_a_damaged_equity_value_is_503(client, add_equity, api_config):
    row = add_equity(T0, "10000", "10000")
    sql(api_config, "UPDATE equity SET equity = 'NaN' WHERE id = ?", row.id)
    for path in (f"/api/v1/equity?from={T0}&to={T0 + 1}", "/api/v1/pnl", "/api/v1/status", "/api/v1/stats",
                 f"/api/v1/stats?from={T0}"):
        body = error_of(client.get(path), 503)
        assert body == {"code": "db_unavailable", "message": f"{NOT_AN_AMOUNT}equity.equity of the row {row.id}"}, path


@pytest.mark.parametrize("column,value", [("price", "abc"), ("fee", "1e999"), ("qty", "Infinity"),
                                          ("slippage_arrival", " 1"), ("price", "")])
def test_a_damaged_fill_is_503_on_its_page_and_in_a_window(client, add_fill, api_config, column, value):
    fill_db(add_fill)
    sql(api_config, f"UPDATE fills SET {column} = ? WHERE fill_id = 'f0002'", value)
    message = f"{NOT_AN_AMOUNT}fills.{column} of the row f0002"
    assert error_of(client.get("/api/v1/trades"), 503) == {"code": "db_unavailable", "message": message}
    assert error_of(client.get("/api/v1/trades?format=csv"), 503)["message"] == message
    assert error_of(client.get(f"/api/v1/stats?from={T0 + 1}"), 503)["message"] == message  # read fill by fill
    assert client.get("/api/v1/trades?limit=1").status_code == 200  # the page without it is served
    assert client.get(f"/api/v1/stats?from={T0 + 120 * S}").status_code == 200


def test_a_damaged_position_is_503(client, add_fill, api_config):
    fill_db(add_fill)
    sql(api_config, "UPDATE positions SET realized = 'NaN'")
    message = f"{NOT_AN_AMOUNT}positions.realized of the row BTCUSDT"
    for path in ("/api/v1/positions", "/api/v1/pnl", "/api/v1/status"):
        assert error_of(client.get(path), 503) == {"code": "db_unavailable", "message": message}, path


def test_a_damaged_order_is_503(client, add_order, api_config):
    add_order("FILLED")
    sql(api_config, "UPDATE orders SET filled_qty = '1e5'")
    assert error_of(client.get("/api/v1/orders"), 503)["message"] == f"{NOT_AN_AMOUNT}orders.filled_qty of the row ord1"


def test_todays_pnl_is_served_and_a_damaged_day_is_503(client, add_fill, api_config):
    import time
    now = time.time_ns()
    add_fill("BTCUSDT", "BUY", "1", "100", fee="0.1", ts=now - 2 * S)
    add_fill("BTCUSDT", "SELL", "1", "101", fee="0.1", ts=now - S)
    today = client.get("/api/v1/pnl").get_json()["today"]
    if not today["fills"]:
        pytest.skip("the UTC day turned between the fills and the answer")
    assert (today["fills"], today["realized"], today["fees"]) == (2, "1", "0.2")
    sql(api_config, "UPDATE pnl_days SET fees = 'NaN'")
    day = now // queries.DAY_NS
    body = error_of(client.get("/api/v1/pnl"), 503)
    assert body["message"] == f"{NOT_AN_AMOUNT}pnl_days.fees of the row {day}/BTCUSDT"
