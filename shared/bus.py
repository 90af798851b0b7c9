"""ZeroMQ helpers: PUB/SUB with topic frames and sequence numbers, a ROUTER
server for REQ clients, and a Lazy Pirate REQ client (zguide's lpclient).

Every helper takes `curve` (shared/curve.py; None: QF_CURVE_KEYS is off): given, its socket
is a CURVE client of whoever binds the endpoint, or the CURVE server of an endpoint its
process owns, accepting only the keys shared/curve.py lists for it. Sockets made outside
these helpers go through `connect`/`bind` for the same."""
from __future__ import annotations

import errno
import logging
import os
import time
from typing import Iterable, Sequence

import msgpack
import zmq

from shared import messages
from shared.curve import Curve
from shared.errors import BindError, ConfigError, DecodeError, TransientError

log = logging.getLogger("qf.bus")


def context() -> zmq.Context:
    return zmq.Context.instance()


# The hot paths call pyzmq's compiled socket methods with plain int flags: its Python layer
# (send_multipart/recv_multipart, and flags that are IntFlag members) cost more than the
# ZeroMQ calls themselves (a 3-frame send plus receive: 11 µs through it, 5 µs without).
_Base = zmq.backend.Socket if issubclass(zmq.Socket, zmq.backend.Socket) else zmq.Socket
_send, _recv, _get = _Base.send, _Base.recv, _Base.get
_SNDMORE, _RCVMORE, _EVENTS, _POLLIN = int(zmq.SNDMORE), int(zmq.RCVMORE), int(zmq.EVENTS), int(zmq.POLLIN)
NOBLOCK = int(zmq.NOBLOCK)  # zmq.NOBLOCK as a plain int, for the functions below


def send_frames(sock: zmq.Socket, frames: Sequence[bytes], flags: int = 0) -> None:
    """`sock.send_multipart(frames, flags)` for bytes frames. Raises zmq.Again like it."""
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        _send(sock, frame, flags | _SNDMORE if i < last else flags)


def recv_frames(sock: zmq.Socket, flags: int = 0) -> list[bytes]:
    """`sock.recv_multipart(flags)`. Raises zmq.Again like it."""
    frames = [_recv(sock, flags)]
    while _get(sock, _RCVMORE):
        frames.append(_recv(sock, flags))
    return frames


def readable(sock: zmq.Socket) -> bool:
    """Whether a message waits on `sock`. Drain loops ask it before their second read: a NOBLOCK
    read of an empty socket costs a zmq.Again exception (3-4 µs, more on a cold core), and most
    turns have one message; a burst goes on reading until zmq.Again, without asking each time."""
    return bool(_get(sock, _EVENTS) & _POLLIN)


def _ipv6(sock: zmq.Socket, endpoint: str) -> None:
    # ZeroMQ resolves and binds IPv4 only unless a socket says otherwise. An IPv6 literal
    # (`tcp://[::]:5557`, `tcp://[fdaa::3]:5557`) needs it, and so does a name on Fly's private
    # network (`<group>.process.<app>.internal`), which has AAAA records only (fly.multi.toml).
    if endpoint.startswith("tcp://"):
        host = endpoint[6:].rpartition(":")[0]
        if host.startswith("[") or host.endswith(".internal"):
            sock.setsockopt(zmq.IPV6, 1)


def connect(sock: zmq.Socket, endpoint: str, curve: Curve | None = None) -> None:
    """Connect `sock` to `endpoint`, as a CURVE client of its owner when `curve` is given."""
    _ipv6(sock, endpoint)
    if curve is not None:
        curve.client(sock, endpoint)
    sock.connect(endpoint)


