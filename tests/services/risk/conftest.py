"""Risk test settings; the fixtures they feed live in tests/services/conftest.py."""
from __future__ import annotations

import pytest

from tests.services.conftest import endpoints


# The paper broker answers at once (its simulated exchange latency is another test's subject).
BROKER_NOW = {"QF_BROKER_LATENCY_MODE": "constant", "QF_BROKER_LATENCY_MS": "0"}
# Hand-made books near 100 with quantities like 0.005: lot and tick to match, no exchange minimum,
# rates and breakers out of the way unless a test asks for them.
SMALL_MARKET = {"QF_RISK_LOT_SIZE": "0.001", "QF_RISK_TICK_SIZE": "0.5", "QF_RISK_MIN_NOTIONAL": "0",
                "QF_RISK_MAX_NOTIONAL": "1000000", "QF_RISK_MAX_ORDER_NOTIONAL": "1000000",
                "QF_RISK_ORDERS_PER_S": "1000", "QF_RISK_ORDERS_PER_MIN": "60000"}


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    """QF_ variables for one test: fresh inproc endpoints, its own SQLite file and run dir."""
    return {**endpoints(), "QF_DB": str(tmp_path / "qf.db"), "QF_RUN_DIR": str(tmp_path / "run"),
            "QF_HEARTBEAT_MS": "50", "QF_SYMBOLS": "btcusdt,ethusdt", "QF_BROKER_TAKER_FEE": "0.001",
            "QF_START_CASH": "10000", **SMALL_MARKET, **BROKER_NOW}
