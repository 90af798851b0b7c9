"""The base image the container tests build QuantumFlow on, made from Debian's packages when no registry answers."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
BUILD_SCRIPT = HERE / "build-base.sh"
PACKAGES = HERE / "base-packages.txt"
REPOSITORY = "quantumflow-base"
SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
OFFICIAL_BASE = "python:3.11-slim"  # the Dockerfile's default, what users pull
# An explicit base (e.g. python:3.11-slim on a machine that can pull it) skips all of this.
BASE_ENV = "QUANTUMFLOW_TEST_BASE_IMAGE"
MIRROR_ENV = "QUANTUMFLOW_DEBIAN_MIRROR"
LOCK_PATH = Path(tempfile.gettempdir()) / "quantumflow-docker-images.lock"
BUILD_TIMEOUT_S = 900
PULL_TIMEOUT_S = 180


class BaseImageUnavailable(RuntimeError):
    """No base image could be found, built or pulled; the message says what was tried.
    The container tests fail with it (a Docker engine that answers is expected to work)."""


def docker(*args: str, timeout: float = 120, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run `docker ARGS`; returns the completed process (text). Raises CalledProcessError
    (with the output attached) when `check` and it fails, TimeoutExpired on `timeout`."""
    out = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, **kw)
    if check and out.returncode != 0:
        raise subprocess.CalledProcessError(out.returncode, out.args, out.stdout, out.stderr)
    return out


def image_exists(ref: str) -> bool:
    return docker("image", "inspect", "--format", "{{.Id}}", ref, check=False).returncode == 0


@contextlib.contextmanager
def machine_lock() -> Iterator[None]:
    """One image build at a time on this machine (concurrent test runs share the engine,
    the image cache and the repository's wheels/ directory)."""
    with open(LOCK_PATH, "a+") as f:
        with contextlib.suppress(OSError):
            os.chmod(LOCK_PATH, 0o666)  # another user's run may need it too
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def base_tag() -> str:
    """`quantumflow-base:bookworm-<hash>`: named by the builder script and the package
    list, so a change to either builds a new image and an unchanged pair is reused."""
    digest = hashlib.sha256()
    for path in (BUILD_SCRIPT, PACKAGES):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return f"{REPOSITORY}:{SUITE}-{digest.hexdigest()[:12]}"


def debian_mirror() -> str:
    """The Debian mirror this host's apt uses (deb822 `.sources` or `sources.list`), else
    deb.debian.org; $QUANTUMFLOW_DEBIAN_MIRROR wins."""
    if os.environ.get(MIRROR_ENV):
        return os.environ[MIRROR_ENV]
    apt = Path("/etc/apt")
    files = [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*.sources")),
             *sorted((apt / "sources.list.d").glob("*.list"))]
    for path in files:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        uris = re.findall(r"^URIs:\s*(\S+)", text, re.MULTILINE)
        uris += re.findall(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+\S+", text, re.MULTILINE)
        for uri in uris:
            if uri.rstrip("/").endswith("/debian") and uri.startswith(("http://", "https://")):
                return uri.rstrip("/")
    return DEFAULT_MIRROR


def can_debootstrap() -> str | None:
    """None when this process can run debootstrap, else why not."""
    if shutil.which("debootstrap") is None and not Path("/usr/sbin/debootstrap").exists():
        return "debootstrap is not installed (Debian package debootstrap; `make sysdeps` installs it)"
    if os.geteuid() != 0:
        return "debootstrap needs root and this test run is not root"
    return None


def build_base(tag: str) -> None:
    """debootstrap + `docker import` (tests/docker/build-base.sh). Raises BaseImageUnavailable."""
    env = dict(os.environ, PATH=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    print(f"building base image {tag} from Debian packages ({debian_mirror()})", file=sys.stderr, flush=True)
    out = subprocess.run(["bash", str(BUILD_SCRIPT), tag, debian_mirror()], capture_output=True, text=True,
                         timeout=BUILD_TIMEOUT_S, env=env)
    if out.returncode != 0 or not image_exists(tag):
        raise BaseImageUnavailable(f"building {tag} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")


def ensure_base_image() -> str:
    """The base image reference for `docker build --build-arg BASE_IMAGE=...`.

    In order: $QUANTUMFLOW_TEST_BASE_IMAGE; this machine's Debian-built image (built
    now if missing, once per machine); the official python:3.11-slim if it can be
    pulled. Raises BaseImageUnavailable naming each reason it could not."""
    explicit = os.environ.get(BASE_ENV)
    if explicit:
        if not image_exists(explicit):
            docker("pull", explicit, timeout=PULL_TIMEOUT_S)
        return explicit
    tag = base_tag()
    with machine_lock():
        if image_exists(tag):
            return tag
        why_not = can_debootstrap()
        if why_not is None:
            build_base(tag)
            return tag
        if image_exists(OFFICIAL_BASE):
            return OFFICIAL_BASE
        try:
            pulled = docker("pull", OFFICIAL_BASE, timeout=PULL_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            pulled = None
        if pulled is not None and pulled.returncode == 0:
            return OFFICIAL_BASE
        detail = pulled.stderr.strip()[-300:] if pulled is not None else f"timed out after {PULL_TIMEOUT_S}s"
        raise BaseImageUnavailable(
            f"no base image: {tag} is not built and cannot be ({why_not}); pulling {OFFICIAL_BASE} "
            f"failed ({detail}). Build it once as root: `sudo {BUILD_SCRIPT.relative_to(ROOT)} {tag}`, "
            f"or set {BASE_ENV} to an image with Python 3.11.")


if __name__ == "__main__":
    # `python -m tests.docker.base_image`: build (or find) the base image ahead of the tests.
    print(ensure_base_image())
