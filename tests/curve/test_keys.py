"""`qf keys` and the key files: what is made, with which modes, what is refused, and how a bad file is reported."""
from __future__ import annotations

import os
import stat

import pytest

from services.cli import main as qf
from shared import config as qfconfig
from shared import curve
from shared.errors import ConfigError
from tests.conftest import tcp_env


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_qf_keys_makes_a_pair_per_party_with_private_files_for_the_owner_only(tmp_path, capsys):
    directory = tmp_path / "keys"
    assert qf(["keys", str(directory)]) == 0
    out = capsys.readouterr().out
    assert mode(directory / "private") == 0o700
    assert mode(directory / "public") == 0o755
    for party in curve.PARTIES:
        secret, public = curve.secret_path(directory, party), curve.public_path(directory, party)
        assert mode(secret) == 0o600 and mode(public) == 0o644, party
        pub, sec = curve.read_key_file(secret, secret=True)
        assert curve.read_key_file(public, secret=False) == (pub, None)  # the pair belongs together
        assert f"{secret}  secret (0600): only on the host that runs {party}" in out
        assert f"{public}  public: copy to every host" in out
        assert sec.decode() not in out and pub.decode() not in out  # names files, never keys
    assert sorted(os.listdir(directory / "private")) == sorted(f"{p}.key_secret" for p in curve.PARTIES)
    assert f"Set QF_CURVE_KEYS={directory}" in out
    publics = {curve.read_key_file(curve.public_path(directory, p), False)[0] for p in curve.PARTIES}
    assert len(publics) == len(curve.PARTIES)  # one pair each, none shared


def test_qf_keys_refuses_to_overwrite_without_force(tmp_path, capsys):
    directory = tmp_path / "keys"
    assert qf(["keys", str(directory)]) == 0
    before = {p: curve.secret_path(directory, p).read_bytes() for p in curve.PARTIES}
    capsys.readouterr()
    assert qf(["keys", str(directory)]) == 1
    err = capsys.readouterr().err
    assert "already exists: nothing written" in err and str(curve.secret_path(directory, "marketdata")) in err
    assert {p: curve.secret_path(directory, p).read_bytes() for p in curve.PARTIES} == before

    curve.secret_path(directory, "broker").unlink()  # one key lost: the others are still not replaced
    assert qf(["keys", str(directory)]) == 1
    assert curve.secret_path(directory, "risk").read_bytes() == before["risk"]

    assert qf(["keys", str(directory), "--force"]) == 0
    after = {p: curve.secret_path(directory, p).read_bytes() for p in curve.PARTIES}
    assert all(after[p] != before[p] for p in curve.PARTIES if p != "broker")
    assert all(mode(curve.secret_path(directory, p)) == 0o600 for p in curve.PARTIES)
    assert [n for n in os.listdir(directory / "private") if n.startswith(".")] == []  # no temporary left


def test_qf_keys_into_a_file_fails_in_one_line(tmp_path, capsys):
    target = tmp_path / "not-a-dir"
    target.write_text("x")
    assert qf(["keys", str(target)]) == 1
    assert capsys.readouterr().err.strip().startswith(f"qf keys: {target}:")


@pytest.fixture
def keys(tmp_path):
    directory = tmp_path / "keys"
    curve.make_keys(directory)
    return directory


def test_bad_key_files_are_named_and_never_quoted(keys):
    secret = curve.secret_path(keys, "risk")
    key = curve.read_key_file(secret, True)[1].decode()

    def problem(path, is_secret=True) -> str:
        with pytest.raises(curve.KeyFileError) as err:
            curve.read_key_file(path, is_secret)
        text = str(err.value)
        assert str(path) in text and key not in text
        assert isinstance(err.value, ConfigError)  # one line, exit status 2 (services/cli.py)
        return text

    assert "no such file" in problem(keys / "private" / "nobody.key_secret")
    assert "no valid secret-key line" in problem(curve.public_path(keys, "risk"))  # public where secret belongs
    os.replace(secret, keys / "saved")
    secret.mkdir()
    assert "cannot be read (Is a directory)" in problem(secret)
    secret.rmdir()
    os.replace(keys / "saved", secret)

    text = secret.read_text()
    secret.write_text(text.replace(key, key[:-1] + ("A" if key[-1] != "A" else "B")))  # one character off
    assert "does not match its public key" in problem(secret)
    secret.write_text(text.replace(key, key[:20]))  # cut short
    assert "no valid secret-key line" in problem(secret)
    secret.write_bytes(b"\0" * (curve.MAX_KEY_FILE + 1))
    assert "not a CURVE key file" in problem(secret)
    secret.write_text("")
    assert "no valid public-key line" in problem(secret)


