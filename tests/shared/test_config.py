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


# -- issue #11: credentials in URL-like settings are masked wherever settings are printed ------

import logging  # noqa: E402
import string  # noqa: E402
from urllib.parse import quote  # noqa: E402

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from shared.log import KeyValueFormatter  # noqa: E402


@pytest.mark.parametrize("url,masked", [
    ("postgresql://qf:s3cret@db:5432/qf", "postgresql://qf:***@db:5432/qf"),
    ("postgresql://qf:p@ss:w/rd@db/qf?sslmode=require", "postgresql://qf:***@db/qf?sslmode=require"),
    ("postgres://:onlypass@db/qf", "postgres://:***@db/qf"),
    ("mysql://u:pw@h/db?password=x1&charset=utf8&api_key=k2", "mysql://u:***@h/db?password=***&charset=utf8&api_key=***"),
    ("sqlite:////var/qf.db?Token=abc;secret=def#frag", "sqlite:////var/qf.db?Token=***;secret=***#frag"),
    ("https://api.example/x?access_token=abc&limit=5", "https://api.example/x?access_token=***&limit=5"),
    # nothing to mask: no password, or not a URL with credentials
    ("postgresql://qf@db/qf", "postgresql://qf@db/qf"),
    ("tcp://127.0.0.1:5555", "tcp://127.0.0.1:5555"),
    ("wss://stream.binance.com:9443", "wss://stream.binance.com:9443"),
    ("./data/quantumflow.db", "./data/quantumflow.db"),
    ("ipc:///tmp/qf/risk.sock", "ipc:///tmp/qf/risk.sock"),
])
def test_mask_secrets_examples(url, masked):
    assert config.mask_secrets(url) == masked
    assert config.mask_secrets(f"error: cannot open {url} (refused)") == f"error: cannot open {masked} (refused)"


def test_effective_config_masks_the_password_in_qf_db():
    cfg = config.load({"QF_DB": "postgresql://qf:Xy7-s3cret@db:5432/qf?password=Qq9&sslmode=disable",
                       "QF_BINANCE_REST": "https://user:Bb8@proxy.example:8443"})
    eff = cfg.effective()
    assert eff["QF_DB"] == "postgresql://qf:***@db:5432/qf?password=***&sslmode=disable"
    assert eff["QF_BINANCE_REST"] == "https://user:***@proxy.example:8443"
    assert not {"Xy7-s3cret", "Qq9", "Bb8"} & set(str(eff).replace("'", " ").replace("@", " ").split())
    assert "s3cret" not in str(eff) and "Bb8" not in str(eff)


def test_a_config_error_does_not_echo_a_secret():
    with pytest.raises(ConfigError) as err:
        config.load({"QF_BINANCE_REST": "ftp://u:Zz9secret@host/", "QF_BINANCE_WS": "https://x?token=Tt7"})
    text = str(err.value)
    assert "QF_BINANCE_REST" in text and "QF_BINANCE_WS" in text  # still names the settings
    assert "Zz9secret" not in text and "Tt7" not in text and "u:***@host" in text


def test_log_lines_and_tracebacks_mask_urls():
    fmt = KeyValueFormatter("test")
    try:
        raise RuntimeError("could not connect to postgresql://qf:Ee5secret@db/qf")
    except RuntimeError:
        import sys
        exc_info = sys.exc_info()
    record = logging.LogRecord("qf.test", logging.ERROR, __file__, 1, "open mysql://a:Ff6secret@h/x failed",
                               None, exc_info)
    record.target = "postgresql://qf:Gg7secret@db/qf?password=Hh8secret"
    line = fmt.format(record)
    assert "secret" not in line.replace("***", "")
    assert 'target="postgresql://qf:***@db/qf?password=***"' in line and "a:***@h" in line


# a URL as a user would write it, with credentials that contain no whitespace (a URL ends at one):
# the other parts are lower-case, the secrets start with "ZQ", so "the secret is not in the
# output" cannot be fooled by a host or path that happens to hold the same text
_lower = st.text(string.ascii_lowercase + string.digits, min_size=1, max_size=12)
_password = st.text(st.characters(min_codepoint=33, max_codepoint=0x2FFF, exclude_characters="\x85\xa0"),
                    min_size=1, max_size=30).map(lambda s: "ZQ" + "".join(c for c in s if not c.isspace()))
_param_secret = st.text(st.characters(min_codepoint=33, max_codepoint=126, exclude_characters='&;#"'),
                        min_size=1, max_size=30).map(lambda s: "ZQ" + s)
_param_name = st.sampled_from(["password", "token", "secret", "key", "api_key", "access_token", "PASSWORD",
                               "sslkey", "X-Amz-Signature", "client_secret", "pwd"])


@settings(max_examples=400, deadline=None)
@given(scheme=st.sampled_from(["postgresql", "postgres", "mysql", "sqlite", "https", "redis", "cockroachdb"]),
       user=_lower, password=_password, host=_lower, port=st.integers(1, 65535), path=_lower,
       param=_param_name, param_secret=_param_secret, encode=st.booleans(), before=_lower, after=_lower)
