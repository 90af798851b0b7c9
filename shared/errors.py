"""The error tree; each docstring says who handles the error."""


class QFError(Exception):
    """Base of every QuantumFlow error."""


class TransientError(QFError):
    """Something outside us failed for now (network, exchange, peer). Handled by
    retrying with backoff; never fatal on its own."""


class FatalError(QFError):
    """A condition the service cannot continue from. Handled at the top of
    `__main__`: log it, exit non-zero, let the supervisor report it."""


class ConfigError(FatalError):
    """A bad or unknown `QF_*` setting. Raised at start; the process prints it
    in one line and exits with status 2."""


class BindError(FatalError):
    """An endpoint this process must bind (a QF_* bus setting) cannot be bound now: most often
    another process holds the address (the service's previous run still closing, or a second
    copy of it). Raised at start by `shared.bus.bind`, naming the endpoint and its setting;
    handled like any FatalError at the top of `__main__`: one line, exit status 1, and `qf up`
    restarts the service with a backoff, by when the address is usually free. An endpoint that
    can never be bound (malformed, a host that is not this machine's, an ipc path that cannot
    be made) is a ConfigError instead."""


class StorageError(ConfigError):
    """A file or directory a service must write cannot be used at start: a read-only or
    missing directory, a path that is a directory, a file that is not a database, a damaged
    journal. Raised at start, naming the path and the problem; the process prints it in one
    line and exits with status 2, which `qf up` does not restart: only a person can fix it."""


class DecodeError(QFError):
    """A frame that is not a valid message. Handled by the receiving loop:
    drop the frame, count it, log it; never crash a service."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class InvalidTransition(QFError):
    """An order status change outside the transition table. A bug in the
    caller: it propagates and is reported, the order stays where it was."""


class StoreUnavailable(TransientError):
    """An answer the broker cannot give now: its storage cannot be read, or cannot take the
    writes the request needs. Raised inside the broker's desk (services/broker/desk.py) and
    handled there: the request is answered with error STORE_UNAVAILABLE, and its client
    retries later (risk relays the error byte for byte)."""


class JournalBusy(StorageError):
    """Another process holds the broker's journal (`shared.journal.Journal`), still after the
    wait it was given. Handled by the broker at start: one broker per database, so it exits
    with status 2 like any StorageError (a person must stop the other one); by risk's start-up
    recovery (`shared.journal.recover`): the broker runs, so it waits for it to store instead."""


class ApiError(QFError):
    """An error an HTTP client gets as `{"error": {"code", "message"}}` with `status` (its
    `code` and `message` are kept as given). Raised by the API's views and the helpers they
    call (services/api/*); turned into the response by the app's error handler."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
