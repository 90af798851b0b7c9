"""Marketdata shell: the feed, the PUB socket, metrics, heartbeats and recording around BookRouter."""
from __future__ import annotations

import logging
import time

from services.marketdata.feeds import ReplayFeed
from services.marketdata.guard import BookGuard
from services.marketdata.metrics import serve
from services.marketdata.router import BookRouter
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


class MarketDataService:
    """Runs the feed (live Binance or replayed captures) into a BookRouter until stopped: the
    clock, the PUB socket, metrics, heartbeats and the recording are here; the books and what
    they publish are the router's (`self.router`).

    `publish=False` binds no PUB socket (recording only); `recorder` (or QF_MD_RECORD) writes
    what arrives; `exit_when_done` makes a finished replay return instead of idling."""

    def __init__(self, cfg: Config, publish: bool = True, recorder=None, exit_when_done: bool = False) -> None:
        if recorder is None and cfg.md.record:
            from services.marketdata.record import Recorder
            recorder = Recorder(cfg.md.record, cfg.md.record_rotate_s, int(cfg.md.record_rotate_mb * 1e6))
        self.cfg, self.recorder = cfg, recorder
        self.router = BookRouter(cfg.md.symbols, cfg.md.book_depth, recorder, now_ns=time.time_ns())
        self.keys = self.symbols = self.router.keys
        self.publish_enabled, self.exit_when_done = publish, exit_when_done
        self.feed = None
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
        return LiveFeed(md, self.keys, self.router.m, self._stopping)

    def run(self) -> None:
        cfg, router = self.cfg, self.router
        pub = router.pub = Publisher(cfg.bus.md_pub, cfg.bus.hwm) if self.publish_enabled else _NoPublisher()
        live = Liveness(cfg.common.run_dir, "marketdata")
        beat, hb = Ticker(cfg.bus.heartbeat_ms), HeartbeatMaker("marketdata")
        server = None
        try:
            if cfg.md.metrics_bind:
                try:
                    server, self.metrics_port = serve(cfg.md.metrics_bind, router.m)
                except OSError as exc:
                    raise FatalError(f"cannot serve metrics on {cfg.md.metrics_bind}: {exc}") from None
                log.info("metrics listening", extra={"bind": cfg.md.metrics_bind, "port": self.metrics_port})
            self.feed = router.feed = self._make_feed()
            live_feed = router.live_feed = cfg.md.feed.kind != "replay"
            if live_feed:  # a capture brings its own snapshots: nothing to pace or recover
                router.guard = BookGuard(self.keys, cfg.md.sync_timeout_s)
                router.alerter = Alerter("marketdata", pub.publish)
            check = Ticker(CHECK_BOOKS_MS) if router.guard is not None else None
            log.info("marketdata started", extra={"feed": str(cfg.md.feed), "symbols": ",".join(self.keys),
                                                  "pub": cfg.bus.md_pub if self.publish_enabled else "off"})
            recorder, dispatch, wall, mono = self.recorder, router.dispatch, time.time_ns, time.monotonic
            for rec in self.feed.records():
                now = mono()
                dispatch(rec, wall(), now)
                if recorder is not None and recorder.tick() and live_feed:
                    router.snapshots_for_new_segment()
                if check is not None and check.due(now):
                    self._check_books(now)
                if beat.due(now):
                    self._heartbeat(hb, live)
                if self._stop:
                    break
            if cfg.md.feed.kind == "replay" and not self._stop:
                router.replay_done(time.time_ns(), time.monotonic())
                log.info("replay finished", extra=dict(router.stats))
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
            pub.close()
            log.info("marketdata stopped", extra=dict(router.stats))

    def _check_books(self, now: float) -> None:
        try:
            self.router.check_books(time.time_ns(), now)
        except Exception:  # the net under the books must not take the service down either
            self.router.m.bad("internal_error")
            log.exception("check_books failed")

    def _heartbeat(self, hb: HeartbeatMaker, live: Liveness) -> None:
        router = self.router
        states = set(router.state.values())
        status = "ok" if states == {"SYNCED"} else ",".join(sorted(states))
        now_ns = time.time_ns()
        for key, state in router.state.items():
            if state != "SYNCED":  # late subscribers learn why no book comes, and since when
                router.pub.publish(f"status.{key}", MdStatus(ts=now_ns, symbol=key, state=state,
                                                            detail=router.status_detail(key, now_ns)))
        stats, m = router.stats, router.m
        stats["reconnects"] = sum(m.reconnects.values())
        since = [t for t in m.unsynced_since.values() if t]
        stats["unsynced_s"] = round((now_ns - min(since)) / 1e9, 1) if since else 0.0
        extra = {"recorded": self.recorder.lines} if self.recorder is not None else {}
        router.pub.publish("heartbeat.marketdata", hb.make(status, {**stats, **extra, "state": status}))
        live.touch()
