"""Reading the deployment files as Compose understands them (v1 and v2), for tests/test_deploy_files.py."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def tool(name: str) -> str | None:
    """A tool from the venv's bin directory (pip-installed linters) or PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.is_file() and os.access(local, os.X_OK) else shutil.which(name)


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without QF_/COMPOSE_ variables, so defaults are what is tested."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QF_", "COMPOSE_"))}
    env.update(extra)
    return env


class Compose:
    """`docker-compose config` as data: JSON from Compose v2, YAML→JSON for v1.

    Debian's docker-compose 1.29 has no `--format json`; it is a Python program
    that imports PyYAML, so its own interpreter converts the YAML it prints."""

    def __init__(self, cmd: list[str]) -> None:
        self.cmd = cmd  # ["docker", "compose"] or ["docker-compose"]
        out = subprocess.run([*cmd, "version", "--short"], capture_output=True, text=True, timeout=60)
        self.version = out.stdout.strip().lstrip("v")
        self.v1 = self.version.startswith("1.")
        self.python = None
        if self.v1:
            exe = shutil.which(cmd[0]) or cmd[0]
            first = Path(exe).read_bytes()[:200].split(b"\n", 1)[0].decode(errors="replace")
            self.python = first[2:].strip().split() if first.startswith("#!") else [sys.executable]

    def run(self, files: list[Path], args: list[str], profiles: tuple[str, ...] = (),
            **env: str) -> subprocess.CompletedProcess:
        cmd = list(self.cmd)
        for f in files:
            cmd += ["-f", str(f)]
        for p in profiles:
            cmd += ["--profile", p]
        return subprocess.run(cmd + args, capture_output=True, text=True, cwd=ROOT,
                              env=clean_env(**env), timeout=120)

    def config(self, files: list[Path], profiles: tuple[str, ...] = (), **env: str) -> dict:
        """The merged configuration; services of profiles not asked for are dropped (v1's
        `config` lists them all)."""
        cfg = self._config(files, profiles, **env)
        cfg["services"] = {name: svc for name, svc in cfg["services"].items()
                           if set(svc.get("profiles") or []) <= set(profiles)}
        for svc in cfg["services"].values():  # v1 writes `bus: null` or `bus: {}` for the same thing
            if isinstance(svc.get("networks"), dict):
                svc["networks"] = {k: v or {} for k, v in svc["networks"].items()}
        return cfg

    def _config(self, files: list[Path], profiles: tuple[str, ...] = (), **env: str) -> dict:
        if not self.v1:
            out = self.run(files, ["config", "--format", "json"], profiles, **env)
            assert out.returncode == 0, out.stderr
            return json.loads(out.stdout)
        out = self.run(files, ["config"], profiles, **env)
        assert out.returncode == 0, out.stderr
        conv = subprocess.run(
            [*self.python, "-c", "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)"],
            input=out.stdout, capture_output=True, text=True, timeout=60)
        assert conv.returncode == 0, f"cannot read docker-compose's YAML output: {conv.stderr}"
        return json.loads(conv.stdout)


def env_of(svc: dict) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):  # KEY=VALUE form
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def networks_of(svc: dict) -> set[str]:
    nets = svc.get("networks") or {}
    return set(nets) if isinstance(nets, (dict, list)) else set()


def volume_targets(svc: dict) -> dict[str, str]:
    """target -> source for named volumes and bind mounts (both v1 strings and v2 dicts)."""
    out = {}
    for v in svc.get("volumes") or []:
        if isinstance(v, str):
            parts = v.split(":")
            out[parts[1]] = parts[0]
        else:
            out[v["target"]] = v.get("source", "")
    return out


def published_ports(svc: dict) -> set[tuple[str, int]]:
    return {(published, target) for _, published, target in port_bindings(svc)}


def port_bindings(svc: dict) -> set[tuple[str, str, int]]:
    """(host ip or "", published, target) for each published port, v1 strings and v2 dicts."""
    out = set()
    for p in svc.get("ports") or []:
        if isinstance(p, str):
            parts = p.split("/")[0].split(":")
            host = parts[0] if len(parts) == 3 else ""
            out.add((host, parts[-2], int(parts[-1])))
        else:
            out.add((p.get("host_ip", ""), str(p.get("published")), int(p["target"])))
    return out


def endpoint(value: str) -> tuple[str, int]:
    m = re.fullmatch(r"tcp://([^:]+):(\d+)", value)
    assert m, f"{value!r} is not tcp://host:port"
    return m.group(1), int(m.group(2))


def load_yaml(path: Path) -> object:
    """A YAML file as data: PyYAML when the venv has it, else a system Python that does
    (Debian's docker-compose depends on python3-yaml); skips when there is none."""
    try:
        import yaml  # noqa: PLC0415 - optional: not a project dependency
        return yaml.safe_load(path.read_text())
    except ImportError:
        pass
    for exe in ("/usr/bin/python3", shutil.which("python3")):
        if exe and exe != sys.executable:
            out = subprocess.run([exe, "-c", "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)"],
                                 input=path.read_text(), capture_output=True, text=True, timeout=60)
            if out.returncode == 0:
                return json.loads(out.stdout)
    pytest.skip("no Python with PyYAML here to read the provisioning YAML")


def dockerfile_stages(path: Path) -> list[tuple[str, list[str]]]:
    """(stage name or '', instruction lines) per FROM of the Dockerfile at `path`; continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    stages: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            m = re.search(r"\s+AS\s+(\S+)\s*$", line, re.IGNORECASE)
            stages.append((m.group(1) if m else "", [line]))
        elif stages:
            stages[-1][1].append(line)
    return stages
