# PostgreSQL from Debian's package: the `postgres` service of docker-compose.yml's postgres profile,
# built on the same base image as QuantumFlow (no registry image is pulled; the build needs a
# Debian mirror, nothing else), as deploy/prometheus.Dockerfile builds Prometheus.
#
#   docker build -f deploy/postgres.Dockerfile --build-arg BASE_IMAGE=<debian bookworm image> \
#       -t quantumflow-postgres:local deploy
#
# A file of its own, not a stage of ./Dockerfile: the classic builder (Debian's docker-compose
# 1.29 builds with it) runs every stage before the target, so each QuantumFlow build would
# install PostgreSQL too. deploy/postgres_entrypoint.py makes the cluster, the role and the
# database that QF_DB names on the first start, then runs the server.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

SHELL ["/bin/sh", "-eu", "-c"]
# policy-rc.d: the package's maintainer scripts must not start a server during the build;
# createcluster.d: nor make Debian's default cluster (the entrypoint makes ours in the volume).
# hadolint ignore=DL3008
RUN printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d \
 && chmod +x /usr/sbin/policy-rc.d \
 && mkdir -p /etc/postgresql-common/createcluster.d \
 && echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.d/quantumflow.conf \
 && apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql \
 && rm -rf /var/lib/apt/lists/* /usr/sbin/policy-rc.d \
 && mkdir -p /var/lib/postgresql/data /var/run/postgresql \
 && chown postgres:postgres /var/lib/postgresql/data /var/run/postgresql \
 && chmod 0700 /var/lib/postgresql/data

COPY postgres_entrypoint.py /usr/local/bin/qf-postgres

ENV PGDATA=/var/lib/postgresql/data
# Debian's `postgres` account, made by the package with the next free system uid (a fixed one is not
# ours to give: its maintainer scripts own the account); the server refuses to run as root.
# hadolint ignore=DL3066
USER postgres
VOLUME /var/lib/postgresql/data
EXPOSE 5432
# SIGINT: PostgreSQL's fast shutdown (SIGTERM's smart shutdown waits for every client to leave)
STOPSIGNAL SIGINT
ENTRYPOINT ["python3", "/usr/local/bin/qf-postgres"]
