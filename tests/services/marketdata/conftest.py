"""Shared fixtures for the marketdata tests: the real captures, read once per session."""

from pathlib import Path

import pytest

from services.marketdata.capture import iter_capture

DATA = Path(__file__).resolve().parents[2] / "data"
SPOT_CAPTURE = DATA / "binance-spot-btcusdt-20240808.jsonl.gz"
USDM_CAPTURE = DATA / "binance-usdm-btcusdt-20240718.jsonl.gz"


@pytest.fixture(scope="session")
def spot_path() -> Path:
    """Path of the spot BTCUSDT capture."""
    return SPOT_CAPTURE


@pytest.fixture(scope="session")
def usdm_path() -> Path:
    """Path of the USD-M BTCUSDT capture."""
    return USDM_CAPTURE


@pytest.fixture(scope="session")
def spot_records() -> list[dict]:
    """Every record of the spot BTCUSDT capture (see tests/data/SOURCES.md)."""
    return list(iter_capture(SPOT_CAPTURE))


@pytest.fixture(scope="session")
def usdm_records() -> list[dict]:
    """Every record of the USD-M BTCUSDT capture (see tests/data/SOURCES.md)."""
    return list(iter_capture(USDM_CAPTURE))
