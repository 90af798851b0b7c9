# Prometheus from Debian's package: the `prometheus` service of the monitoring profile
# for machines where prom/prometheus cannot be pulled (no registry), built on the same
# base image as QuantumFlow. Users with a registry keep docker-compose.yml's prom/prometheus.
#
#   docker build -f deploy/prometheus.Dockerfile --build-arg BASE_IMAGE=<debian bookworm image> \
#       -t quantumflow-prometheus deploy
#
# then point the service at it from an override file next to docker-compose.yml:
#
#   services:
#     prometheus:
#       image: quantumflow-prometheus
#
# Same entrypoint shape as the official image (flags come from docker-compose.yml's
# `command`); the build needs a Debian mirror, nothing else.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

SHELL ["/bin/sh", "-eu", "-c"]
# policy-rc.d: the package's maintainer scripts must not try to start a daemon during the build.
# hadolint ignore=DL3008
RUN printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d \
 && chmod +x /usr/sbin/policy-rc.d \
 && apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus \
 && rm -rf /var/lib/apt/lists/* /usr/sbin/policy-rc.d \
 && mkdir -p /prometheus \
 && chown 65534:65534 /prometheus

# nobody:nogroup, as in prom/prometheus, so the `prometheus` volume suits either image.
USER 65534:65534
VOLUME /prometheus
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
