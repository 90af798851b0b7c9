"""Recording what marketdata receives as rotated capture files, flushed so a crash loses under 1 s."""
from __future__ import annotations

import gzip
import logging
import os
import time
import zlib
from typing import Callable

import orjson

from services.marketdata.sync import Market
from shared import storage

log = logging.getLogger("qf.marketdata.record")

FLUSH_S = 0.5  # half the promise: a flush late by a slow loop turn still keeps it
RETRY_S = 5.0  # after a write failed (a full disk), records are dropped this long, then a new segment is tried


def segment_name(out: str, started: time.struct_time, seq: int) -> str:
    """`caps/btc.jsonl.gz` → `caps/btc-20240808T235413Z-0001.jsonl.gz`: sorted names are in
    recording order. Raises ValueError unless `out` ends in .jsonl.gz or .jsonl."""
    for suffix in (".jsonl.gz", ".jsonl"):
        if out.endswith(suffix):
            return f"{out[:-len(suffix)]}-{time.strftime('%Y%m%dT%H%M%SZ', started)}-{seq:04d}{suffix}"
    raise ValueError(f"a capture path ends in .jsonl.gz or .jsonl: {out!r}")


class Recorder:
    """Appends capture records to the current segment file.

    `ws()` takes a frame as received (bytes/str, written as is: no re-encoding) or an already
    decoded message; `snapshot()` a REST snapshot. USD-M records carry `"x": "usdm"` (stream
    names do not say the market). `tick()` flushes every FLUSH_S (a gzip sync flush, so all
    complete lines so far are readable after a crash) and starts a new segment after
    `rotate_s` seconds or `rotate_bytes` bytes. `Recorder(out)` raises StorageError when the
    directory of `out` cannot be made or written (a read-only volume). A write that fails later
    (a full disk) never reaches the feed: the segment is given up (readable up to its last
    flush), records are dropped and counted (`dropped`) for RETRY_S, then a new segment is
    tried; logged once when it starts failing and once when it records again.
    """

    def __init__(self, out: str, rotate_s: float = 3600.0, rotate_bytes: int = 256 << 20,
                 flush_s: float = FLUSH_S, clock: Callable[[], float] = time.monotonic) -> None:
        segment_name(out, time.gmtime(), 1)  # validates the suffix now, not at the first message
        storage.ensure_writable_dir(os.path.dirname(os.path.abspath(out)))
        self.out, self.rotate_s, self.rotate_bytes, self.flush_s, self.clock = out, rotate_s, rotate_bytes, flush_s, clock
        self.gz = out.endswith(".gz")
        self.segments: list[str] = []
        self.lines = 0
        self._raw = None
        self._fh = None
        self._opened = self._flushed = 0.0
        self._dirty = False
        self.failing: str | None = None  # why the last write failed, while recording is off
        self.dropped = 0  # records not written because writes failed
        self._retry_at = 0.0
        self._reopened = False  # a segment opened after a failure: it needs its own snapshots

    def _open(self) -> None:
        name = segment_name(self.out, time.gmtime(), len(self.segments) + 1)
        os.makedirs(os.path.dirname(os.path.abspath(name)), exist_ok=True)
        self._raw = open(name, "xb")  # never overwrite an earlier recording
        self._fh = gzip.GzipFile(fileobj=self._raw, mode="wb", compresslevel=6) if self.gz else self._raw
        self.segments.append(name)
        self._opened = self._flushed = self.clock()
        log.info("recording", extra={"file": name})

    def _write(self, line: bytes) -> None:
        if self.failing is not None and self.clock() < self._retry_at:
            self.dropped += 1
            return
        try:
            if self._fh is None:
                self._open()
                if self.failing is not None:
                    log.warning("recording again", extra={"file": self.segments[-1], "dropped": self.dropped})
                    self.failing, self._reopened = None, True
            self._fh.write(line)
        except OSError as exc:
            self.dropped += 1
            self._failed(exc)
            return
        self.lines += 1
        self._dirty = True

    def _failed(self, exc: OSError) -> None:
        """A write failed: give the segment up and drop records for RETRY_S."""
        first = self.failing is None
        self.failing = storage.problem(exc)
        self._retry_at = self.clock() + RETRY_S
        if first:
            log.error("recording failed", extra={"file": self.segments[-1] if self.segments else self.out,
                                                 "problem": self.failing, "retry_s": RETRY_S})
        fh, raw = self._fh, self._raw
        self._fh = self._raw = None
        for f in (fh, raw):
            if f is not None:
                try:
                    f.close()
                except OSError:  # the same full disk: what was flushed stays readable
                    pass

    def ws(self, recv_ns: int, raw, market: Market) -> None:
        """Record one stream message received at recv_ns (ns since epoch)."""
        if isinstance(raw, (dict, list)):
            frame = orjson.dumps(raw)
        else:
            frame = raw.encode() if isinstance(raw, str) else bytes(raw)
            if b"\n" in frame or b"\r" in frame:  # valid JSON may hold raw newlines; a line may not
                frame = orjson.dumps(orjson.loads(frame))
        x = b',"x":"usdm"' if market is Market.USDM else b""
        self._write(b'{"t":%d,"k":"ws"%s,"m":%s}\n' % (recv_ns, x, frame))

    def snapshot(self, recv_ns: int, symbol: str, snap: dict, market: Market) -> None:
        """Record one REST depth snapshot of `symbol` received at recv_ns."""
        rec = {"t": recv_ns, "k": "snapshot", "s": symbol.upper()}
        if market is Market.USDM:
            rec["x"] = "usdm"
        rec["m"] = snap
        self._write(orjson.dumps(rec) + b"\n")

    def tick(self, now: float | None = None) -> bool:
        """Flush when due; rotate when the segment is old or big enough. Call it often.
        Returns True when a segment was just closed (the caller fetches fresh snapshots so the
        next segment can be replayed on its own)."""
        if self._reopened:
            self._reopened = False
            return True
        if self._fh is None:
            return False
        now = self.clock() if now is None else now
        try:
            if self._dirty and now - self._flushed >= self.flush_s:
                self.flush()
                self._flushed = now
            if now - self._opened >= self.rotate_s or self._raw.tell() >= self.rotate_bytes:
                self._close_segment()
                return True
        except OSError as exc:
            self._failed(exc)
        return False

    def flush(self) -> None:
        """Push everything written so far to the OS (a crash of this process then loses nothing)."""
        if self._fh is None:
            return
        if self.gz:
            self._fh.flush(zlib.Z_SYNC_FLUSH)
        self._raw.flush()
        self._dirty = False

    def _close_segment(self) -> None:
        fh, raw = self._fh, self._raw
        self._fh = self._raw = None
        if fh is not raw:
            fh.close()  # writes the gzip trailer
        raw.close()
        log.info("recording segment closed", extra={"file": self.segments[-1], "lines": self.lines})

    def close(self) -> None:
        """Finish the current segment (complete gzip file)."""
        if self._fh is not None:
            try:
                self._close_segment()
            except OSError as exc:
                self._failed(exc)