def test_another_partys_key_pair_in_a_secret_file_stops_the_service(keys, tmp_path):
    # risk started with the broker's pair copied over its own and said nothing; its peers, given
    # risk's public key, refused every handshake
    import shutil
    shutil.copyfile(curve.secret_path(keys, "broker"), curve.secret_path(keys, "risk"))
    cfg = qfconfig.load({**tcp_env(tmp_path), "QF_CURVE_KEYS": str(keys)})
    curve._load.cache_clear()
    with pytest.raises(curve.KeyFileError) as err:
        curve.load(cfg, "risk")
    assert f"{curve.secret_path(keys, 'risk')} does not match {curve.public_path(keys, 'risk')}" in str(err.value)
    curve._load.cache_clear()
    assert curve.load(cfg, "broker").party == "broker"  # the broker's own pair is still whole


def test_a_world_readable_secret_is_used_but_warned_about(keys, caplog):
    secret = curve.secret_path(keys, "api")
    os.chmod(secret, 0o644)
    with caplog.at_level("WARNING", logger="qf.curve"):
        curve.read_key_file(secret, True)
    [record] = [r for r in caplog.records if r.getMessage() == "curve_key_exposed"]
    assert record.file == str(secret) and record.mode == "0644"


def test_each_party_loads_its_secret_and_the_public_keys_it_deals_with(tmp_path, keys):
    cfg = qfconfig.load(tcp_env(tmp_path, QF_CURVE_KEYS=str(keys)))
    broker = curve.load(cfg, "broker")
    assert broker.secret.decode() not in repr(broker)  # an identity logged whole shows no secret
    assert set(broker.peers) == {"broker", "risk", "marketdata", "strategy", "api", "notifier"}
    assert set(curve.load(cfg, "notifier").peers) == {"notifier", "marketdata", "broker", "risk", "strategy"}
    assert set(curve.load(cfg, "api").peers) == {"api", "marketdata", "risk", "broker", "strategy"}
    assert curve.load(qfconfig.load(tcp_env(tmp_path)), "broker") is None  # QF_CURVE_KEYS unset: off
    # a party needs no file it does not use: the API (which serves nobody) starts without the notifier's key
    curve.public_path(keys, "notifier").unlink()
    cfg2 = qfconfig.load(tcp_env(tmp_path, QF_CURVE_KEYS=str(keys), QF_MD_PUB="tcp://127.0.0.1:1"))
    assert curve.load(cfg2, "api").party == "api"
    with pytest.raises(curve.KeyFileError, match="notifier.key"):
        curve.load(cfg2, "broker")


def test_the_setting_must_name_a_directory_and_is_listed(tmp_path, capsys):
    with pytest.raises(ConfigError, match="QF_CURVE_KEYS='/nowhere/keys': must be empty .off. or the directory"):
        qfconfig.load(tcp_env(tmp_path, QF_CURVE_KEYS="/nowhere/keys"))
    assert qf(["config"]) == 0
    assert "| `QF_CURVE_KEYS` | (empty) |" in capsys.readouterr().out


def test_who_may_send_what_to_risk():
    assert curve.refusal("strategy", "order") is None
    assert curve.refusal("strategy", "cancel") is None
    assert curve.refusal("strategy", "control", "STATE") is None
    assert curve.refusal("api", "control", "STATE") is None
    for action in ("HALT", "RESUME", "FLATTEN"):
        assert curve.refusal("api", "control", action) is None
        assert "control " + action in curve.refusal("strategy", "control", action)
    assert curve.refusal("api", "order") == "order is not accepted from the api key (only from: strategy)"
    assert curve.refusal("api", "cancel") is not None
    assert curve.refusal("unknown", "control", "STATE") is not None


def test_the_broker_order_port_takes_risk_alone():
    """The table every socket is built from: the design in one place."""
    assert curve.SERVERS["broker_rep"] == ("broker", ("risk",))
    assert curve.SERVERS["risk_rep"] == ("risk", ("strategy", "api"))
    owners = {owner for owner, _ in curve.SERVERS.values()}
    assert owners == {"marketdata", "risk", "broker", "strategy"}
    for owner, clients in curve.SERVERS.values():
        assert owner not in clients and set(clients) <= set(curve.PARTIES)