def test_no_secret_survives_masking_for_any_url(scheme, user, password, host, port, path, param, param_secret,
                                                encode, before, after):
    pw_text = quote(password, safe="") if encode else password
    param_text = quote(param_secret, safe="") if encode else param_secret
    url = f"{scheme}://{user}:{pw_text}@{host}:{port}/{path}?sslmode=x&{param}={param_text}&n=1"
    secrets = {password, pw_text, param_secret, param_text}
    for text in (url, f"{before} {url} {after}", f'QF_DB="{url}"', repr(url), f"cannot open {url!r}: no"):
        out = config.mask_secrets(text)
        assert not any(s in out for s in secrets), (text, out)
        assert "ZQ" not in out, out
    assert f"{user}:***@" in config.mask_secrets(url)
    if "@" not in param_text:  # a raw `@` in the query: everything up to it is masked as the password
        assert f"{param}=***" in config.mask_secrets(url)
    record = logging.LogRecord("t", logging.INFO, "", 0, "config", None, None)
    record.QF_DB = url
    line = KeyValueFormatter("t").format(record)
    assert "ZQ" not in line, line
    try:
        shown = config.load({"QF_DB": url}).effective()["QF_DB"]
    except ConfigError as exc:  # a scheme QF_DB cannot use, or a URL it cannot read: refused, and masked
        shown = str(exc)
        assert "QF_DB" in shown and scheme not in config.DB_SCHEMES or "URL" in shown, shown
    assert "ZQ" not in shown, shown


# -- issue #13: the spot account's start balances ----------------------------------------------

def test_start_balances_are_canonical_and_empty_by_default():
    assert config.load({}).broker.start_balances == ""
    cfg = config.load({"QF_START_BALANCES": " usdt=10000.00 , BTC=0.25000,eth=0,FDUSD=1e3 "})
    assert cfg.broker.start_balances == "USDT=10000,BTC=0.25,ETH=0,FDUSD=1000"
    assert cfg.effective()["QF_START_BALANCES"] == "USDT=10000,BTC=0.25,ETH=0,FDUSD=1000"
    assert ("QF_START_BALANCES", "", ) == config.all_settings()[[s[0] for s in config.all_settings()].index(
        "QF_START_BALANCES")][:2]


@pytest.mark.parametrize("value,needle", [
    ("USDT", "expected ASSET=AMOUNT"), ("USDT=1,BTC", "expected ASSET=AMOUNT"), ("U=1", "2-12 letters"),
    ("USD-T=1", "2-12 letters"), ("ABCDEFGHIJKLM=1", "2-12 letters"), ("=5", "expected ASSET=AMOUNT"),
    ("USDT=", "not a decimal"), ("USDT=ten", "not a decimal"), ("USDT=-1", "between 0 and"),
    ("USDT=NaN", "between 0 and"), ("USDT=Infinity", "between 0 and"), ("USDT=1e13", "between 0 and"),
    ("BTC=0.0000000000000000001", "at most 18 decimals"), ("USDT=1,usdt=2", "USDT is listed twice"),
])
def test_bad_start_balances_name_the_setting(value, needle):
    with pytest.raises(ConfigError, match=needle) as err:
        config.load({"QF_START_BALANCES": value})
    assert "QF_START_BALANCES=" in str(err.value)


def test_qf_config_lists_the_start_balances():
    proc = subprocess.run([sys.executable, "-m", "services.cli", "config"], env=clean_environ(), cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    (row,) = [line for line in proc.stdout.splitlines() if "`QF_START_BALANCES`" in line]
    assert "(empty)" in row and "USDT=10000,BTC=0.25" in row


# -- issue #13: QF_START_BALANCES and QF_START_CASH are one account ---------------------------

@pytest.mark.parametrize("env,cash", [
    ({"QF_START_BALANCES": "USDT=2500"}, Decimal("2500")),  # the quote balance is the start cash
    ({"QF_START_BALANCES": "USDT=2500", "QF_START_CASH": "2500"}, Decimal("2500")),
    ({"QF_START_BALANCES": "BTC=0.5"}, Decimal("0")),  # no quote asset named: none to spend, none counted
    ({"QF_START_BALANCES": "USDT=2500,BTC=0.5"}, Decimal("2500")),
    ({}, Decimal("10000")),
])
def test_start_cash_follows_the_quote_balance(env, cash):
    assert config.load(env).broker.start_cash == cash


@pytest.mark.parametrize("env,says", [
    ({"QF_START_BALANCES": "USDT=2500", "QF_START_CASH": "10000"},
     "QF_START_BALANCES gives USDT=2500 but QF_START_CASH is 10000"),
    ({"QF_START_BALANCES": "USDT=2500", "QF_SYMBOLS": "btcusdt,ethbtc"}, "2 quote assets (BTC, USDT)"),
])
def test_start_balances_that_disagree_with_the_account_are_refused(env, says):
    with pytest.raises(ConfigError) as err:
        config.load(env)
    assert says in str(err.value)
