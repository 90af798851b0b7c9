"""Marketdata shell: the feed, the PUB socket, metrics, heartbeats and recording around BookRouter."""
from __future__ import annotations

import logging
import time

from services.marketdata.conductor import CountingPublisher, LockstepReplay, open_conductor
from services.marketdata.feeds import ReplayFeed
from services.marketdata.guard import BookGuard
from services.marketdata.metrics import serve
from services.marketdata.router import BookRouter
from shared import curve
from shared.alerts import Alerter
from shared.bus import Publisher
from shared.config import Config
from shared.errors import ConfigError
from shared.lockstep import LockstepClock
from shared.messages import MdStatus
from shared.runtime import HeartbeatMaker, Liveness, Ticker, identity, liveness_path, quiet_gc

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
    what arrives; `exit_when_done` makes a finished replay return instead of idling.

    With QF_LOCKSTEP (`qf up --lockstep`, a replay feed only: ConfigError otherwise) it conducts
    a lock-step replay (conductor.py) instead of pacing one: the capture's records on their
    recorded time, each released once the other services have finished with the previous one;
    its own clock (`self.clock`) is then the capture's time released so far."""

    def __init__(self, cfg: Config, publish: bool = True, recorder=None, exit_when_done: bool = False) -> None:
        if recorder is None and cfg.md.record:
            from services.marketdata.record import Recorder
            recorder = Recorder(cfg.md.record, cfg.md.record_rotate_s, int(cfg.md.record_rotate_mb * 1e6))
        self.cfg, self.recorder = cfg, recorder
        self.curve = curve.load(cfg, "marketdata") if publish else None  # KeyFileError: one line, exit 2
        self.lockstep = bool(cfg.bus.lockstep)
        if self.lockstep and cfg.md.feed.kind != "replay":
            raise ConfigError(f"QF_LOCKSTEP is a lock-step replay: it needs QF_FEED=replay:FILE, not {cfg.md.feed}")
        self.clock = LockstepClock() if self.lockstep else time.time_ns
        self.conductor = None
        # a lock-step replay's time starts at its first record, as the backtest's does
        self.router = BookRouter(cfg.md.symbols, cfg.md.book_depth, recorder,
                                 now_ns=0 if self.lockstep else time.time_ns())
        self.keys = self.symbols = self.router.keys
        self.publish_enabled, self.exit_when_done = publish, exit_when_done
        self.feed = None
        self.metrics_port: int | None = None
        self._stop = False
        self.replay_issues: list[tuple[str, str]] = []  # a finished replay's replay_problems()

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
        pub_cls = CountingPublisher if self.lockstep else Publisher
        pub = router.pub = pub_cls(cfg.bus.md_pub, cfg.bus.hwm, curve=self.curve) if self.publish_enabled \
            else _NoPublisher()
        name = identity("marketdata", cfg.common.instance)
        live = Liveness(cfg.common.run_dir, name)
        beat, hb = Ticker(cfg.bus.heartbeat_ms), HeartbeatMaker(name)
        server = None
        try:
            if cfg.md.metrics_bind:  # MetricsBindError (a FatalError) when it cannot be bound
                server = serve(cfg.md.metrics_bind, router.m, liveness_path(cfg.common.run_dir, name))
                self.metrics_port = server.port
                log.info("metrics listening", extra={"bind": cfg.md.metrics_bind, "port": self.metrics_port})
            quiet_gc()  # shared/runtime.py: the cycle collector off the per-event path
            if self.lockstep:
                self._run_lockstep(pub, beat, hb, live)
            else:
                self._run_feed(pub, beat, hb, live)
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
                server.close()
            if self.conductor is not None:
                self.conductor.close()
            live.remove()
            pub.close()
            log.info("marketdata stopped", extra=dict(router.stats))

    def _run_feed(self, pub, beat: Ticker, hb: HeartbeatMaker, live: Liveness) -> None:
        """The feed, live or a replay paced by QF_REPLAY_SPEED, until it ends or the service stops."""
        cfg, router = self.cfg, self.router
        self.feed = router.feed = self._make_feed()
        live_feed = router.live_feed = cfg.md.feed.kind != "replay"
        if not live_feed:  # bad messages are named by the file and line they were read from
            router.where = self.feed.where
        if live_feed:  # a capture brings its own snapshots: nothing to pace or recover
            router.guard = BookGuard(self.keys, cfg.md.sync_timeout_s)
            router.alerter = Alerter(hb.service, pub.publish)
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
            error = self.replay_error()
            if error:  # not "finished": the status, /health and the notifier say the capture failed
                router.replay_done(time.time_ns(), time.monotonic(), f"capture unreadable: {error}"[:300],
                                   "REPLAY_FAILED")
                log.error("replay failed", extra={"error": error[:300], **router.stats})
            else:
                self._replay_finished(time.time_ns(), time.monotonic())

    def _replay_finished(self, now_ns: int, now: float | None = None) -> None:
        """REPLAY_DONE, its detail and the final log line saying what was wrong with the capture
        (bad messages, receive times going back, symbols without a book): a damaged capture's
        replay must not read as a clean one."""
        self.replay_issues = self.replay_problems()
        problems = [text for _, text in self.replay_issues]
        detail = "capture finished" + (f"; {'; '.join(problems)}" if problems else "")
        self.router.replay_done(now_ns, now, detail[:300])
        stats = {**self.router.stats, "time_backwards": getattr(self.feed, "backwards", 0)}
        if problems:
            log.warning("replay finished with problems", extra={**stats, "problems": "; ".join(problems)[:1000]})
        else:
            log.info("replay finished", extra=stats)

    def replay_error(self) -> str:
        """Why a replayed capture ended before its end ("" when every one was read through)."""
        captures = getattr(self.feed, "captures", ())
        return "; ".join(c.error or f"{'+'.join(c.spec.paths)}: unreadable" for c in captures if c.failed)

    def replay_problems(self) -> list[tuple[str, str]]:
        """What was wrong with captures replayed to their end, as (kind, one line): "no_book" (a
        symbol of QF_SYMBOLS of which no book came: no event of it, or no snapshot), "bad" (bad
        messages, the first named by FILE:LINE), "backwards" (receive times going back). Empty
        for a clean replay."""
        router, feed = self.router, self.feed
        out = []
        m = router.m
        for key in self.keys:
            if m.books[key]:
                continue
            seen = sum(m.events[(key, kind)][0] for kind in ("depth", "trade", "bookTicker") if (key, kind) in m.events)
            out.append(("no_book", f"no book for {key}: " + (
                "not one event of it in the capture" + (f" ({router.stats['ignored']:,} messages of other symbols "
                                                        f"ignored)" if router.stats["ignored"] else "")
                if not seen else f"{seen:,} events of it but no snapshot it could sync from")))
        bad = router.stats["bad_messages"]
        if bad:
            first = router.bad_events[0] if router.bad_events else None
            lost = sorted({b.key for b in router.bad_events if b.reason in ("bad_event", "bad_snapshot") and b.key
                           and router.state.get(b.key) != "SYNCED"})
            out.append(("bad", f"{bad:,} bad message{'s' * (bad != 1)} (first: {first})"
                        + (f"; no book of {', '.join(lost)} since then" if lost else "")))
        for key in self.keys:
            sync = router.syncs.get(key)
            if m.books[key] and sync is not None and not sync.synced and router.state.get(key) != "SYNCED" \
                    and sync.last_gap is not None and not any(b.key == key for b in router.bad_events):
                out.append(("gap", f"{key} ends without a book: {sync.last_gap}, never repaired by a later snapshot"))
        back = getattr(feed, "backwards", 0)
        if back:
            out.append(("backwards", f"receive times go backwards {back:,} time{'s' * (back != 1)} "
                                     f"(first: {feed.first_backwards})"))
        return out

    def _run_lockstep(self, pub: CountingPublisher, beat: Ticker, hb: HeartbeatMaker, live: Liveness) -> None:
        """A lock-step replay (conductor.py): the handshake, then the capture once, record by
        record on its recorded time, then REPLAY_DONE. LockstepError (from the waits) ends the
        service: `qf marketdata` exits 2 and `qf up` stops rather than replaying it again."""
        cfg, router = self.cfg, self.router
        if cfg.md.replay_loop:
            log.warning("a lock-step replay plays the capture once: QF_REPLAY_LOOP is ignored")
        self.conductor = conductor = open_conductor(cfg.bus.lockstep)
        conductor.published = pub.published  # the publisher counts books and trades into it
        recorder, mono = self.recorder, time.monotonic

        def idle() -> None:  # between records and while waiting: what the paced loop does each record
            if recorder is not None:
                recorder.tick()
            if beat.due(mono()):
                self._heartbeat(hb, live)

        replay = LockstepReplay(conductor, router, pub, self.clock, self._stopping, idle)
        self.feed = router.feed = ReplayFeed(cfg.md.feed.path, self.keys, 0, should_stop=self._stopping,
                                             stamp="recorded")
        router.where = self.feed.where
        log.info("marketdata started", extra={"feed": str(cfg.md.feed), "symbols": ",".join(self.keys),
                                              "pub": cfg.bus.md_pub, "lockstep": cfg.bus.lockstep})
        log.info("lock-step replay: waiting for strategy, risk and broker to say hello")
        if not replay.handshake():
            return
        log.info("lock-step replay: every service is listening; releasing the capture")
        if replay.run(self.feed.records()):
            router.replay_done(self.clock.now)
            log.info("lockstep done", extra={**router.stats, **replay.counts})

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
        now_ns = self.clock()  # the capture's time released so far in a lock-step replay
        for key, state in router.state.items():
            if state != "SYNCED":  # late subscribers learn why no book comes, and since when
                router.pub.publish(f"status.{key}", MdStatus(ts=now_ns, symbol=key, state=state,
                                                            detail=router.status_detail(key, now_ns)))
        stats, m = router.stats, router.m
        stats["reconnects"] = sum(m.reconnects.values())
        stats["inbox_waits"] = m.inbox.waits if m.inbox is not None else 0  # the loop behind the feed
        since = [t for t in m.unsynced_since.values() if t]
        stats["unsynced_s"] = round((now_ns - min(since)) / 1e9, 1) if since else 0.0
        extra = {"recorded": self.recorder.lines} if self.recorder is not None else {}
        # each symbol's state by name: the API's /health and /status say which feed is not synced
        extra["symbols"] = dict(router.state)
        router.pub.publish(hb.topic, hb.make(status, {**stats, **extra, "state": status}))
        live.touch()
