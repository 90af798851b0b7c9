"""The stack under Docker Compose on this machine's engine: built offline, replaying the capture, under partition and crashes."""
from __future__ import annotations

import contextlib
import datetime
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from decimal import Decimal
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.docker.base_image import docker
from tests.docker.image import build_images
from tests.docker.stack import (APP_SERVICES, ComposeStack, docker_unavailable, leftovers, sweep_stale_projects,
                                wait_until)

# One compose project (a unique name) serves every test here, in file order; the last test
# takes it down and checks that nothing is left, and the fixture removes whatever remains
# even when a test fails. Skipped only when no Docker engine answers.
pytestmark = [pytest.mark.docker, pytest.mark.timeout(900)]  # the first test may build the base image

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "dashboards" / "quantumflow.json"
BROKER_TIMEOUT_MS = 500  # tests/docker/compose.test.yml: QF_RISK_BROKER_TIMEOUT_MS
RTT_SLACK_MS = 400  # + BROKER_TIMEOUT_MS stays under the strategy's 1000 ms: it never retried
PROBE_QTY = "1000"  # far over every limit: a probe is denied whether or not the book is fresh
PROBE = """
import json, sys, time
from decimal import Decimal
import zmq
from shared import messages
from shared.config import load
from shared.enums import OrderKind, Side
cfg = load()
sock = zmq.Context.instance().socket(zmq.REQ)
sock.setsockopt(zmq.LINGER, 0)
sock.connect(cfg.bus.risk_rep)
req = messages.OrderRequest(ts=time.time_ns(), client_order_id=sys.argv[1], strategy="probe",
                            symbol=cfg.md.symbols[0], side=Side.BUY, kind=OrderKind.MARKET, qty=Decimal(sys.argv[2]))
sock.send(messages.encode(req))
if not sock.poll(5000):
    print(json.dumps({"verdict": "NO_REPLY", "code": ""}))
    sys.exit()
reply = messages.decode(sock.recv(), messages.REQUESTS)
print(json.dumps({"verdict": str(getattr(getattr(reply, "verdict", None), "value", reply.TYPE)),
                  "code": (getattr(reply, "reason", None) or {}).get("code", "")}))
"""
CONNECT = """
import json, socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()
    print(json.dumps("connected"))
except OSError as exc:
    print(json.dumps(type(exc).__name__))
"""


# every container of the default compose file: the notifier too (a root-owned outbox volume once
# restart-looped it while the others were healthy)
SERVICES = (*APP_SERVICES, "notifier")


@pytest.fixture(scope="module")
def stack():
    reason = docker_unavailable()
    if reason:
        pytest.skip(f"container tests need a Docker engine: {reason}")
    sweep_stale_projects()
    images = build_images(prometheus=True)
    st = ComposeStack(images, api_port=free_port(), prometheus_port=free_port())
    try:
        st.up()
        st.wait_healthy(SERVICES, 120)
        yield st
    finally:
        st.destroy()


@contextlib.contextmanager
def explained(st: ComposeStack):
    """Append every container's state and last log lines to a failure."""
    try:
        yield
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{st.describe()}") from None


def api(st: ComposeStack, path: str) -> tuple[int, object]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{st.api_port}{path}", timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, None
    except (OSError, ValueError):
        return 0, None


def results(st: ComposeStack) -> list[dict[str, str]]:
    """The strategy's `order_result` lines (one per order, with risk's verdict and reason)."""
    return st.events("strategy", "order_result")


