"""A QuantumFlow compose project on this machine's Docker engine: up, fault injection, logs, database, cleanup."""
from __future__ import annotations

import atexit
import ipaddress
import json
import os
import random
import re
import shlex
import subprocess
import time
from pathlib import Path
from typing import Callable

from tests.docker.base_image import ROOT, docker
from tests.docker.image import Images
from tests.conftest import wait_for

COMPOSE_FILES = (ROOT / "docker-compose.yml", ROOT / "docker-compose.replay.yml")
TEST_OVERRIDE = Path(__file__).resolve().parent / "compose.test.yml"
APP_SERVICES = ("marketdata", "broker", "risk", "strategy", "api")
PROJECT_PREFIX = "qft"  # qft<pid>x<random>: a leftover whose pid is gone is swept at the next start
LABEL = "com.docker.compose.project"
COMPOSE_ENV = "QUANTUMFLOW_COMPOSE"  # force a Compose flavour, e.g. "docker-compose"
_KV = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


def docker_unavailable() -> str | None:
    """None when a Docker engine answers, else the reason to skip container tests."""
    try:
        out = docker("version", "--format", "{{.Server.Version}}", timeout=30, check=False)
    except FileNotFoundError:
        return "the docker command is not installed"
    except subprocess.TimeoutExpired:
        return "the Docker engine did not answer within 30 s"
    if out.returncode != 0 or not out.stdout.strip():
        return f"no Docker engine answers: {(out.stderr or out.stdout).strip()[:200]}"
    if compose_command() is None:
        return "neither `docker compose` (v2) nor `docker-compose` (v1) is installed"
    return None


def compose_command() -> list[str] | None:
    """`docker compose` when the v2 plugin is there, else Debian's `docker-compose`."""
    forced = os.environ.get(COMPOSE_ENV)
    if forced:
        return shlex.split(forced)
    for cmd in (["docker", "compose"], ["docker-compose"]):
        try:
            if subprocess.run([*cmd, "version"], capture_output=True, timeout=30).returncode == 0:
                return cmd
        except (FileNotFoundError, subprocess.TimeoutExpired):
            continue
    return None


def parse_kv(line: str) -> dict[str, str]:
    """One key=value log line (shared/log.py) as a dict; quoted values unescaped."""
    out = {}
    for key, value in _KV.findall(line):
        if value.startswith('"'):
            value = value[1:-1].replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")
        out[key] = value
    return out


def _projects_in_use() -> set[str]:
    names = set()
    for kind in ("ps -a", "network ls", "volume ls"):
        out = docker(*kind.split(), "--filter", f"label={LABEL}", "--format", f'{{{{.Label "{LABEL}"}}}}',
                     check=False)
        names.update(out.stdout.split())
    return names


def sweep_stale_projects() -> list[str]:
    """Remove what test projects of dead processes left (a run killed before its cleanup)."""
    swept = []
    for name in _projects_in_use():
        m = re.fullmatch(rf"{PROJECT_PREFIX}(\d+)x[0-9a-f]+", name)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            remove_project(name)
            swept.append(name)
    return swept


def remove_project(project: str) -> None:
    """Force-remove every container, network and volume labelled with `project`."""
    flt = ["--filter", f"label={LABEL}={project}"]
    ids = docker("ps", "-aq", *flt, check=False).stdout.split()
    if ids:
        docker("rm", "-f", "-v", *ids, check=False, timeout=120)
    for kind in ("network", "volume"):
        ids = docker(kind, "ls", "-q", *flt, check=False).stdout.split()
        if ids:
            docker(kind, "rm", *ids, check=False, timeout=120)


def leftovers(project: str) -> dict[str, list[str]]:
    """Containers, networks and volumes still labelled with `project` (empty lists: clean)."""
    flt = ["--filter", f"label={LABEL}={project}"]
    return {"containers": docker("ps", "-aq", *flt).stdout.split(),
            "networks": docker("network", "ls", "-q", *flt).stdout.split(),
            "volumes": docker("volume", "ls", "-q", *flt).stdout.split()}


def _used_subnets() -> list[ipaddress.IPv4Network]:
    ids = docker("network", "ls", "-q").stdout.split()
    if not ids:
        return []
    out = docker("network", "inspect", "--format", "{{range .IPAM.Config}}{{.Subnet}} {{end}}", *ids)
    nets = []
    for text in out.stdout.split():
        try:
            nets.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            continue
    return [n for n in nets if n.version == 4]


def free_orders_net(rng: random.Random) -> str:
    """Three octets 10.247.X for the `orders` network that no Docker network overlaps."""
    used = _used_subnets()
    for x in rng.sample(range(256), 256):
        candidate = ipaddress.ip_network(f"10.247.{x}.0/28")
        if not any(candidate.overlaps(n) for n in used):
            return f"10.247.{x}"
    raise RuntimeError("no free 10.247.X.0/28 for the orders network")


