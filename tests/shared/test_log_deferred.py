"""shared.log.Deferred: a line made at the event keeps its time and fields, and is written only
when flushed, or when too many wait; `due` says when the oldest has waited too long."""
from __future__ import annotations

import io
import logging
import time

from shared.log import Deferred, KeyValueFormatter


def _logger(stream: io.StringIO) -> logging.Logger:
    logger = logging.getLogger("qf.test_deferred")
    logger.handlers[:] = []
    handler = logging.StreamHandler(stream)
    handler.setFormatter(KeyValueFormatter("broker"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger


def test_lines_wait_for_flush_and_keep_the_time_they_were_made():
    out = io.StringIO()
    later = Deferred(_logger(out))
    later.info("order", {"client_order_id": "a-1", "status": "FILLED"})
    made = later.records[0].created
    assert out.getvalue() == "" and later.pending
    assert not later.due(made + Deferred.MAX_AGE_S / 2) and later.due(made + Deferred.MAX_AGE_S * 1.01)
    time.sleep(0.01)  # the line's ts is the event's, not the flush's
    later.flush()
    line = out.getvalue()
    assert line.count("\n") == 1 and "event=order" in line and "client_order_id=a-1" in line
    assert time.strftime("%H:%M:%S", time.gmtime(made)) in line and not later.pending


def test_too_many_waiting_are_written_at_once_and_nothing_below_the_level_is_kept():
    out = io.StringIO()
    logger = _logger(out)
    later = Deferred(logger)
    for i in range(Deferred.MAX):
        later.info("order", {"n": i})
    assert out.getvalue().count("\n") == Deferred.MAX and not later.pending
    logger.setLevel(logging.WARNING)
    later.info("order", {"n": -1})
    assert not later.pending and not later.due()
