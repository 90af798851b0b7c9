"""Every query of the Grafana dashboard (deploy/grafana/dashboards/quantumflow.json: each panel's
targets and each annotation) runs on a real Prometheus (Debian's package) scraping the API,
marketdata, risk, the broker and the strategy running as OS processes under `Stack` (what `qf up`
runs) on a replayed capture: Prometheus answers "success" for every one, and a non-empty result
for every one but those MAY_BE_EMPTY lists, whose metrics only appear after an event this run does
not cause. Grafana's own variables are replaced first, the way Grafana would."""
from __future__ import annotations

import json
import re
import time
import urllib.parse
from decimal import Decimal
from pathlib import Path

import pytest

from services.supervisor import Stack
from shared.db import PnlDayRow, PositionRow, close_db, init_db
from tests.conftest import SPOT_CAPTURE, clean_environ, free_port, tcp_env, wait_for
from tests.prometheus.test_scrape import PROMETHEUS, SERVICES, START_S, WORKING, Prometheus, prometheus_config

pytestmark = pytest.mark.e2e
DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards" / "quantumflow.json"
SCRAPE_S = 1.0  # prometheus_config's scrape interval
DATA_S = 30.0  # bound on a query's data appearing once its series exist (a rate needs two scrapes)
DAY_NS = 86_400 * 1_000_000_000
SEEDED = "ETHUSDT"  # the `positions` row this test writes: a symbol the stack does not trade

# (panel title, refId) -> why its result may be empty in this run; every other query must return data
MAY_BE_EMPTY = {
    ("Alerts raised (per 5 min)", "A"): "no service raises an alert on a healthy replay",
    ("Errors per minute", "E"): "the broker refuses no market data of the capture",
    ("Gaps, resyncs, stalls, reconnects (per 5 min)", "D"): "a replay never reconnects",
    ("Gaps, resyncs, stalls, reconnects (per 5 min)", "E"): "nor switches connections",
    ("Depth snapshots (per 5 min)", "A"): "a replay takes its snapshots from the capture, not from REST",
    ("Depth snapshots (per 5 min)", "B"): "no snapshot is held back",
    ("Depth snapshots (per 5 min)", "C"): "no REST answer, no used weight",
    ("Denials per minute by reason", "A"): "risk denies nothing here",
    ("Denials per minute by reason", "B"): "nor does anyone reject a strategy order",
    ("State changes (per hour)", "A"): "risk stays ACTIVE",
    ("Next pause starts", "A"): "QF_SHABBAT_PAUSE=false (a wall-clock test must not depend on the weekday)",
    ("Pause ends", "A"): "the same",
    ("annotation", "Risk state changes"): "risk stays ACTIVE",
    ("annotation", "Restarts"): "nothing restarts",
}

# (panel title, refId) -> its value for SEEDED (the row seed_positions writes): the panels' arithmetic
SEEDED_VALUES = {
    ("P&L by symbol", "B"): 11.0,  # realized 12.5 - fees 1.5
    ("P&L by symbol", "C"): 5.0,  # 0.5 × 3010 - 1500
    ("Round trips", "B"): 0.5,  # 1 win of 2
    ("Round trips", "C"): 20 / 6,  # gross win 20 over gross loss 6
    ("Maker share (fills)", "A"): 0.75,  # 3 of 4
    ("Maker share (notional)", "A"): 0.75,  # 9000 of 12000
    ("Mean slippage per fill", "A"): 0.3,  # 1.2 over 4 fills
    ("Slippage cost", "B"): 0.375,  # 1e4 × 0.45 / 12000 bp
}


