"""Marketdata shell: the feed, the PUB socket, metrics, heartbeats and recording around BookRouter."""
from __future__ import annotations

import logging
import time

from services.marketdata.feeds import ReplayFeed
from services.marketdata.guard import BookGuard
from services.marketdata.metrics import serve
from services.marketdata.router import BookRouter
from services.marketdata.symbols import split_key
from services.marketdata.sync import Market
from shared.alerts import Alerter
from shared.bus import Publisher
from shared.config import Config
from shared.errors import FatalError
from shared.messages import MdStatus
from shared.runtime import HeartbeatMaker, Liveness, Ticker

log = logging.getLogger("qf.marketdata")

CHECK_BOOKS_MS = 100  # snapshot backoffs and stalls are looked at this often (live feeds)


class _NoPublisher:
    """Stands in for the PUB socket when marketdata only records (`qf record`)."""

    def publish(self, topic: str, msg) -> None:
        pass

    def close(self) -> None:
        pass


class MarketDataService(BookRouter):
    """Runs the feed (live Binance or replayed captures) into BookRouter until stopped.

    `publish=False` binds no PUB socket (recording only); `recorder` (or QF_MD_RECORD) writes
    what arrives; `exit_when_done` makes a finished replay return instead of idling."""

    def __init__(self, cfg: Config, publish: bool = True, recorder=None, exit_when_done: bool = False) -> None:
        if recorder is None and cfg.md.record:
            from services.marketdata.record import Recorder
            recorder = Recorder(cfg.md.record, cfg.md.record_rotate_s, int(cfg.md.record_rotate_mb * 1e6))
        super().__init__(cfg.md.symbols, cfg.md.book_depth, recorder)
        self.cfg = cfg
        self.symbols = self.keys
        self.publish_enabled, self.exit_when_done = publish, exit_when_done
        self.metrics_port: int | None = None
        self._stop = False

    def stop(self) -> None:
        self._stop = True

    def _stopping(self) -> bool:
        return self._stop

    def _make_feed(self):
        md = self.cfg.md
        if md.feed.kind == "replay":
            return ReplayFeed(md.feed.path, self.keys, md.replay_speed, md.replay_loop, self._stopping)
        from services.marketdata.live import LiveFeed
        self._live_feed = True
        return LiveFeed(md, self.keys, self.m, self._stopping)

    def run(self) -> None:
        cfg = self.cfg
        self.pub = Publisher(cfg.bus.md_pub, cfg.bus.hwm) if self.publish_enabled else _NoPublisher()
        live = Liveness(cfg.common.run_dir, "marketdata")
        beat, hb = Ticker(cfg.bus.heartbeat_ms), HeartbeatMaker("marketdata")
        server = None
        try:
            if cfg.md.metrics_bind:
                try:
                    server, self.metrics_port = serve(cfg.md.metrics_bind, self.m)
                except OSError as exc:
                    raise FatalError(f"cannot serve metrics on {cfg.md.metrics_bind}: {exc}") from None
                log.info("metrics listening", extra={"bind": cfg.md.metrics_bind, "port": self.metrics_port})
            self.feed = self._make_feed()
            if self._live_feed:  # a capture brings its own snapshots: nothing to pace or recover
                self.guard = BookGuard(self.keys, cfg.md.sync_timeout_s)
                self.alerter = Alerter("marketdata", self.pub.publish)
            check = Ticker(CHECK_BOOKS_MS) if self.guard is not None else None
            log.info("marketdata started", extra={"feed": str(cfg.md.feed), "symbols": ",".join(self.keys),
                                                  "pub": cfg.bus.md_pub if self.publish_enabled else "off"})
            recorder = self.recorder
            for rec in self.feed.records():
                self._dispatch(rec)
                if recorder is not None and recorder.tick():
                    self._snapshots_for_new_segment()
                if check is not None:
                    now = time.monotonic()
                    if check.due(now):
                        self._check_books(now)
                if beat.due():
                    self._heartbeat(hb, live)
                if self._stop:
                    break
            if cfg.md.feed.kind == "replay" and not self._stop:
                for k in self.keys:
                    self._set_state(k, "REPLAY_DONE", "capture finished")
                log.info("replay finished", extra=dict(self.stats))
            while not self._stop and not self.exit_when_done:  # stay up for subscribers and health checks
                self._heartbeat(hb, live)
                deadline = time.monotonic() + cfg.bus.heartbeat_ms / 1000
                while not self._stop and time.monotonic() < deadline:
                    time.sleep(0.05)
        finally:
            if self.feed is not None:
                self.feed.close()
            if self.recorder is not None:
                self.recorder.close()
            if server is not None:
                server.shutdown()
                server.server_close()
            live.remove()
            self.pub.close()
            log.info("marketdata stopped", extra=dict(self.stats))

    def _snapshots_for_new_segment(self) -> None:
        """A new recording segment starts: give it its own snapshots (live only; a synced book
        ignores them), so each file replays on its own."""
        if not self._live_feed:
            return
        for route in self.live_route.values():
            for name in route.keys:
                if name not in route.awaiting:
                    route.awaiting.add(name)
                    self.feed.request_snapshot(route, name.upper())

    def _dispatch(self, rec: tuple) -> None:
        """Handle one feed record (see feeds.py). The forms without a route,
        `("raw", recv_ns, frame)` and `("snapshot", recv_ns, KEY, snap)`, go to the live
        spot route (for a snapshot of a `USDM:` key, the live USD-M one)."""
        kind = rec[0]
        try:
            if kind == "raw":
                self.on_raw(rec[2], rec[1], rec[3] if len(rec) > 3 else self.live_route[Market.SPOT])
            elif kind == "ws":
                self.on_ws(rec[2], rec[1], rec[3] if len(rec) > 3 else self.live_route[Market.SPOT])
            elif kind == "snapshot":
                if len(rec) > 4:
                    self.on_snapshot(rec[2], rec[3], rec[1], rec[4])
                else:
                    market, name = split_key(rec[2])
                    self.on_snapshot(name, rec[3], rec[1], self.live_route[market])
            elif kind == "route":
                self.on_route(rec[2])
            elif kind == "disconnected":
                self.on_disconnected(rec[2], rec[3] if len(rec) > 3 else None)
        except Exception:  # one bad record must not take the service down
            self.m.bad("internal_error")
            self.stats["bad_messages"] += 1
            log.exception("record failed", extra={"kind": str(kind)})

    def _check_books(self, now: float) -> None:
        try:
            self.check_books(now)
        except Exception:  # the net under the books must not take the service down either
            self.m.bad("internal_error")
            log.exception("check_books failed")

    def _heartbeat(self, hb: HeartbeatMaker, live: Liveness) -> None:
        states = set(self.state.values())
        status = "ok" if states == {"SYNCED"} else ",".join(sorted(states))
        now_ns = time.time_ns()
        for key, state in self.state.items():
            if state != "SYNCED":  # late subscribers learn why no book comes, and since when
                self.pub.publish(f"status.{key}", MdStatus(ts=now_ns, symbol=key, state=state,
                                                          detail=self.status_detail(key)))
        self.stats["reconnects"] = sum(self.m.reconnects.values())
        since = [t for t in self.m.unsynced_since.values() if t]
        self.stats["unsynced_s"] = round((now_ns - min(since)) / 1e9, 1) if since else 0.0
        extra = {"recorded": self.recorder.lines} if self.recorder is not None else {}
        self.pub.publish("heartbeat.marketdata", hb.make(status, {**self.stats, **extra, "state": status}))
        live.touch()
