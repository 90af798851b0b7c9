"""Config: defaults in one place, clear errors for unknown keys and bad values."""
import subprocess
import sys
from decimal import Decimal

import pytest

from shared import config
from shared.errors import ConfigError
from tests.conftest import ROOT, SPOT_CAPTURE, clean_environ


def test_defaults_without_environment():
    cfg = config.load({})
    assert cfg.md.symbols == ("BTCUSDT",)
    assert str(cfg.md.feed) == "live"
    assert cfg.bus.md_pub == "tcp://127.0.0.1:5555"
    assert cfg.risk.max_position == Decimal("0.01")


def test_unknown_key_is_named_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown setting QF_SYMBOL \(did you mean QF_SYMBOLS\?\)"):
        config.load({"QF_SYMBOL": "btcusdt"})


@pytest.mark.parametrize("key,value,needle", [
    ("QF_ZMQ_HWM", "10", "between 1000"),
    ("QF_MD_PUB", "localhost:5555", "ZeroMQ endpoint"),
    ("QF_FEED", "replay:/nope.jsonl.gz", "does not exist"),
    ("QF_FEED", "kraken", "live"),
    ("QF_STRATEGY_QTY", "abc", "decimal"),
    ("QF_RISK_MAX_POSITION", "NaN", "decimal"),
    ("QF_SYMBOLS", "btc-usdt", "symbol"),
])
def test_bad_values_are_reported(key, value, needle):
    with pytest.raises(ConfigError, match=needle) as err:
        config.load({key: value})
    assert key in str(err.value)


def test_replay_feed_and_masked_secret():
    cfg = config.load({"QF_FEED": f"replay:{SPOT_CAPTURE}", "QF_API_TOKEN": "s3cret"})
    assert cfg.md.feed.kind == "replay"
    eff = cfg.effective()
    assert eff["QF_API_TOKEN"] == "***" and "s3cret" not in str(eff)


def test_service_refuses_to_start_on_bad_config():
    env = {**clean_environ(), "QF_SYMBOL": "btcusdt"}
    proc = subprocess.run([sys.executable, "-m", "services.cli", "risk"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "unknown setting QF_SYMBOL" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_readme_documents_every_setting():
    readme = open(f"{ROOT}/README.md").read()
    missing = [env for env, _, _ in config.all_settings() if f"`{env}`" not in readme]
    assert not missing, f"README's configuration table lacks {missing}"