def bind(sock: zmq.Socket, endpoint: str, curve: Curve | None = None) -> None:
    """Bind `sock` to `endpoint` (an ipc:// path's directory made first), as its CURVE server
    accepting only the listed client keys when `curve` is given. ZeroMQ binds addresses, not
    DNS names: a Fly private-network name (`tcp://broker.process.APP.internal:5557`, the name
    the other machines connect to, so one setting serves both ends in fly.multi.toml) binds
    every IPv6 address of this machine, `tcp://[::]:5557`.

    Raises BindError (a FatalError: exit 1, `qf up` restarts the service with a backoff) when
    another process holds the address, and ConfigError (exit 2, not restarted) when the
    endpoint can never be bound here: malformed, a host that is not this machine's, an ipc
    path that cannot be made. Either names the endpoint (and its QF_ setting) in one line."""
    _ipv6(sock, endpoint)
    if curve is not None:
        curve.server(sock, endpoint)
    target = endpoint
    try:
        if endpoint.startswith("ipc://"):
            parent = os.path.dirname(endpoint[6:])
            if parent:
                os.makedirs(parent, exist_ok=True)
        elif endpoint.startswith("tcp://"):
            host, _, port = endpoint[6:].rpartition(":")
            if host.endswith(".internal"):
                target = f"tcp://[::]:{port}"
        sock.bind(target)
    except (zmq.ZMQError, OSError) as exc:
        raise _bind_error(endpoint, exc.errno or 0, exc) from None


_IPC_PATH_ERRORS = (errno.ENOENT, errno.ENOTDIR, errno.EEXIST, errno.EACCES, errno.EPERM, errno.EROFS,
                    errno.ENAMETOOLONG)


def _bind_error(endpoint: str, code: int, exc: BaseException) -> Exception:
    """Why `endpoint` could not be bound, in one line naming it and its QF_ setting: a BindError
    when a restart may help (the address held by another process, or out of descriptors), else
    a ConfigError."""
    from shared.config import all_settings  # the error path only: which setting gave `endpoint`

    named = [env for env, default, _ in all_settings() if endpoint in os.environ.get(env, default).split(",")]
    what = f"cannot bind {endpoint}" + (f" ({', '.join(named)})" if named else "")
    if code == errno.EADDRINUSE and not endpoint.startswith("inproc://"):
        return BindError(f"{what}: address in use: another process holds it (a restart may find it free)")
    if endpoint.startswith("ipc://") and code in _IPC_PATH_ERRORS:
        why = f"the ipc path cannot be made: {os.strerror(code)}"
    elif code in (errno.EADDRNOTAVAIL, errno.ENODEV):
        why = "its host is not an address or interface of this machine (ZeroMQ binds addresses, not DNS " \
              "names; tcp://0.0.0.0:PORT binds every IPv4 address)"
    elif code in (errno.EINVAL, errno.EPROTONOSUPPORT):
        why = "not an endpoint ZeroMQ can bind: tcp://HOST:PORT, ipc://PATH or inproc://NAME"
    elif code in (errno.EACCES, errno.EPERM):
        why = f"{os.strerror(code)} (a port below 1024 needs privileges)"
    else:  # e.g. out of file descriptors: perhaps not for long
        return BindError(f"{what}: {os.strerror(code) if code else exc}")
    return ConfigError(f"{what}: {why}")


MAX_GAP = 1 << 32  # sequence jumps a Subscriber counts as missed messages
MAX_TOPICS = 10_000  # topics a Subscriber keeps a last seq for


class Publisher:
    """PUB socket that sends `[topic, payload]` with a `seq` counted per topic, so a
    subscriber that filters topics still sees every gap in what it asked for.

    The high-water mark is set on purpose: at ZeroMQ's default of 1000,
    bursts are dropped silently (PERF-BASELINES.md)."""

    def __init__(self, endpoint: str, hwm: int, ctx: zmq.Context | None = None, curve: Curve | None = None) -> None:
        if "," in endpoint:
            raise ConfigError(f"{endpoint} lists several endpoints; a publishing process binds one: give each "
                              f"process of the service its own (QF_MD_PUB / QF_STRATEGY_PUB), and list them "
                              f"all only to the subscribers")
        self.endpoint = endpoint
        self.sock = (ctx or context()).socket(zmq.PUB)
        self.sock.setsockopt(zmq.SNDHWM, hwm)
        self.sock.setsockopt(zmq.LINGER, 1000)
        bind(self.sock, endpoint, curve)
        self.seqs: dict[str, int] = {}

    def publish(self, topic: str, msg: messages.Message) -> None:
        self.send_raw(topic.encode(), messages.encode(msg, self.next_seq(topic)))

    def next_seq(self, topic: str) -> int:
        """The `seq` for the next message on `topic` (for callers that encode it themselves)."""
        seq = self.seqs.get(topic, 0) + 1
        self.seqs[topic] = seq
        return seq

    def send_raw(self, topic: bytes, payload: bytes) -> None:
        """Send an already encoded payload, whose `seq` came from `next_seq`: the hot
        path of marketdata skips building a message object (see BookRouter)."""
        self.sock.send_multipart((topic, payload), copy=False)

    def close(self) -> None:
        self.sock.close()


