"""Settings refused at load, before anything starts: values each valid alone that contradict each
other, addresses two sockets would share, ports outside 1..65535, non-ASCII digits and symbols,
an empty or unreadable QF_DB / QF_RUN_DIR. One line naming the variables, exit status 2."""
import subprocess
import sys

import pytest

from shared import config
from shared.errors import ConfigError
from tests.conftest import ROOT, clean_environ, tcp_env

START_TIMEOUT_S = 60
ZERO_WEIGHTS = {"QF_STRATEGY_W_OFI": "0", "QF_STRATEGY_W_OFI_L1": "0", "QF_STRATEGY_W_FLOW": "0",
                "QF_STRATEGY_W_DEPTH": "0", "QF_STRATEGY_W_MICRO": "0"}


def refused(env: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as err:
        config.load(env)
    text = str(err.value)
    assert "\n" not in text
    return text


# -- pairs that contradict each other ----------------------------------------------------------------

@pytest.mark.parametrize("env, names", [
    (ZERO_WEIGHTS, ["QF_STRATEGY_W_OFI", "_W_MICRO", "at least one score weight must be positive"]),
    ({"QF_RISK_MIN_NOTIONAL": "1000", "QF_RISK_MAX_ORDER_NOTIONAL": "10"},
     ["QF_RISK_MIN_NOTIONAL", "_MAX_ORDER_NOTIONAL", "no order could pass"]),
    ({"QF_SYMBOLS": "btcusdt,ethusdt", "QF_RISK_MIN_NOTIONAL": "600",  # ethusdt takes the global pair
      "QF_RISK_SYMBOL_LIMITS": "btcusdt min_notional=5"}, ["QF_RISK_MIN_NOTIONAL", "_MAX_ORDER_NOTIONAL"]),
    ({"QF_RISK_ORDERS_PER_S": "100", "QF_RISK_ORDERS_PER_MIN": "1"}, ["QF_RISK_ORDERS_PER_S", "_ORDERS_PER_MIN"]),
    ({"QF_STRATEGY_VOL_MIN_BPS": "10", "QF_STRATEGY_VOL_MAX_BPS": "1"},
     ["QF_STRATEGY_VOL_MIN_BPS", "_VOL_MAX_BPS"]),
    ({"QF_STRATEGY_CANCEL_SCORE": "0.9", "QF_STRATEGY_ENTRY_SCORE": "0.5"},
     ["QF_STRATEGY_CANCEL_SCORE", "_ENTRY_SCORE"]),
])
def test_contradicting_settings_are_refused_naming_both(env, names):
    text = refused(env)
    assert all(n in text for n in names), text


@pytest.mark.parametrize("env", [
    {**ZERO_WEIGHTS, "QF_STRATEGY_W_DEPTH": "1"},  # one weight is enough
    {**ZERO_WEIGHTS, "QF_STRATEGY_KIND": "imbalance"},  # the imbalance strategy has no score
    {"QF_STRATEGY_KIND": "imbalance", "QF_STRATEGY_VOL_MIN_BPS": "10", "QF_STRATEGY_VOL_MAX_BPS": "1"},
    {"QF_RISK_MIN_NOTIONAL": "10", "QF_RISK_MAX_ORDER_NOTIONAL": "10"},  # equal: one notional passes
    {"QF_RISK_MIN_NOTIONAL": "0", "QF_RISK_MAX_ORDER_NOTIONAL": "0"},
    {"QF_RISK_MIN_NOTIONAL": "600", "QF_RISK_SYMBOL_LIMITS": "btcusdt max_order_notional=1000"},  # its own pair
    {"QF_RISK_ORDERS_PER_S": "60", "QF_RISK_ORDERS_PER_MIN": "60"},
    {"QF_STRATEGY_VOL_MIN_BPS": "0", "QF_STRATEGY_VOL_MAX_BPS": "0"},
    {"QF_STRATEGY_CANCEL_SCORE": "0.5", "QF_STRATEGY_ENTRY_SCORE": "0.5"},
    {"QF_STRATEGY_CANCEL_SCORE": "-1", "QF_STRATEGY_ENTRY_SCORE": "0"},
])
def test_settings_at_the_edge_of_a_contradiction_are_accepted(env):
    config.load(env)


# -- addresses ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("env, first, second", [
    ({"QF_BROKER_REP": "tcp://127.0.0.1:5558"}, "QF_BROKER_REP", "QF_BROKER_PUB"),
    ({"QF_MD_PUB": "tcp://*:5556"}, "QF_MD_PUB", "QF_RISK_REP"),  # every address and one of them
    ({"QF_STRATEGY_PUB": "tcp://127.0.0.1:5560,tcp://127.0.0.1:5559"}, "QF_RISK_PUB", "QF_STRATEGY_PUB"),
    ({"QF_API_BIND": "127.0.0.1:5556"}, "QF_RISK_REP", "QF_API_BIND"),  # HTTP and ZeroMQ share the ports
    ({"QF_RISK_METRICS_BIND": "0.0.0.0:9101", "QF_BROKER_METRICS_BIND": "127.0.0.1:9101"},
     "QF_RISK_METRICS_BIND", "QF_BROKER_METRICS_BIND"),
    ({"QF_LOCKSTEP": "ipc:///tmp/qf-x/a.sock", "QF_RISK_PUB": "ipc:///tmp/qf-x/a.sock"}, "QF_RISK_PUB", "QF_LOCKSTEP"),
])
def test_two_binds_on_one_address_are_refused_naming_both(env, first, second):
    text = refused(env)
    assert f"{first} and {second} both bind" in text, text


