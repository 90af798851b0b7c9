"""The outbox: a message leaves only when done; order per chat; kept across a reopen."""
from __future__ import annotations


import pytest

from services.notifier import outbox as outbox_mod
from services.notifier.core import Outgoing
from services.notifier.outbox import Outbox
from shared.errors import StorageError


def test_fan_out_order_per_chat_done_failed_and_reopen(tmp_path):
    box = Outbox(str(tmp_path))
    box.add((1, -100), Outgoing("fills", "first"), 10)
    box.add((1, -100), Outgoing("report", "second", b"\x89PNG"), 11)
    heads = {h.chat: h.item for h in box.heads()}
    assert {c: p.text for c, p in heads.items()} == {1: "first", -100: "first"}
    box.failed(heads[1].id, not_before_ns=99)
    box.done(heads[-100].id)
    box.close()

    again = Outbox(str(tmp_path))  # a restart: what was not done is still there
    heads = {h.chat: h for h in again.heads()}
    assert heads[1].item.text == "first" and heads[1].item.attempts == 1 and heads[1].not_before == 99
    assert heads[-100].item.text == "second" and heads[-100].item.photo == b"\x89PNG"
    assert again.pending() == 3
    again.retarget(-100, -1009)
    assert {h.chat for h in again.heads()} == {1, -1009}


def test_memory_and_a_bounded_queue(tmp_path, monkeypatch):
    box = Outbox(str(tmp_path))
    assert box.get("core") is None
    box.put("core", {"state": "HALTED"})
    box.put("core", {"state": "ACTIVE"})
    assert box.get("core") == {"state": "ACTIVE"}
    monkeypatch.setattr(outbox_mod, "MAX_PENDING", 5)
    for i in range(8):
        box.add((1,), Outgoing("alert", f"m{i}"), i)
    assert box.pending() == 5 and box.dropped == 3
    assert box.heads()[0].item.text == "m3"  # the oldest went


def test_a_directory_it_cannot_write_is_a_storage_error(tmp_path):
    target = tmp_path / "file"
    target.write_text("not a directory")
    with pytest.raises(StorageError):
        Outbox(str(target))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / outbox_mod.FILE).write_bytes(b"this is not a database, just some bytes" * 100)
    with pytest.raises(StorageError, match="not a database"):
        Outbox(str(tmp_path / "run"))
