# QuantumFlow: one image for every service (`docker compose`) and for Fly.io.
#
#   docker build -t quantumflow:local .            # default target: non-root, ENTRYPOINT qf, CMD up
#   docker run --rm -p 8000:8000 quantumflow:local # the whole stack in one container (`qf up`)
#   docker run --rm quantumflow:local marketdata   # one service (what docker-compose.yml does)
#
# Two ways to build, chosen by build arguments:
#
# * With a registry and a package index (users, CI): nothing to do. The base image
#   is python:3.11-slim, and pip installs requirements.txt from the index.
#
# * Without a registry, or without network during the build ("Building without a
#   registry", what tests/test_compose.py does on a machine that cannot pull):
#   1. a base image with Python 3.11 from Debian's own packages, as root:
#        tests/docker/build-base.sh quantumflow-base:bookworm
#      (debootstrap of a minimal bookworm with python3, python3-venv, gcc and python3-dev, then
#      `docker import`; any image with Python 3.11 and `python -m venv` works);
#   2. wheels for requirements.txt *and* the build backend (setuptools, pinned in
#      pyproject.toml), built on the host into ./wheels/ of the build context:
#        pip wheel -w wheels -r requirements.txt setuptools==80.9.0
#      (from another Python or platform: `pip download --only-binary=:all:
#      --python-version 3.11 --platform manylinux2014_x86_64 -d wheels ...`);
#      when there are *.whl files the build installs with `--no-index --find-links`
#      and needs no network. Another directory: `--build-arg WHEELS_DIR=wheels/sub`
#      (.dockerignore admits only what is under `wheels/`);
#   3. docker build --build-arg BASE_IMAGE=quantumflow-base:bookworm -t quantumflow:local .
#      or, for Compose: QUANTUMFLOW_BASE_IMAGE=quantumflow-base:bookworm docker compose build
#   `python -m tests.docker.image` (from the repository, in its .venv) does all three.
# Only plain Dockerfile features: Debian's docker-compose 1.29 builds with the classic builder.

ARG BASE_IMAGE=python:3.11-slim

# ---- build: a virtualenv with the pinned dependencies and the project ----------
FROM ${BASE_IMAGE} AS build

ARG WHEELS_DIR=wheels
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

# Installing the project compiles its C extension (the order book, services/marketdata/_cbook.c):
# a compiler and Python's headers, in this stage only. python:3.11-slim has the headers but no
# gcc; the local Debian base (tests/docker/base-packages.txt) brings both, so nothing is fetched.
# hadolint ignore=DL3008
RUN if ! command -v gcc >/dev/null 2>&1; then \
        apt-get update \
     && apt-get install -y --no-install-recommends gcc libc6-dev \
     && rm -rf /var/lib/apt/lists/*; \
    fi

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# The wildcard makes the wheels directory optional: when it is missing only
# requirements.txt is copied. A directory matched this way has its *contents*
# copied, so any wheels land next to requirements.txt in /tmp/qf-build.
COPY requirements.txt ${WHEELS_DIR}* /tmp/qf-build/
# Offline when wheels were provided: PIP_NO_INDEX/PIP_FIND_LINKS also apply to
# the build-isolation environment that builds the project below.
RUN if ls /tmp/qf-build/*.whl >/dev/null 2>&1; then \
        echo "installing from pre-built wheels (offline)"; \
        export PIP_NO_INDEX=1 PIP_FIND_LINKS=/tmp/qf-build; \
    fi \
 && pip install -r /tmp/qf-build/requirements.txt

WORKDIR /src
COPY pyproject.toml README.md* ./
COPY shared/ shared/
COPY services/ services/
RUN if ls /tmp/qf-build/*.whl >/dev/null 2>&1; then \
        export PIP_NO_INDEX=1 PIP_FIND_LINKS=/tmp/qf-build; \
    fi \
 && pip install --no-deps . \
 && qf --help >/dev/null

# ---- app: the runtime image (default target, see the last stage) ----------------
FROM ${BASE_IMAGE} AS app

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    QF_DB=/data/quantumflow.db \
    QF_API_BIND=0.0.0.0:8000

# A fixed uid/gid so files on the /data volume keep one owner across rebuilds; /var/lib/quantumflow
# is the notifier's outbox volume in compose (a named volume takes the mount point's owner).
RUN groupadd --system --gid 10001 qf \
 && useradd --system --no-log-init --uid 10001 --gid qf --home-dir /home/qf --create-home qf \
 && mkdir -p /data /var/lib/quantumflow \
 && chown qf:qf /data /var/lib/quantumflow

COPY --from=build /opt/venv /opt/venv

WORKDIR /app
# The capture behind the replay profile (QF_FEED=replay:/app/tests/data/...), with its source note.
COPY tests/data/binance-spot-btcusdt-20240808.jsonl.gz tests/data/SOURCES.md /app/tests/data/

# SQLite (WAL) lives here; docker-compose.yml mounts the named volume `qfdata`.
# A new named volume takes this directory's owner (qf), so the non-root services can write.
VOLUME /data
EXPOSE 8000

# Numeric, so the runtime can check it is not root without reading /etc/passwd.
USER 10001:10001
ENTRYPOINT ["qf"]
CMD ["up"]

# ---- fly: the same image for Fly.io (fly.toml: build-target = "fly") -------------
# Fly mounts a volume as a root-owned ext4 filesystem, which the non-root `qf` user
# cannot write. This entrypoint starts as root only to chown /data, then drops to
# `qf` before exec'ing `qf <command>`; nothing of QuantumFlow ever runs as root.
FROM app AS fly
COPY deploy/fly_entrypoint.py /usr/local/bin/qf-fly-entrypoint
# hadolint ignore=DL3002
USER 0:0
ENTRYPOINT ["/opt/venv/bin/python", "/usr/local/bin/qf-fly-entrypoint"]
CMD ["up"]

# ---- default target: the non-root runtime image ----------------------------------
FROM app
