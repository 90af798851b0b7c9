"""Build the QuantumFlow image (and Debian's Prometheus) offline: wheels built on the host, the local base image."""
from __future__ import annotations

import hashlib
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.docker.base_image import ROOT, docker, ensure_base_image, machine_lock

WHEELS = ROOT / "wheels"  # admitted by .dockerignore; gitignored
APP_REPOSITORY = "quantumflow"
PROMETHEUS_REPOSITORY = "quantumflow-prometheus"
TEST_TAG_PREFIX = "test-"
BUILD_TIMEOUT_S = 900
KEEP_TAGS_S = 3600  # a test tag untouched this long (and unused by any container) is removed


@dataclass(frozen=True)
class Images:
    base: str
    app: str
    prometheus: str | None = None


def build_requires() -> list[str]:
    """The build backend pinned in pyproject.toml's [build-system] (installed offline too)."""
    text = (ROOT / "pyproject.toml").read_text()
    block = re.search(r"^\[build-system\](.*?)^\[", text, re.MULTILINE | re.DOTALL)
    found = re.search(r"requires\s*=\s*\[(.*?)\]", block.group(1) if block else "", re.DOTALL)
    return re.findall(r"[\"']([^\"']+)[\"']", found.group(1)) if found else []


def _pip_target() -> list[str]:
    """pip options that fetch wheels for the image's CPython 3.11 on Linux when the host's
    interpreter is another one; none when it is the same (plain `pip wheel`)."""
    if sys.version_info[:2] == (3, 11) and sys.platform == "linux" and platform.machine() == "x86_64":
        return []
    platforms = [f"--platform=manylinux_2_{minor}_x86_64" for minor in range(36, 16, -1)]
    return ["--only-binary=:all:", "--python-version=3.11", "--implementation=cp", "--abi=cp311", *platforms]


def ensure_wheels() -> str:
    """`wheels/<hash>/` with every pinned requirement and the build backend as wheels,
    built on the host by pip (once per requirements change). Returns the directory
    relative to the build context, for `--build-arg WHEELS_DIR=`. Call under machine_lock()."""
    reqs = (ROOT / "requirements.txt").read_bytes()
    backend = build_requires()
    target = _pip_target()
    digest = hashlib.sha256(reqs + "\0".join([*backend, *target]).encode()).hexdigest()[:12]
    final = WHEELS / digest
    if (final / ".complete").is_file():
        return str(final.relative_to(ROOT))
    WHEELS.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=WHEELS))
    try:
        verb = ["download", *target] if target else ["wheel"]
        cmd = [sys.executable, "-m", "pip", *verb, "--quiet", "--disable-pip-version-check",
               "-r", str(ROOT / "requirements.txt"), *backend, "--dest" if target else "--wheel-dir", str(tmp)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise RuntimeError(f"pip could not fetch the wheels: {' '.join(cmd)}\n{out.stderr[-3000:]}")
        (tmp / ".complete").write_text(" ".join(cmd) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in WHEELS.iterdir():  # older requirement sets: a fresh one is cheap to rebuild
        if old.is_dir() and old != final and not old.name.startswith("."):
            shutil.rmtree(old, ignore_errors=True)
    return str(final.relative_to(ROOT))


def _build(repository: str, args: list[str], context: Path) -> str:
    """`docker build` → `repository:test-<image id>`: the same content gets the same tag,
    so concurrent runs of different code never overwrite each other's image."""
    with tempfile.TemporaryDirectory() as tmp:
        iidfile = Path(tmp) / "iid"
        out = docker("build", "--iidfile", str(iidfile), *args, str(context), timeout=BUILD_TIMEOUT_S,
                     check=False)
        if out.returncode != 0:
            raise RuntimeError(f"docker build failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}")
        image_id = iidfile.read_text().strip().split(":")[-1]
    tag = f"{repository}:{TEST_TAG_PREFIX}{image_id[:12]}"
    docker("tag", image_id, tag)
    return tag


def prune_test_tags(keep: set[str]) -> None:
    """Remove this suite's image tags that no container uses and nobody tagged for an hour."""
    used = set(docker("ps", "-a", "--format", "{{.Image}}").stdout.split())
    for repository in (APP_REPOSITORY, PROMETHEUS_REPOSITORY):
        listed = docker("images", repository, "--format", "{{.Repository}}:{{.Tag}}").stdout.split()
        for tag in listed:
            if not tag.split(":", 1)[1].startswith(TEST_TAG_PREFIX) or tag in keep or tag in used:
                continue
            stamp = docker("image", "inspect", "--format", "{{.Metadata.LastTagTime.Unix}}", tag,
                           check=False).stdout.strip()
            if stamp.lstrip("-").isdigit() and time.time() - int(stamp) > KEEP_TAGS_S:
                docker("rmi", tag, check=False)


def build_images(prometheus: bool = False) -> Images:
    """The base image, then QuantumFlow's image built from the repository with wheels made on
    the host (no network inside the build); with `prometheus`, Debian's Prometheus too."""
    base = ensure_base_image()
    with machine_lock():
        wheels = ensure_wheels()
        app = _build(APP_REPOSITORY, ["--build-arg", f"BASE_IMAGE={base}", "--build-arg", f"WHEELS_DIR={wheels}"],
                     ROOT)
        prom = None
        if prometheus:
            prom = _build(PROMETHEUS_REPOSITORY, ["-f", str(ROOT / "deploy" / "prometheus.Dockerfile"),
                                                  "--build-arg", f"BASE_IMAGE={base}"], ROOT / "deploy")
        prune_test_tags({app, prom} - {None})
    return Images(base=base, app=app, prometheus=prom)


if __name__ == "__main__":
    # `python -m tests.docker.image`: build everything the container tests need.
    print(build_images(prometheus=True))