@pytest.mark.parametrize("env", [
    {"QF_RISK_METRICS_BIND": "127.0.0.1:0", "QF_BROKER_METRICS_BIND": "127.0.0.1:0"},  # any free port
    {"QF_RISK_PUB": "tcp://10.0.0.2:5558"},  # another host's port 5558 (connected to, bound there)
    {"QF_MD_PUB": "tcp://*:5555"},
])
def test_distinct_addresses_are_accepted(env):
    config.load(env)


@pytest.mark.parametrize("key, value, needle", [
    ("QF_BROKER_PUB", "tcp://127.0.0.1:99999", "port between 1 and 65535"),
    ("QF_BROKER_PUB", "tcp://127.0.0.1:0", "port between 1 and 65535"),
    ("QF_BROKER_PUB", "tcp://127.0.0.1:*", "port between 1 and 65535"),  # nobody could connect to it
    ("QF_MD_PUB", "tcp://127.0.0.1:5555,tcp://127.0.0.1:70000", "port between 1 and 65535"),
    ("QF_BROKER_PUB", "ipc://", "not empty"),
    ("QF_MD_METRICS_BIND", "127.0.0.1:65536", "host:port"),
    ("QF_MD_METRICS_BIND", "127.0.0.1:１０", "host:port"),
    ("QF_API_BIND", "abc", "host:port"),
    ("QF_API_BIND", "127.0.0.1:0", "host:port"),
    ("QF_API_BIND", "", "host:port"),
    ("QF_HEARTBEAT_MS", "١٢٠٠", "ASCII digits"),
    ("QF_BOOK_DEPTH", "１０", "ASCII digits"),
    ("QF_ZMQ_HWM", "1_000_000", "ASCII digits"),
    ("QF_MD_WATCHDOG_S", "５", "ASCII digits"),
    ("QF_RISK_MAX_POSITION", "０.1", "ASCII digits"),
    ("QF_STRATEGY_WINDOWS_MS", "1000,５000", "ASCII digits"),
    ("QF_TELEGRAM_CHAT_IDS", "１２３", "chat id"),
    ("QF_NOTIFIER_REPORT_AT", "２1:00", "HH:MM"),
    ("QF_SYMBOLS", "ÉÉUSDT", "ASCII letters"),
    ("QF_SYMBOLS", "usdm:btcusdt,ｂｔｃusdt", "ASCII letters"),
    ("QF_RISK_SYMBOL_LIMITS", "ÉÉUSDT lot_size=0.1", "symbol"),
    ("QF_DB", "", "must not be empty"),
    ("QF_DB", "  ", "must not be empty"),
    ("QF_RUN_DIR", "", "must not be empty"),
    ("QF_DB", "mysql://u:pw@127.0.0.1:3306/db", "mysql:// is not a supported database"),
    ("QF_DB", "postgresql://u:pw@127.0.0.1:99999/db", "port"),
    ("QF_DB", "postgresql://u:pw@127.0.0.1:notaport/db", "port"),
    ("QF_DB", "postgresql://u:pw@[::1/db", "Invalid IPv6 URL"),
    ("QF_DB", "postgresql://u:pw@127.0.0.1:5432/", "names no database"),
])
def test_bad_values_are_refused_naming_the_setting(key, value, needle):
    text = refused({key: value})
    assert f"{key}=" in text and needle in text, text


