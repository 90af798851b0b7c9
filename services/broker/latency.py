"""Order latency for the paper exchange: the feed's measured lag and the entry latency models."""
from __future__ import annotations

import math
import random
from collections import deque

MS = 1_000_000
# Entry latency and feed lag are each capped here, so that an order's whole delay
# (entry + feed lag ≤ 400 ms) stays under risk's broker timeout (500 ms by default).
MAX_LATENCY_NS = 200 * MS
LAG_WINDOW = 101  # recent lag samples whose median is the estimate
LAG_MIN_SAMPLES = 5

MODES = ("feed", "constant", "lognormal")


class FeedLag:
    """Median of the recent exchange-to-receive lags of the market data.

    `observe(recv_ns, exch_ms)` per book or trade; `lag_ns` is the median when
    the clocks allow it (enough samples, and a median in (0, 200 ms]), else
    None: a replayed capture, a skewed clock or an event without times."""

    def __init__(self, window: int = LAG_WINDOW) -> None:
        self._samples: deque[int] = deque(maxlen=window)
        self._cached: int | None = None
        self._dirty = False

    def observe(self, recv_ns: int, exch_ms: int) -> None:
        """One event's local receive time (ns) and exchange time (ms); zeros are ignored."""
        if recv_ns > 0 and exch_ms > 0:
            self._samples.append(recv_ns - exch_ms * MS)
            self._dirty = True

    @property
    def samples(self) -> int:
        return len(self._samples)

    @property
    def lag_ns(self) -> int | None:
        """The median lag in ns, or None when it cannot be trusted."""
        if self._dirty:
            self._dirty = False
            if len(self._samples) < LAG_MIN_SAMPLES:
                self._cached = None
            else:
                ordered = sorted(self._samples)
                median = ordered[len(ordered) // 2]
                self._cached = median if 0 < median <= MAX_LATENCY_NS else None
        return self._cached


class LatencyModel:
    """Entry latency of one order (decision → simulated exchange) and the feed lag
    (exchange → us) after which the book as of that arrival can be seen here.

    Modes: `feed` uses the measured lag as the entry latency (a symmetric path),
    falling back to `ms` when the clocks do not allow it; `constant` is `ms`;
    `lognormal` samples a lognormal with median `ms` and log-sigma `sigma`
    from a seeded generator. Every value is capped at MAX_LATENCY_NS.
    Raises ValueError for an unknown mode or a negative `ms`/`sigma`."""

    def __init__(self, mode: str = "constant", ms: float = 0.0, sigma: float = 0.5, seed: int = 0,
                 feed: FeedLag | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"latency mode must be one of {MODES}, got {mode!r}")
        if ms < 0 or sigma < 0 or not math.isfinite(ms) or not math.isfinite(sigma):
            raise ValueError(f"latency needs ms >= 0 and sigma >= 0, got {ms}, {sigma}")
        self.mode = mode
        self.base_ns = min(int(ms * MS), MAX_LATENCY_NS)
        self.sigma = sigma
        self.feed = feed if feed is not None else FeedLag()
        self._rng = random.Random(seed)

    def entry_ns(self) -> int:
        """Entry latency for the next order, ns."""
        if self.mode == "feed":
            lag = self.feed.lag_ns
            return self.base_ns if lag is None else lag
        if self.mode == "lognormal" and self.base_ns and self.sigma:
            return min(int(self.base_ns * math.exp(self.sigma * self._rng.gauss(0.0, 1.0))), MAX_LATENCY_NS)
        return self.base_ns

    def visible_ns(self) -> int:
        """How long after an exchange instant its book reaches us: the measured lag, else 0."""
        lag = self.feed.lag_ns
        return 0 if lag is None else lag

    def describe(self) -> dict:
        """The current figures, for logs and heartbeats."""
        lag = self.feed.lag_ns
        return {"mode": self.mode, "base_ms": self.base_ns / MS, "feed_lag_ms": None if lag is None else lag / MS}
