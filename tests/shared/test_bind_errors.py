"""An endpoint a service cannot bind: one line naming it, exit 1 when a restart can help, 2 when only a person can."""
import socket
import subprocess
import sys

import pytest
import zmq

from bench.common import free_port
from shared.bus import bind
from shared.errors import BindError, ConfigError
from tests.conftest import ROOT, clean_environ, tcp_env

START_TIMEOUT_S = 60  # a service's start (imports, database, rebuild) and its exit


def run_service(name: str, settings: dict[str, str]) -> subprocess.CompletedProcess:
    """`qf NAME` with `settings`, to its exit (it is expected to fail at start)."""
    return subprocess.run([sys.executable, "-m", "services.cli", name], cwd=ROOT, capture_output=True, text=True,
                          env={**clean_environ(), **settings, "PYTHONPATH": ROOT}, stdin=subprocess.DEVNULL,
                          timeout=START_TIMEOUT_S)


def one_line(proc: subprocess.CompletedProcess) -> str:
    """The service's one line on stderr; no traceback anywhere."""
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.parametrize("service, key", [("broker", "QF_BROKER_PUB"), ("risk", "QF_RISK_REP")])
def test_a_service_whose_port_another_process_holds_exits_1_in_one_line_naming_it(tmp_path, service, key):
    settings = tcp_env(tmp_path)
    host, port = settings[key][len("tcp://"):].rsplit(":", 1)
    with socket.create_server((host, int(port))) as held:  # the previous run, not gone yet
        proc = run_service(service, settings)
    assert proc.returncode == 1  # `qf up` restarts it with a backoff
    line = one_line(proc)
    assert line.startswith(f"qf {service}: cannot bind {settings[key]} ({key}): address in use"), line


@pytest.mark.parametrize("endpoint, problem", [
    ("tcp://203.0.113.7:{port}", "not an address or interface of this machine"),  # TEST-NET-3: never ours
    ("tcp://no-such-host.invalid:{port}", "not an address or interface of this machine"),
    ("ipc://{tmp}/a-file/broker.sock", "the ipc path cannot be made"),
])
def test_an_endpoint_that_can_never_be_bound_here_exits_2_in_one_line(tmp_path, endpoint, problem):
    (tmp_path / "a-file").write_text("not a directory")
    endpoint = endpoint.format(port=free_port(), tmp=tmp_path)
    proc = run_service("broker", tcp_env(tmp_path, QF_BROKER_REP=endpoint))
    assert proc.returncode == 2  # a configuration error: `qf up` does not restart it
    line = one_line(proc)
    assert line.startswith(f"qf broker: cannot bind {endpoint} (QF_BROKER_REP): ") and problem in line, line


@pytest.mark.parametrize("endpoint", ["tcp://127.0.0.1:port", "tcp://127.0.0.1:99999", "tcp://127.0.0.1:0",
                                      "tcp://127.0.0.1:*", "tcp://127.0.0.1"])
def test_an_endpoint_without_a_port_of_1_to_65535_is_refused_at_load_in_one_line(tmp_path, endpoint):
    """Not at bind time (where :99999 would bind some free port nobody connects to): the config."""
    proc = run_service("broker", tcp_env(tmp_path, QF_BROKER_REP=endpoint))
    assert proc.returncode == 2
    line = one_line(proc)
    assert f"QF_BROKER_REP='{endpoint}'" in line and "port between 1 and 65535" in line, line


def test_bind_raises_typed_errors_and_leaves_the_socket_usable():
    ctx = zmq.Context()
    first, second = ctx.socket(zmq.PUB), ctx.socket(zmq.PUB)
    try:
        endpoint = f"tcp://127.0.0.1:{free_port()}"
        bind(first, endpoint)
        with pytest.raises(BindError, match="address in use"):
            bind(second, endpoint)
        with pytest.raises(ConfigError, match="not an endpoint"):
            bind(second, "tcp://127.0.0.1")
        assert not issubclass(BindError, ConfigError)  # exit status 1, restarted; a ConfigError is 2
        bind(second, f"tcp://127.0.0.1:{free_port()}")  # a failed bind left it as it was
    finally:
        first.close(0)
        second.close(0)
        ctx.term()