def filled(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [r for r in rows if r.get("verdict") in ("APPROVED", "ADJUSTED") and Decimal(r.get("filled_qty") or 0)]


def wait_for_new_fill(st: ComposeStack, after: int, timeout: float = 90) -> list[dict[str, str]]:
    """Strategy results once one past index `after` was filled (trading goes on)."""
    return wait_until(lambda: (rows := results(st)) and filled(rows[after:]) and rows, timeout,
                      "the strategy to get a new fill")


def sent_ms(row: dict[str, str]) -> int:
    """When the strategy sent the order (ms since the epoch): its result's log time less risk's round trip."""
    t = datetime.datetime.strptime(row["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=datetime.timezone.utc)
    return int(t.timestamp() * 1000) - int(row["risk_rtt_us"]) // 1000


def probe(st: ComposeStack, tag: str) -> dict[str, str]:
    """Send risk an oversized order from the strategy's container: always denied, never filled."""
    return st.python("strategy", PROBE, f"probe-{tag}-{time.time_ns()}", PROBE_QTY)


def count(st: ComposeStack, table: str) -> int:
    return st.sql(f"select count(*) from {table}")[0][0]


# -- (3) up, health, fills through the API --------------------------------------------------------

def test_stack_comes_up_healthy_and_trades(stack):
    with explained(stack):
        wait_until(lambda: api(stack, "/health")[0] == 200, 60, "/health = 200 on the published port")
        body = wait_until(lambda: (r := api(stack, "/api/v1/trades?limit=1000"))[0] == 200 and r[1]["trades"]
                          and r[1], 120, "fills through the API")
        for trade in body["trades"]:
            assert isinstance(trade["price"], str) and isinstance(trade["qty"], str), trade  # exact money
            Decimal(trade["price"]), Decimal(trade["qty"])
        status, positions = api(stack, "/api/v1/positions")
        assert status == 200 and "BTCUSDT" in json.dumps(positions)
        stored = {row[0] for row in stack.sql("select fill_id from fills")}
        assert {t["fill_id"] for t in body["trades"]} <= stored
        for service in SERVICES:
            assert stack.health(service) == "healthy", service
            assert stack.restarts(service) == 0, service


def test_broker_order_port_is_reachable_from_risk_only(stack):
    """The strategy has no way to the broker's order port; risk has one."""
    with explained(stack):
        ip = f"{stack.orders_net}.10"
        assert stack.networks_of("strategy") == {"bus"}
        assert stack.networks_of("broker") == stack.networks_of("risk") == {"bus", "orders"}
        assert stack.python("risk", CONNECT, "broker-orders", "5557", "3") == "connected"
        assert stack.python("strategy", CONNECT, "risk", "5556", "3") == "connected"  # the probe works
        for host in ("broker-orders", "broker", ip):
            got = stack.python("strategy", CONNECT, host, "5557", "3")
            assert got != "connected", f"strategy reached the broker's order port at {host}:5557"


def test_monitoring_profile_scrapes_the_api(stack):
    """Prometheus (Debian's package on the local base: prom/prometheus cannot be pulled
    here) scrapes the API, and every query of the Grafana dashboard is valid PromQL
    with data. Grafana itself is not started: its image cannot be pulled either."""
    with explained(stack):
        stack.up("prometheus", profiles=("monitoring",))
        base = f"http://127.0.0.1:{stack.prometheus_port}"

        def query(expr: str) -> dict | None:
            try:
                url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
                with urllib.request.urlopen(url, timeout=5) as resp:
                    return json.loads(resp.read())
            except (OSError, ValueError):
                return None

        wait_until(lambda: (r := query('up{job="quantumflow-api"}')) and r["data"]["result"]
                   and r["data"]["result"][0]["value"][1] == "1", 90, "prometheus to scrape the api")
        dashboard = json.loads(DASHBOARD.read_text())
        exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
        assert exprs
        for expr in exprs:
            reply = query(expr)
            assert reply and reply["status"] == "success", (expr, reply)
        fills = query("qf_fills_total")["data"]["result"]
        assert fills and float(fills[0]["value"][1]) > 0
        # marketdata's own /metrics, scraped over the bus network
        wait_until(lambda: (r := query('qf_md_books_published_total{job="quantumflow-marketdata"}'))
                   and r["data"]["result"] and float(r["data"]["result"][0]["value"][1]) > 0, 90,
                   "prometheus to scrape marketdata's book counter")
        # risk's, the broker's and the strategy's own /metrics (QF_*_METRICS_BIND), over `bus` too
        for expr in ('sum(qf_risk_trading_state{job="quantumflow-risk"}) == 1',  # one state, whichever
                     'qf_broker_store_available{job="quantumflow-broker"} == 1',
                     'qf_strategy_books_total{job="quantumflow-strategy"} > 0'):
            wait_until(lambda: (r := query(expr)) and r["data"]["result"], 90, f"prometheus to see {expr}")
        # and the alert rules (deploy/alerts.yml, mounted beside prometheus.yml) are loaded
        with urllib.request.urlopen(f"{base}/api/v1/rules", timeout=5) as resp:
            groups = json.loads(resp.read())["data"]["groups"]
        assert {g["name"] for g in groups} >= {"quantumflow-services", "quantumflow-feed", "quantumflow-risk",
                                              "quantumflow-broker"}


# -- (4) faults -------------------------------------------------------------------------------------

def test_broker_partition_fails_closed_then_trading_resumes(stack):
    """`docker network disconnect` the broker from `orders`: risk answers BROKER_UNAVAILABLE
    after its broker timeout, nothing is filled; reconnect: fills resume by themselves."""
    with explained(stack):
        start = len(wait_for_new_fill(stack, len(results(stack))))
        stack.disconnect("broker", "orders")
        cut_ms = time.time_ns() // 1_000_000  # the containers share this host's clock
        try:
            def unavailable():
                rows = results(stack)[start:]
                denied = [r for r in rows if r.get("reason") == "BROKER_UNAVAILABLE"]
                return denied if len(denied) >= 4 else None
            wait_until(unavailable, 60, "BROKER_UNAVAILABLE rejections")
            fills_at_first = count(stack, "fills")
            denied = wait_until(lambda: (d := unavailable()) and len(d) >= 7 and d, 60, "more rejections")
            assert count(stack, "fills") == fills_at_first, "a fill while the broker was unreachable"
            for row in denied:
                assert row["verdict"] == "REJECTED", row
                # risk answers by its broker timeout (at once when it knows the link is down);
                # the slack is for a busy machine, and stays inside the strategy's own timeout
                assert int(row["risk_rtt_us"]) / 1000 <= BROKER_TIMEOUT_MS + RTT_SLACK_MS, row
            # An order sent before the cut was done may have reached the broker and lost its
            # answer (or, on a busy machine, been denied by a slow answer before the cut). None
            # sent after it may: risk replaces the socket the cut broke once its requests have
            # timed out, and its IMMEDIATE socket queues nothing for an unreachable broker.
            later = [r["cid"] for r in denied if sent_ms(r) > cut_ms + 1]  # the log's ms
            assert len(later) >= 4, denied
            marks = ",".join("?" * len(later))
            assert stack.sql(f"select client_order_id from orders where client_order_id in ({marks})",
                             tuple(later)) == []
            assert stack.health("broker") == "healthy"  # alive on `bus`, only cut from risk
        finally:
            stack.connect("broker", "orders", ip=f"{stack.orders_net}.10", aliases=["broker-orders"])
        cut = len(results(stack))
        wait_for_new_fill(stack, cut, timeout=60)
        assert count(stack, "fills") > fills_at_first


def test_broker_crash_loses_no_acknowledged_fill(stack):
    """SIGKILL the broker's process mid-flow: the restart policy brings it back, it
    rebuilds from the database, and every fill the strategy was told of is stored once."""
    with explained(stack):
        wait_for_new_fill(stack, len(results(stack)))
        before = stack.restarts("broker")
        stack.crash("broker")
        wait_until(lambda: stack.restarts("broker") == before + 1 and stack.health("broker") == "healthy", 90,
                   "the restart policy to bring the broker back, healthy")
        assert sum(" event=rebuilt " in f"{line} " for line in stack.logs("broker")) == before + 2
        wait_for_new_fill(stack, len(results(stack)), timeout=90)
        acked = filled(results(stack))
        assert acked
        per_cid = {cid: n for cid, n in stack.sql("select client_order_id, count(*) from orders group by 1")}
        fills: dict[str, Decimal] = {}
        for cid, qty in stack.sql("select client_order_id, qty from fills"):
            fills[cid] = fills.get(cid, Decimal(0)) + Decimal(qty)
        for row in acked:
            assert per_cid.get(row["cid"]) == 1, row
            assert fills.get(row["cid"]) == Decimal(row["filled_qty"]), (row, fills.get(row["cid"]))
        dupes = stack.sql("select fill_id from fills group by fill_id having count(*) > 1")
        assert dupes == []


def test_marketdata_kill_stops_trading_until_resync(stack):
    """`docker kill` marketdata (a stop the restart policy respects): books go stale, risk
    denies STALE_BOOK and the strategy sends nothing; `docker start`: it resyncs and trades."""
    with explained(stack):
        wait_for_new_fill(stack, len(results(stack)))
        stack.kill("marketdata")
        assert not stack.state("marketdata")["Running"]
        wait_until(lambda: probe(stack, "stale")["code"] == "STALE_BOOK", 30, "risk to deny STALE_BOOK")
        quiet = len(results(stack))
        orders = count(stack, "orders")
        # Stale for a while longer: still denied, and the strategy (no books) sent nothing.
        since = time.monotonic()
        wait_until(lambda: time.monotonic() > since + 3 and probe(stack, "still")["code"] == "STALE_BOOK", 30,
                   "STALE_BOOK still, three seconds later")
        assert len(results(stack)) == quiet, "the strategy traded while marketdata was down"
        assert count(stack, "orders") == orders
        assert stack.restarts("marketdata") == 0 and not stack.state("marketdata")["Running"]
        synced = len(stack.events("marketdata", '"book state"'))
        stack.start("marketdata")
        wait_until(lambda: any(e.get("state") == "SYNCED" for e in stack.events("marketdata", '"book state"')[synced:]),
                   60, "marketdata to resync after its start")
        wait_until(lambda: (r := probe(stack, "fresh"))["verdict"] != "NO_REPLY" and r["code"] != "STALE_BOOK",
                   30, "fresh books at risk")
        wait_for_new_fill(stack, quiet, timeout=90)


# -- (3) down -v leaves nothing --------------------------------------------------------------------

def test_down_removes_containers_networks_and_volumes(stack):
    mounted = stack.volumes()
    assert any(name.endswith("_qfdata") for name in mounted), mounted
    stack.down()
    assert leftovers(stack.project) == {"containers": [], "networks": [], "volumes": []}
    remaining = set(docker("volume", "ls", "-q").stdout.split())
    assert not mounted & remaining, "anonymous volumes of the project's containers were left"