class Subscriber:
    """SUB socket connected to one publisher, or to each of a comma-separated list (symbols split
    over several marketdata processes); counts sequence gaps per topic (`missed`): each topic has
    one publisher, as each process of a service names its own heartbeats (`runtime.identity`)."""

    def __init__(self, endpoint: str, topics: Iterable[str], hwm: int,
                 ctx: zmq.Context | None = None, curve: Curve | None = None) -> None:
        self.endpoint = endpoint
        self.sock = (ctx or context()).socket(zmq.SUB)
        self.sock.setsockopt(zmq.RCVHWM, hwm)
        self.sock.setsockopt(zmq.LINGER, 0)
        for topic in topics:
            self.sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
        for one in endpoint.split(","):
            connect(self.sock, one, curve)
        self.last_seq: dict[bytes, int] = {}
        self.missed = 0
        self.decode_errors = 0

    def recv(self, flags: int = 0) -> tuple[str, messages.Message]:
        """Next `(topic, message)`. Raises DecodeError (counted) on a bad frame
        and zmq.Again with NOBLOCK when nothing is waiting."""
        frames = recv_frames(self.sock, flags)
        try:
            if len(frames) != 2:
                raise DecodeError("bad_frames", f"{len(frames)} frames, expected 2")
            raw = msgpack.unpackb(frames[1], raw=False) if len(frames[1]) <= messages.MAX_FRAME else None
            if raw is None:
                raise DecodeError("oversized", f"{len(frames[1])} bytes")
            msg = messages.from_wire(raw, messages.EVENTS)
        except DecodeError:
            self.decode_errors += 1
            raise
        except Exception as exc:
            self.decode_errors += 1
            raise DecodeError("bad_msgpack", str(exc)[:80]) from None
        seq = raw.get("seq")
        if type(seq) is int:
            last = self.last_seq.get(frames[0])
            # A jump beyond MAX_GAP is a corrupt or hostile seq, not messages lost: counting it
            # once made `missed` too big to pack into a heartbeat (issue #11's fuzz).
            if last is not None and last + 1 < seq <= last + MAX_GAP:
                self.missed += seq - last - 1
            if len(self.last_seq) >= MAX_TOPICS and frames[0] not in self.last_seq:
                self.last_seq.clear()  # topics come from the publisher: keep the map bounded
            self.last_seq[frames[0]] = seq  # lower: the publisher restarted
        return frames[0].decode("utf-8", "replace"), msg

    def close(self) -> None:
        self.sock.close()


