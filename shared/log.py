"""key=value logging: one line per event on unbuffered stdout."""
import logging
import sys
import threading
import time
import traceback

from shared.config import mask_secrets

_OWN_KEYS = frozenset({"ts", "level", "svc", "event", "exc"})
_RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def _fmt_value(value: object) -> str:
    # masked before quoting: a URL's credentials never reach a log line (issue #11)
    text = mask_secrets(str(value))
    if text == "" or any(c in text for c in ' "=\n\t'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


class KeyValueFormatter(logging.Formatter):
    """`ts=… level=… svc=… event=… k=v …`; extra fields come from `extra={…}`."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        t = time.gmtime(record.created)
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}Z"
        parts = [f"ts={ts}", f"level={record.levelname.lower()}", f"svc={self.service}",
                 f"event={_fmt_value(record.getMessage())}"]
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                if key in _OWN_KEYS:  # never two `event=` on one line: the extra one is renamed
                    key = "x_" + key
                parts.append(f"{key}={_fmt_value(value)}")
        if record.exc_info:
            parts.append("exc=" + _fmt_value(self.formatException(record.exc_info)))
        return " ".join(parts)


def _print_masked(exc_type, exc, tb) -> None:
    sys.stderr.write(mask_secrets("".join(traceback.format_exception(exc_type, exc, tb))))
    sys.stderr.flush()


def _thread_excepthook(args) -> None:
    if args.exc_type is not SystemExit:
        _print_masked(args.exc_type, args.exc_value, args.exc_traceback)


def setup(service: str, level: str = "INFO") -> logging.Logger:
    """Route the root logger to stdout in key=value form; returns the service logger.
    Uncaught exceptions (main thread and others) are printed with URL credentials masked."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(KeyValueFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    sys.excepthook, threading.excepthook = _print_masked, _thread_excepthook
    # werkzeug/gunicorn chatter stays at warning unless asked for
    logging.getLogger("websockets").setLevel(max(root.level, logging.INFO))
    try:
        sys.stdout.reconfigure(line_buffering=True)
    except (AttributeError, ValueError):
        pass
    return logging.getLogger(f"qf.{service}")


class Deferred:
    """Log records made now (their time and fields as of now) and written by `flush()`, which the
    owner's loop calls when it has nothing to answer. Formatting a line, writing it to a pipe and
    waking whoever reads the pipe right after an answer competes with that answer's way to its
    peer for the 2 cores: the broker's per-order line cost its answer's hop to risk ~130 µs at the
    median (bench/tick_to_trade_hops.py). At most MAX records wait, and none longer than MAX_AGE_S
    once `due` is asked."""

    MAX, MAX_AGE_S = 1000, 0.05

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self.records: list[logging.LogRecord] = []

    def info(self, msg: str, extra: dict) -> None:
        if self.logger.isEnabledFor(logging.INFO):
            self.records.append(self.logger.makeRecord(self.logger.name, logging.INFO, "(deferred)", 0, msg, (),
                                                       None, extra=extra))
            if len(self.records) >= self.MAX:
                self.flush()

    @property
    def pending(self) -> bool:
        return bool(self.records)

    def due(self, now: float | None = None) -> bool:
        """Whether the oldest record has waited MAX_AGE_S (a loop that is never idle writes them anyway)."""
        return bool(self.records) and (time.time() if now is None else now) - self.records[0].created >= self.MAX_AGE_S

    def flush(self) -> None:
        records, self.records = self.records, []
        for record in records:
            self.logger.handle(record)


def kv(**fields: object) -> dict:
    """Shorthand for `extra=`: `log.info("fill", extra=kv(qty=q))`."""
    return fields