def grafana_expr(expr: str, scrape_s: float = SCRAPE_S, interval_s: float = SCRAPE_S, range_s: float = 3600) -> str:
    """`expr` as Grafana sends it: its interval variables replaced ($__rate_interval is
    max($__interval + scrape interval, 4 × scrape interval)), and a dashboard variable by its
    "All" value (.*). The dashboard has none today (tests/test_compose.py could not send them)."""
    def dur(seconds: float) -> str:
        return f"{int(seconds * 1000)}ms"
    rate_s = max(interval_s + scrape_s, 4 * scrape_s)
    builtins = {"__rate_interval": dur(rate_s), "__interval": dur(interval_s),
                "__interval_ms": str(int(interval_s * 1000)), "__range": dur(range_s),
                "__range_s": str(int(range_s)), "__range_ms": str(int(range_s * 1000))}

    def sub(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        return builtins.get(name, ".*")
    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", sub, expr)


def test_grafana_variables_are_replaced_as_grafana_would():
    assert grafana_expr("rate(x[$__rate_interval])") == "rate(x[4000ms])"
    assert grafana_expr("rate(x[$__rate_interval])", scrape_s=15, interval_s=60) == "rate(x[75000ms])"
    assert grafana_expr('x{symbol=~"${symbol:regex}"}[$__range]') == 'x{symbol=~".*"}[3600000ms]'


def dashboard_queries() -> dict[tuple[str, str], str]:
    """(panel title, refId) or ("annotation", name) -> expr, for every query of the dashboard."""
    dash = json.loads(DASHBOARD.read_text())
    out = {(p["title"], t["refId"]): t["expr"] for p in dash["panels"] for t in p.get("targets", [])}
    out.update({("annotation", a["name"]): a["expr"] for a in dash["annotations"]["list"] if a.get("expr")})
    return out


def seed_positions(db_path: str, now_ns: int) -> None:
    """A `positions` row and today's (and tomorrow's, for a run across midnight UTC) `pnl_days`
    rows for SEEDED, as the broker keeps them for a symbol it fills: known figures for the panels'
    arithmetic (SEEDED_VALUES), maker fills and fees in another asset, whatever the replay's few
    fills were. Written after the broker started: it compares these tables with the fills only then."""
    db = init_db(db_path)
    try:
        with db.bind_ctx([PositionRow, PnlDayRow]):
            PositionRow.insert(
                symbol=SEEDED, qty=Decimal("0.5"), cost=Decimal("1500"), realized=Decimal("12.5"),
                fees=Decimal("1.5"), other_fees=json.dumps({"BNB": "0.001"}), fills=4, last_price=Decimal("3010"),
                last_ts=now_ns, trip_pnl=Decimal("2"), trips=2, wins=1, gross_win=Decimal("20"),
                gross_loss=Decimal("-6"), maker_fills=3, notional=Decimal("12000"), maker_notional=Decimal("9000"),
                slip_n=4, slip_sum=Decimal("1.2"), slip_cost=Decimal("0.45")).on_conflict_replace().execute()
            for day, fills in ((now_ns // DAY_NS, 4), (now_ns // DAY_NS + 1, 0)):
                PnlDayRow.insert(day=day, symbol=SEEDED, realized=Decimal("12.5") if fills else Decimal(0),
                                 fees=Decimal("1.5") if fills else Decimal(0), fills=fills, trips=2 if fills else 0,
                                 wins=1 if fills else 0, notional=Decimal("12000") if fills else Decimal(0),
                                 ).on_conflict_replace().execute()
    finally:
        db.close()
        close_db()


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus (Debian package prometheus, which `make sysdeps` "
                                               "installs) is not installed")
def test_every_dashboard_query_runs_on_the_services_metrics(tmp_path):
    queries = dashboard_queries()
    assert set(MAY_BE_EMPTY) <= set(queries), sorted(set(MAY_BE_EMPTY) - set(queries))
    ports = {name: free_port() for name in SERVICES}
    settings = tcp_env(tmp_path, QF_FEED=f"replay:{SPOT_CAPTURE}", QF_REPLAY_SPEED="5", QF_REPLAY_LOOP="true",
                       QF_STRATEGY_KIND="ofi",
                       **{var: f"127.0.0.1:{ports[name]}" for name, var in SERVICES.items()})
    ports["api"] = int(settings["QF_API_BIND"].rpartition(":")[2])
    stack = Stack({**clean_environ(), **settings, "PYTHONUNBUFFERED": "1"},
                  services=("broker", "risk", "api", "strategy", "marketdata"))
    prom = None
    try:
        stack.start()
        prom = Prometheus(tmp_path, prometheus_config(ports))

        def explained(what: str) -> str:
            return f"{what}; services' last lines: " + "; ".join(
                f"{c.name}: {c.tail[-1] if c.tail else '(none)'}" for c in stack.children)

        def answer(expr: str) -> list:
            """The instant vector of `expr`; fails unless Prometheus answers "success"."""
            reply = prom.get("/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
            assert reply is not None and reply["status"] == "success", (expr, reply)
            return reply["data"]["result"]

        assert set(ports) == {j["static_configs"][0]["labels"]["service"]
                              for j in prometheus_config(ports)["scrape_configs"]}
        for name in ports:
            wait_for(lambda: [r for r in prom.query(f'up{{job="quantumflow-{name}"}}') if r["value"][1] == "1"],
                     START_S, explained(f"prometheus to scrape {name}"), step=0.2)
        for name, expr in {**WORKING, "fills": "qf_broker_fills_total > 0",
                           "equity": 'qf_equity{job="quantumflow-api"}'}.items():
            wait_for(lambda: prom.query(expr), START_S, explained(f"{name}: {expr}"), step=0.2)
        seed_positions(settings["QF_DB"], time.time_ns())

        for key, expr in queries.items():
            answer(grafana_expr(expr))  # valid PromQL on these metrics, data or not
        # the rest must have data: polled together (a rate needs two scrapes of its series) to one deadline
        pending = {key: grafana_expr(expr) for key, expr in queries.items() if key not in MAY_BE_EMPTY}
        deadline = time.monotonic() + DATA_S
        while pending and time.monotonic() < deadline:
            pending = {key: expr for key, expr in pending.items() if not answer(expr)}
            if pending:
                time.sleep(0.2)  # polling interval of a bounded wait
        assert not pending, f"queries without data after {DATA_S} s: {pending}"

        # each read again (waiting, bounded, for the series): a scrape that failed on a busy machine
        # leaves its target's series stale, absent from an instant query, until the next one
        for key, value in SEEDED_VALUES.items():
            (got,) = wait_for(lambda: [r for r in answer(queries[key]) if r["metric"].get("symbol") == SEEDED],
                              DATA_S, f"{key}: the seeded symbol's series", step=0.2)
            assert float(got["value"][1]) == pytest.approx(value), (key, got)
        (state,) = wait_for(lambda: answer(queries[("Trading state", "A")]), DATA_S, "the trading state", step=0.2)
        assert state["value"][1] == "1", state  # ACTIVE, by the panel's value mappings
        synced = wait_for(lambda: answer(queries[("Book synced", "A")]), DATA_S, "the book synced", step=0.2)
        assert {r["metric"]["symbol"]: r["value"][1] for r in synced} == {"BTCUSDT": "1"}
    finally:
        if prom is not None:
            prom.stop()
        codes = stack.stop()
    assert all(code == 0 for code in codes.values()), codes