class Server:
    """ROUTER socket answering REQ (or DEALER) clients: `[id, b"", payload]`.

    With `curve`, `peer` is the party whose key sent the request `recv` returned last (ZAP's
    User-Id, shared/curve.py), for a server that serves several parties different things
    (risk); None without CURVE."""

    def __init__(self, endpoint: str, ctx: zmq.Context | None = None, curve: Curve | None = None) -> None:
        self.endpoint = endpoint
        self.peer: str | None = None
        self.sock = (ctx or context()).socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 1000)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, messages.MAX_FRAME * 2)
        bind(self.sock, endpoint, curve)
        if curve is not None:
            self.recv = self._recv_from  # type: ignore[method-assign]

    def recv(self, flags: int = 0) -> tuple[list[bytes], bytes | None]:
        """Next request as `(envelope, payload)`; payload is None when the
        frames are not a REQ envelope (the caller counts it; no reply possible)."""
        frames = recv_frames(self.sock, flags)
        if len(frames) < 3 or frames[-2] != b"":
            return frames, None
        return frames[:-1], frames[-1]

    def _recv_from(self, flags: int = 0) -> tuple[list[bytes], bytes | None]:
        """`recv`, noting in `peer` which party's key sent the request (a frame's metadata)."""
        first = self.sock.recv(flags, copy=False)
        try:
            self.peer = first.get("User-Id")
        except zmq.ZMQError:  # no ZAP answer named it: no party
            self.peer = "unknown"
        frames = [first.bytes]
        while _get(self.sock, _RCVMORE):
            frames.append(_recv(self.sock, flags))
        if len(frames) < 3 or frames[-2] != b"":
            return frames, None
        return frames[:-1], frames[-1]

    def reply(self, envelope: list[bytes], payload: bytes) -> None:
        send_frames(self.sock, [*envelope, payload])

    def close(self) -> None:
        self.sock.close()


class NoReply(TransientError):
    """The peer did not answer after every retry. The caller fails closed:
    a rejection (risk: BROKER_UNAVAILABLE; strategy: treated as rejected)."""


class LazyPirateClient:
    """REQ client with a timeout: on silence it closes the socket (LINGER 0),
    opens a fresh one and resends the *same* payload, up to `retries` times.
    The server must be idempotent on the request (client_order_id)."""

    def __init__(self, endpoint: str, timeout_ms: int, retries: int,
                 ctx: zmq.Context | None = None, curve: Curve | None = None) -> None:
        self.endpoint = endpoint
        self.timeout_ms = timeout_ms
        self.retries = retries
        self.ctx = ctx or context()
        self.curve = curve
        self.sock: zmq.Socket | None = None
        self.poller = zmq.Poller()
        self.timeouts = 0

    def _open(self) -> None:
        self.sock = self.ctx.socket(zmq.REQ)
        self.sock.setsockopt(zmq.LINGER, 0)
        connect(self.sock, self.endpoint, self.curve)
        self.poller.register(self.sock, zmq.POLLIN)

    def _discard(self) -> None:
        if self.sock is not None:
            self.poller.unregister(self.sock)
            self.sock.close(linger=0)
            self.sock = None

    def request(self, payload: bytes, timeout_ms: int | None = None, retries: int | None = None) -> bytes:
        """Send `payload`, return the reply bytes. Raises NoReply after the
        last retry; the socket is fresh for the next call either way."""
        timeout = self.timeout_ms if timeout_ms is None else timeout_ms
        attempts = self.retries if retries is None else retries
        for attempt in range(1, attempts + 1):
            if self.sock is None:
                self._open()
            self.sock.send(payload)
            deadline = time.monotonic() + timeout / 1000
            while True:
                left = int((deadline - time.monotonic()) * 1000)
                if left <= 0 or not self.poller.poll(left):
                    break
                return self.sock.recv()
            self.timeouts += 1
            self._discard()
            if attempt < attempts:
                log.warning("no reply, retrying", extra={"endpoint": self.endpoint, "attempt": attempt,
                                                         "timeout_ms": timeout})
        raise NoReply(f"no reply from {self.endpoint} after {attempts} attempt(s) of {timeout} ms")

    def close(self) -> None:
        self._discard()


