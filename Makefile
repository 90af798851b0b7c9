# QuantumFlow — the two commands a newcomer needs: `make up` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
FEED   ?=
PYTEST_ARGS ?=

.PHONY: up test bench venv sysdeps clean lint

venv: $(STAMP)

# The project installs editable, with its C extensions (the order book, services/marketdata/_cbook.c,
# and the strategy's features, services/strategy/_cfeatures.c)
# compiled in place: it needs gcc and Python's headers, and is rebuilt when the C source changes.
$(STAMP): requirements.txt requirements-dev.txt pyproject.toml services/marketdata/_cbook.c services/strategy/_cfeatures.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

# Debian packages the test suite drives for real (installed only when missing, as root).
# debootstrap: tests/docker/build-base.sh builds the container tests' base image from Debian packages.
# wrk: bench/api.py loads the API with it.
SYSDEPS := docker-compose:docker-compose prometheus:prometheus debootstrap:debootstrap wrk:wrk pg_ctlcluster:postgresql
sysdeps:
	@missing=""; for pair in $(SYSDEPS); do cmd=$${pair%%:*}; pkg=$${pair##*:}; \
	  command -v $$cmd >/dev/null 2>&1 || missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else echo "missing Debian packages:$$missing (install them, or the tests that need them will be skipped)"; fi; fi

up: $(STAMP)
	$(BIN)/qf up $(if $(FEED),--feed $(FEED))

COMPOSE_V2 := build/compose-v2/docker-compose

# The whole suite: everything but the container tests (budget: 10 minutes on 2 cores; two
# pytest-xdist processes, a test file per process at a time: most tests wait on processes and
# sockets, so two run in ~0.6 of the time), the container tests under Debian's docker-compose
# 1.29, then again under Compose v2, fetched from Debian's archive (see
# tests/docker/fetch-compose-v2.sh); each part prints its own time.
# `make test PYTEST_ARGS=...` runs a selection only (in one process unless it says -n).
test: $(STAMP) sysdeps
ifeq ($(strip $(PYTEST_ARGS)),)
	$(BIN)/python -m pytest -m "not docker" -n 2 --dist loadfile --durations=15
	@echo "== container tests under $$(docker-compose version --short 2>/dev/null || echo docker-compose)"
	$(BIN)/python -m pytest -m docker
else
	$(BIN)/python -m pytest $(PYTEST_ARGS)
endif
ifeq ($(strip $(PYTEST_ARGS)),)
	@if tests/docker/fetch-compose-v2.sh $(COMPOSE_V2) >/dev/null; then \
	  echo "== container tests again under Compose v2 ($$($(COMPOSE_V2) version --short))"; \
	  QUANTUMFLOW_COMPOSE=$(CURDIR)/$(COMPOSE_V2) $(BIN)/python -m pytest tests/test_compose.py tests/test_deploy_files.py; \
	else echo "Compose v2 could not be fetched from Debian's archive: the container tests ran under docker-compose v1 only"; fi
endif

bench: $(STAMP)
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info services/marketdata/_cbook.*.so services/strategy/_cfeatures.*.so