@pytest.mark.parametrize("env", [
    {"QF_HEARTBEAT_MS": " 1200 ", "QF_BOOK_DEPTH": "+10", "QF_MD_WATCHDOG_S": "1e1", "QF_RISK_MAX_POSITION": ".5"},
    {"QF_DB": "postgresql://u:pw@[::1]:5432/db"}, {"QF_DB": "postgres://u@db/qf?sslmode=disable"},
    {"QF_DB": "sqlite:////tmp/qf.db"}, {"QF_DB": "relative/qf.db"},
    {"QF_API_BIND": "0.0.0.0:8080"}, {"QF_API_BIND": "[::1]:8080"},
])
def test_good_values_stay_accepted(env):
    config.load(env)


@pytest.mark.parametrize("url", ["postgresql://u:s3cretpw@[::1/db", "mysql://u:s3cretpw@127.0.0.1:1/db",
                                 "postgresql://u@127.0.0.1:99999/db?password=s3cretpw",
                                 "postgresql://u:s3cretpw@127.0.0.1:notaport/db"])
def test_a_refused_qf_db_never_shows_its_password(url):
    text = refused({"QF_DB": url})
    assert "s3cretpw" not in text and "***" in text, text


# -- the real processes: one line, exit 2, nothing started ---------------------------------------------

def run_qf(args: list[str], settings: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**clean_environ(), **settings, "PYTHONPATH": ROOT}, stdin=subprocess.DEVNULL,
                          timeout=START_TIMEOUT_S)


def one_line(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.parametrize("service, settings, needles", [
    ("strategy", ZERO_WEIGHTS, ["QF_STRATEGY_W_OFI", "score weight"]),
    ("broker", {"QF_BROKER_REP": "{QF_BROKER_PUB}"}, ["QF_BROKER_REP and QF_BROKER_PUB both bind"]),
    ("api", {"QF_API_BIND": "abc"}, ["QF_API_BIND='abc'"]),
    ("broker", {"QF_DB": ""}, ["QF_DB=''"]),
    ("broker", {"QF_RUN_DIR": ""}, ["QF_RUN_DIR=''"]),
    ("broker", {"QF_DB": "postgresql://u:s3cretpw@[::1/db"}, ["QF_DB=", "Invalid IPv6 URL"]),
    ("risk", {"QF_DB": "postgresql://u:s3cretpw@[::1/db"}, ["QF_DB=", "Invalid IPv6 URL"]),
    ("risk", {"QF_RISK_MIN_NOTIONAL": "1000", "QF_RISK_MAX_ORDER_NOTIONAL": "10"}, ["QF_RISK_MIN_NOTIONAL"]),
    ("marketdata", {"QF_HEARTBEAT_MS": "١٢٠٠"}, ["QF_HEARTBEAT_MS="]),
])
def test_a_service_refuses_the_configuration_in_one_line_with_exit_2(tmp_path, service, settings, needles):
    env = tcp_env(tmp_path)
    env.update({k: v.format(**env) for k, v in settings.items()})
    proc = run_qf([service], env)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    line = one_line(proc)
    assert all(n in line for n in needles), line
    assert "s3cretpw" not in proc.stderr + proc.stdout


@pytest.mark.parametrize("settings, needle", [
    (ZERO_WEIGHTS, "score weight"),
    ({"QF_BROKER_REP": "{QF_BROKER_PUB}"}, "QF_BROKER_REP and QF_BROKER_PUB both bind"),
    ({"QF_API_BIND": "abc"}, "QF_API_BIND"),
])
def test_qf_up_refuses_the_configuration_before_starting_anything(tmp_path, settings, needle):
    """Not a service restarted forever: `qf up` itself stops at the configuration, exit 2."""
    env = tcp_env(tmp_path)
    env.update({k: v.format(**env) for k, v in settings.items()})
    proc = run_qf(["up"], env)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    line = one_line(proc)
    assert line.startswith("qf up: ") and needle in line, line
    assert "starting" not in proc.stdout


def test_qf_up_refuses_a_symbol_group_whose_derived_port_another_binds(tmp_path):
    """Group 2's metrics port is group 1's + 10: here the strategy's own."""
    env = tcp_env(tmp_path, QF_SYMBOLS="btcusdt;ethusdt", QF_MD_METRICS_BIND="127.0.0.1:19101",
                  QF_STRATEGY_METRICS_BIND="127.0.0.1:19111")
    proc = run_qf(["up"], env)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stdout + proc.stderr
    assert ("QF_STRATEGY_METRICS_BIND (group 1) and QF_MD_METRICS_BIND (group 2) both bind 127.0.0.1:19111"
            in proc.stdout + proc.stderr), (proc.stdout, proc.stderr)