class AsyncClient:
    """DEALER to a ROUTER (risk's) with many requests in flight, each matched to its answer.

    A request is sent as `[request id, b"", payload]` (the ROUTER answers the whole envelope, so
    the id comes back); `key` is the caller's name for it (e.g. the client_order_id). Silence
    for `timeout_ms` resends the *same* payload under a new id (the server is idempotent on the
    client_order_id), up to `retries` attempts; then `expired()` hands the key back and the
    socket is replaced (LINGER 0), so nothing given up on can still reach the server later
    (the other requests in flight are resent on the new socket). IMMEDIATE: while the server is
    not connected a send is not queued for later; the attempt just times out.
    Not thread-safe: one loop owns it (poll `sock`, then `recv()` until None)."""

    def __init__(self, endpoint: str, timeout_ms: int, retries: int, ctx: zmq.Context | None = None,
                 curve: Curve | None = None) -> None:
        self.endpoint = endpoint
        self.timeout_ns = timeout_ms * 1_000_000
        self.retries = retries
        self.ctx = ctx or context()
        self.curve = curve
        self.sock: zmq.Socket | None = None
        self._rid = 0
        self._ids: dict[bytes, str] = {}  # request id (every attempt's) -> key
        # key -> [payload, attempts so far, deadline (monotonic ns), ids of its attempts]
        self._pending: dict[str, list] = {}
        self.stats = {"sent": 0, "resent": 0, "expired": 0, "stale_replies": 0, "bad_replies": 0, "resets": 0}
        self._open()

    def _open(self) -> None:
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IMMEDIATE, 1)
        connect(self.sock, self.endpoint, self.curve)

    def _send(self, key: str, entry: list, now_ns: int) -> None:
        self._rid += 1
        rid = self._rid.to_bytes(8, "big")
        self._ids[rid] = key
        entry[1] += 1
        entry[2] = now_ns + self.timeout_ns
        entry[3].append(rid)
        try:
            self.sock.send_multipart([rid, b"", entry[0]], zmq.NOBLOCK)
        except zmq.Again:  # not connected (IMMEDIATE): this attempt times out like a lost one
            pass

    def send(self, key: str, payload: bytes, now_ns: int | None = None) -> None:
        """Send a request named `key` (ValueError when one of that name is in flight)."""
        if key in self._pending:
            raise ValueError(f"a request {key!r} is already in flight")
        entry = [payload, 0, 0, []]
        self._pending[key] = entry
        self.stats["sent"] += 1
        self._send(key, entry, time.monotonic_ns() if now_ns is None else now_ns)

    def in_flight(self, key: str) -> bool:
        return key in self._pending

    def __len__(self) -> int:
        return len(self._pending)

    def recv(self) -> tuple[str, bytes] | None:
        """The next answer waiting, as `(key, payload)`; None when nothing is waiting. An answer
        to a request already answered or given up on is dropped (counted), as is a frame
        without the envelope."""
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return None
            if len(frames) != 3 or frames[1] != b"":
                self.stats["bad_replies"] += 1
                continue
            key = self._ids.get(frames[0])
            entry = self._pending.get(key) if key is not None else None
            if entry is None or frames[0] not in entry[3]:
                self.stats["stale_replies"] += 1
                continue
            self._forget(key)
            return key, frames[2]

    def _forget(self, key: str) -> None:
        entry = self._pending.pop(key)
        for rid in entry[3]:
            self._ids.pop(rid, None)

    def next_deadline(self) -> int | None:
        """The earliest monotonic ns at which `expired()` has work (None: nothing in flight)."""
        return min((e[2] for e in self._pending.values()), default=None)

    def expired(self, now_ns: int | None = None) -> list[str]:
        """Resend what timed out with attempts left; return (and forget) the keys of the requests
        whose last attempt timed out. When one is given up, the socket is replaced first.
        While an answer waits unread (the loop was held up past a deadline: a burst, a busy
        machine) nothing is called silent: the caller's next poll returns at once and reads it.
        That grace ends one timeout past the deadline, so a peer that never stops sending
        cannot hold a request in flight forever."""
        now_ns = time.monotonic_ns() if now_ns is None else now_ns
        late = [k for k, e in self._pending.items() if e[2] <= now_ns]
        if not late:
            return []
        if readable(self.sock) and min(self._pending[k][2] for k in late) > now_ns - self.timeout_ns:
            return []
        dead = [k for k in late if self._pending[k][1] >= self.retries]
        for key in dead:
            self._forget(key)
            self.stats["expired"] += 1
        if dead:
            self.sock.close(linger=0)
            self.stats["resets"] += 1
            self._open()
            late = list(self._pending)  # the new socket has none of them: resend every one
        for key in late:
            if key in self._pending:
                self.stats["resent"] += 1
                self._send(key, self._pending[key], now_ns)
        return dead

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None
