"""A broker process with its database on a 1 MiB tmpfs: filled to the last byte, then freed. Less than
1 MiB can ever be free there; the broker must still find the space back by itself and take orders."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from shared import storage
from shared.config import load
from shared.messages import Ack, Error
from tests.conftest import ROOT, SmallDisk, clean_environ, tcp_env, wait_for
from tests.services.broker.test_crash import START_CASH, check_database
from tests.test_disks import ANSWER_S, RECOVER_S, RISK, Books, Listener, ask, fill_to_the_last_byte, order

WAIT_S = 20.0  # bound of a wait on the broker process


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs (as a user's small volume), unmounted after the test."""
    path = tmp_path / "tiny"
    path.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", str(path)],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot mount a tmpfs: {exc}")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield SmallDisk(path)
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_the_space_check_fits_a_small_file_system(tiny_disk):
    """What the probe writes is at most 1/16 of the file system (1 MiB on one of 16 MiB or more)."""
    assert storage.check_bytes(str(tiny_disk.path)) == (1 << 20) // storage.SPACE_CHECK_SHARE
    assert storage.has_room(str(tiny_disk.path)) is None
    tiny_disk.fill()
    assert storage.has_room(str(tiny_disk.path)) is not None
    tiny_disk.free()
    assert storage.has_room(str(tiny_disk.path)) is None


@pytest.mark.timeout(120)
def test_a_broker_on_a_1_mib_disk_takes_orders_again_once_space_returns(tmp_path, tiny_disk):
    settings = tcp_env(tmp_path, QF_DB=str(tiny_disk.path / "qf.db"), QF_RUN_DIR=str(tmp_path / "run"),
                       **{**RISK, "QF_START_CASH": str(START_CASH)})
    cfg = load(settings)
    db = cfg.common.db
    env = {**clean_environ(), **settings, "PYTHONPATH": ROOT}
    md, listener = Books(cfg.bus.md_pub), Listener(cfg.bus.broker_pub)
    md.start()
    listener.start()
    log_path = tmp_path / "broker.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "services.cli", "broker"], env=env, cwd=ROOT,
                                stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    told: dict[str, dict] = {}
    n = iter(range(1_000_000))

    def filled(prefix: str) -> Ack | None:
        reply, _ = ask(cfg.bus.broker_rep, order(f"{prefix}-{next(n)}"))
        if isinstance(reply, Ack) and reply.status.value == "FILLED":
            told.update((f.fill_id, f.to_wire()) for f in reply.fills)
            return reply
        return None
    try:
        wait_for(lambda: filled("warm") or proc.poll() is not None, WAIT_S, "the broker to fill an order")
        assert proc.poll() is None, log_path.read_text()[-3000:]
        for _ in range(5):
            assert filled("before")
        # the listener hears the broker's PUB (a SUB connects a while after the PUB binds): no alert can be missed
        wait_for(lambda: listener.beat is not None and listener.beat.stats["store"] == "ok", WAIT_S, "a heartbeat")
        fill_to_the_last_byte(tiny_disk, db)
        reply, _ = ask(cfg.bus.broker_rep, order("full"))
        assert isinstance(reply, Error) and reply.code == "STORE_UNAVAILABLE", reply
        wait_for(lambda: listener.of("broker", "STORE_UNAVAILABLE") == ["error"], WAIT_S, "the broker's alert")

        tiny_disk.free()
        st = os.statvfs(tiny_disk.path)
        assert st.f_bavail * st.f_frsize < 1 << 20  # what the probe used to ask for can never be free here
        wait_for(lambda: filled("after"), RECOVER_S + ANSWER_S, "the broker to fill orders again",
                 explain=lambda: log_path.read_text()[-2000:])
        wait_for(lambda: listener.of("broker", "STORE_UNAVAILABLE") == ["error", "resolved"], WAIT_S,
                 "the broker's alert resolved")
        wait_for(lambda: listener.beat is not None and listener.beat.stats["store"] == "ok", WAIT_S,
                 "the heartbeat to show the store ok")
        for _ in range(5):
            assert filled("after")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            md.stop.set()
            listener.stop.set()
            md.join(5)
            listener.join(5)
    assert code == 0, log_path.read_text()[-3000:]
    assert len(told) >= 12
    assert check_database(db, told) == len(told)  # every acknowledged fill stored, once, as told; no other
