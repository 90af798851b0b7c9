"""Risk's latency figures and the socket helpers of its hot path: MicrosHistogram's exact
nearest-rank percentiles, however the values fall across its blocks; frames sent and received
as pyzmq's multipart calls would."""
from __future__ import annotations

import math

import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.runtime import MicrosHistogram
from shared.bus import NOBLOCK, readable, recv_frames, send_frames


def nearest_rank(values_us: list[int], p: float, top: int) -> int:
    ordered = sorted(min(v, top) for v in values_us)
    return ordered[max(1, math.ceil(p / 100 * len(ordered))) - 1]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([1, 63, 64, 65, 200, 5000]),
       st.lists(st.integers(0, 12_000), min_size=1, max_size=400),
       st.lists(st.sampled_from([0.1, 1, 50, 90, 99, 99.9, 100]), min_size=1, max_size=4))
def test_percentiles_are_the_nearest_rank_of_what_was_recorded(top, values_us, ps):
    h = MicrosHistogram(top_us=top)
    for us in values_us:
        h.record_ns(us * 1000 + 999)  # a bin holds [us, us + 1) µs
    assert h.percentiles(*ps) == [nearest_rank(values_us, p, top) for p in ps]
    assert (h.count, h.max_us) == (len(values_us), max(values_us))


def test_an_empty_histogram_reads_zero():
    assert MicrosHistogram().percentiles(50, 99) == [0, 0]
    assert MicrosHistogram().stats("x") == {"x_us_p50": 0, "x_us_p99": 0, "x_us_max": 0, "x_n": 0}


def test_frames_helpers_match_pyzmq_multipart_and_readable_tells_a_waiting_message():
    ctx = zmq.Context.instance()
    a, b = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
    try:
        b.bind("inproc://frames-helpers")
        a.connect("inproc://frames-helpers")
        assert not readable(b)
        with pytest.raises(zmq.Again):
            recv_frames(b, NOBLOCK)
        send_frames(a, (b"id", b"", b"payload"))
        a.send_multipart([b"x"])
        assert b.poll(1000) and readable(b)
        assert recv_frames(b) == [b"id", b"", b"payload"]
        assert recv_frames(b, NOBLOCK) == [b"x"]
        assert not readable(b)
    finally:
        a.close(linger=0)
        b.close(linger=0)
