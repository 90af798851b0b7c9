"""Broker test settings; the fixtures they feed live in tests/services/conftest.py."""
from __future__ import annotations

import pytest

from tests.services.conftest import endpoints


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    """QF_ variables for one test: fresh inproc endpoints, its own SQLite file and run dir."""
    return {**endpoints(), "QF_DB": str(tmp_path / "qf.db"), "QF_RUN_DIR": str(tmp_path / "run"),
            "QF_HEARTBEAT_MS": "50", "QF_SYMBOLS": "btcusdt,ethusdt", "QF_BROKER_TAKER_FEE": "0.001",
            "QF_START_CASH": "10000", "QF_BROKER_LATENCY_MODE": "constant", "QF_BROKER_LATENCY_MS": "0"}