class ComposeStack:
    """One compose project (a unique name per run) of the shipped files plus the replay override
    and tests/docker/compose.test.yml. `destroy()` (also registered with atexit) leaves nothing behind."""

    def __init__(self, images: Images, api_port: int, prometheus_port: int,
                 env: dict[str, str] | None = None) -> None:
        self.compose = compose_command()
        rng = random.Random()
        self.project = f"{PROJECT_PREFIX}{os.getpid()}x{rng.getrandbits(32):08x}"
        self.files = [*COMPOSE_FILES, TEST_OVERRIDE]
        self.api_port = api_port
        self.prometheus_port = prometheus_port
        self.orders_net = free_orders_net(rng)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("QF_", "COMPOSE_", "QUANTUMFLOW_"))}
        self.env.update({
            "QUANTUMFLOW_TEST_IMAGE": images.app,
            "QUANTUMFLOW_TEST_PROMETHEUS_IMAGE": images.prometheus or "prom/prometheus:v2.53.0",
            "QUANTUMFLOW_BASE_IMAGE": images.base,
            "QUANTUMFLOW_API_PORT": str(api_port),
            "QUANTUMFLOW_PROMETHEUS_PORT": str(prometheus_port),
            "QUANTUMFLOW_GRAFANA_PORT": "0",  # never started here: grafana/grafana cannot be pulled
            "QUANTUMFLOW_ORDERS_NET": self.orders_net,
            **(env or {}),
        })
        self._ids: dict[str, str] = {}
        self._destroyed = False
        self._profiles: set[str] = set()  # Compose v2's `down` only touches the profiles it is given
        atexit.register(self.destroy)

    # -- compose --------------------------------------------------------------------------

    def run(self, *args: str, profiles: tuple[str, ...] = (), timeout: float = 300,
            check: bool = True) -> subprocess.CompletedProcess:
        """`compose -p PROJECT -f ... [--profile P] ARGS` in the repository. Raises RuntimeError
        with the output (and every container's state) when `check` and it fails."""
        cmd = [*self.compose, "-p", self.project]
        for f in self.files:
            cmd += ["-f", str(f)]
        for p in profiles:  # a global option: before the subcommand
            cmd += ["--profile", p]
        out = subprocess.run([*cmd, *args], capture_output=True, text=True, cwd=ROOT, env=self.env,
                             timeout=timeout)
        if check and out.returncode != 0:
            raise RuntimeError(f"compose {' '.join(args[:2])} failed ({out.returncode}):\n{out.stdout[-3000:]}\n"
                               f"{out.stderr[-3000:]}\n{self.describe()}")
        return out

    def up(self, *services: str, profiles: tuple[str, ...] = (), timeout: float = 300) -> float:
        """`up -d --no-build` (each service after its dependencies are healthy); returns seconds taken."""
        started = time.monotonic()
        self._profiles.update(profiles)
        try:
            self.run("up", "-d", "--no-build", *services, profiles=profiles, timeout=timeout)
        except RuntimeError as exc:
            if "overlaps" not in str(exc) or services:
                raise
            # Another run took the same `orders` subnet a moment ago: once more with another.
            self.run("down", "-v", "--remove-orphans", timeout=180, check=False)
            self.orders_net = self.env["QUANTUMFLOW_ORDERS_NET"] = free_orders_net(random.Random())
            self.run("up", "-d", "--no-build", profiles=profiles, timeout=timeout)
        return time.monotonic() - started

    def down(self) -> None:
        """`down -v --remove-orphans`: containers, networks and volumes of this project."""
        self.run("down", "-v", "--remove-orphans", "--timeout", "10", profiles=tuple(sorted(self._profiles)),
                 timeout=180)

    def destroy(self) -> None:
        """down, then force-remove anything still labelled with the project; idempotent, never raises."""
        if self._destroyed:
            return
        self._destroyed = True
        try:
            self.run("down", "-v", "--remove-orphans", "--timeout", "5", profiles=tuple(sorted(self._profiles)),
                     timeout=180, check=False)
        except Exception:  # noqa: BLE001 - the forced removal below still runs
            pass
        try:
            remove_project(self.project)
        except Exception:  # noqa: BLE001 - cleanup at exit must not raise
            pass

    # -- containers -----------------------------------------------------------------------------

    def container(self, service: str) -> str:
        """The container id of `service` (found by compose's labels, the same for v1 and v2)."""
        if service not in self._ids:
            out = docker("ps", "-aq", "--filter", f"label={LABEL}={self.project}",
                         "--filter", f"label=com.docker.compose.service={service}")
            ids = out.stdout.split()
            if len(ids) != 1:
                raise RuntimeError(f"{service}: expected one container, found {ids}")
            self._ids[service] = ids[0]
        return self._ids[service]

    def inspect(self, service: str, fmt: str) -> str:
        return docker("inspect", "--format", fmt, self.container(service)).stdout.strip()

    def state(self, service: str) -> dict:
        return json.loads(self.inspect(service, "{{json .State}}"))

    def health(self, service: str) -> str:
        st = self.state(service)
        return (st.get("Health") or {}).get("Status", "none") if st.get("Running") else st.get("Status", "")

    def restarts(self, service: str) -> int:
        return int(self.inspect(service, "{{.RestartCount}}"))

    def volumes(self) -> set[str]:
        """Every volume mounted in this project's containers, the anonymous ones too (the
        image's VOLUME /data in services that mount no named volume there): compose labels
        only the named ones."""
        ids = docker("ps", "-aq", "--filter", f"label={LABEL}={self.project}").stdout.split()
        if not ids:
            return set()
        out = docker("inspect", "--format", '{{range .Mounts}}{{if eq .Type "volume"}}{{.Name}} {{end}}{{end}}',
                     *ids)
        return set(out.stdout.split())

    def networks_of(self, service: str) -> set[str]:
        nets = json.loads(self.inspect(service, "{{json .NetworkSettings.Networks}}"))
        return {name.removeprefix(f"{self.project}_") for name in nets}

    def network(self, name: str) -> str:
        return f"{self.project}_{name}"

    def logs(self, service: str) -> list[str]:
        """Every line the service's container wrote, across restarts of the same container."""
        out = docker("logs", self.container(service), timeout=60)
        return (out.stdout + out.stderr).splitlines()

    def events(self, service: str, event: str) -> list[dict[str, str]]:
        """The service's `event=NAME` log lines, parsed, in order."""
        return [parse_kv(line) for line in self.logs(service) if f" event={event} " in f"{line} "]

    def exec(self, service: str, args: list[str], input: str | None = None, timeout: float = 60,
             check: bool = True) -> subprocess.CompletedProcess:
        """`docker exec` in the service's container (as its own non-root user)."""
        flags = ["-i"] if input is not None else []
        out = subprocess.run(["docker", "exec", *flags, self.container(service), *args], input=input,
                             capture_output=True, text=True, timeout=timeout)
        if check and out.returncode != 0:
            raise RuntimeError(f"exec in {service} failed ({out.returncode}): {out.stderr[-2000:]}")
        return out

    def python(self, service: str, code: str, *args: str, timeout: float = 60) -> object:
        """Run `code` with the image's Python in `service`; its last stdout line parsed as JSON."""
        out = self.exec(service, ["python", "-", *args], input=code, timeout=timeout)
        return json.loads(out.stdout.strip().splitlines()[-1])

    def wait_healthy(self, services, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            states = {s: self.health(s) for s in services}
            if all(v == "healthy" for v in states.values()):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"not healthy after {timeout}s: {states}\n{self.describe()}")
            time.sleep(0.5)  # polling interval of a bounded wait

    # -- faults ---------------------------------------------------------------------------------

    def crash(self, service: str) -> None:
        """SIGKILL the service's process (docker-init's child), as a crash or the OOM killer
        would: the container exits 137 and the restart policy brings it back. (`docker kill`
        counts as a person's stop, which the restart policy respects.)"""
        code = ("import os, signal\n"
                "kids = open('/proc/1/task/1/children').read().split()\n"
                "os.kill(int(kids[0]), signal.SIGKILL)\n")
        out = self.exec(service, ["python", "-c", code], check=False)
        if out.returncode not in (0, 137):  # 137: the container went down under the exec itself
            raise RuntimeError(f"could not kill {service}'s process ({out.returncode}): {out.stderr[-2000:]}")

    def kill(self, service: str) -> None:
        docker("kill", self.container(service))

    def start(self, service: str) -> None:
        docker("start", self.container(service))

    def disconnect(self, service: str, network: str) -> None:
        docker("network", "disconnect", self.network(network), self.container(service))

    def connect(self, service: str, network: str, ip: str | None = None, aliases=()) -> None:
        args = ["--ip", ip] if ip else []
        for alias in aliases:
            args += ["--alias", alias]
        docker("network", "connect", *args, self.network(network), self.container(service))

    # -- the database (through the api container, which mounts the volume) -----------------------

    def sql(self, query: str, params: tuple = ()) -> list[list]:
        code = ("import json, sqlite3, sys\n"
                "con = sqlite3.connect('/data/quantumflow.db', timeout=10)\n"
                "con.execute('PRAGMA query_only = 1')\n"
                "rows = con.execute(sys.argv[1], json.loads(sys.argv[2])).fetchall()\n"
                "print(json.dumps(rows))\n")
        return self.python("api", code, query, json.dumps(list(params)))

    def describe(self) -> str:
        """Each container's state and last log lines, for a failure message."""
        parts = []
        for service in APP_SERVICES:
            try:
                self._ids.pop(service, None)
                tail = [line[:400] for line in self.logs(service)[-15:]]
                parts.append(f"--- {service}: {self.health(service)}, restarts={self.restarts(service)}\n"
                             + "\n".join(tail))
            except Exception as exc:  # noqa: BLE001 - a description must not raise
                parts.append(f"--- {service}: {exc}")
        return "\n".join(parts)


def wait_until(predicate: Callable[[], object], timeout: float, what: str, step: float = 0.25):
    """Poll `predicate` until truthy (returned); AssertionError naming `what` after `timeout` s."""
    return wait_for(predicate, timeout, what, step)
