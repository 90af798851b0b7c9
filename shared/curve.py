"""CURVE on the bus (QF_CURVE_KEYS): whose keys exist, which socket accepts whom, the ZAP gate.

Without keys every ZeroMQ socket is open to whoever reaches its address, and "only risk
reaches the broker" held only where Docker networks made it so. With QF_CURVE_KEYS set, every
tcp:// and ipc:// socket of the stack speaks CURVE (ZeroMQ's CurveZMQ: Curve25519 keys, every
frame encrypted and authenticated), and every socket that binds accepts only the client keys
`SERVERS` lists for it, checked by a ZAP handler in the binding process. A client that knows no
listed secret key never completes the handshake: nothing it sends is ever read. (inproc://, the
tests' in-process transport, has no handshake: CURVE does not apply there.)

The key directory `qf keys DIR` makes (`make_keys`), one pair per party:

    DIR/public/<party>.key          public key: every host may hold all of them
    DIR/private/<party>.key_secret  secret key (0600): only the host that runs <party>

Each process loads its own secret key and the public keys of the parties it deals with, at
start (`load`); a missing, unreadable or malformed file is a KeyFileError naming the file,
never its contents. Risk's one ROUTER takes orders and control alike, so risk also checks who
sends what (`refusal`): the ZAP handler names each connection's party (ZeroMQ's User-Id)."""
from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import zmq
from zmq.auth import create_certificates
from zmq.utils import z85

from shared.errors import ConfigError

log = logging.getLogger("qf.curve")

PARTIES = ("marketdata", "strategy", "risk", "broker", "api", "notifier")

# The bus setting a party binds -> (that party, the parties whose client keys it accepts). This
# table is the design: the broker's order port takes risk only; risk's ROUTER takes the
# strategies and the API (which may send what: `refusal`); each PUB takes the parties that
# subscribe to it in docs/architecture.md. `qf up`'s status line and `qf status|halt|…` are the
# operator's view: they run as `api`.
SERVERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "md_pub": ("marketdata", ("strategy", "risk", "broker", "api", "notifier")),
    "risk_rep": ("risk", ("strategy", "api")),
    "broker_rep": ("broker", ("risk",)),
    "broker_pub": ("broker", ("strategy", "risk", "api", "notifier")),
    "risk_pub": ("risk", ("strategy", "api", "notifier")),
    "strategy_pub": ("strategy", ("api", "notifier")),
}

PUBLIC_DIR, PRIVATE_DIR = "public", "private"
MAX_KEY_FILE = 16 * 1024  # a certificate is ~300 bytes; anything this big is not one
REFUSAL_LOG_S = 60.0  # a refused client retries every 100 ms: one log line per key and minute


class KeyFileError(ConfigError):
    """A CURVE key file the process needs is missing, unreadable or not a key (QF_CURVE_KEYS).
    Raised at start by `load`, naming the file and never its contents; the process prints it in
    one line and exits with status 2, which `qf up` does not restart: a person must put the
    right file there (`qf keys`, then copy the public keys to every host)."""


# -- key files ---------------------------------------------------------------------------------

def public_path(directory: str | Path, party: str) -> Path:
    return Path(directory) / PUBLIC_DIR / f"{party}.key"


def secret_path(directory: str | Path, party: str) -> Path:
    return Path(directory) / PRIVATE_DIR / f"{party}.key_secret"


def _z85_key(value: bytes) -> bool:
    if len(value) != 40:
        return False
    try:
        return len(z85.decode(value)) == 32
    except (ValueError, KeyError, TypeError):  # a character outside Z85's alphabet
        return False


def read_key_file(path: Path, secret: bool) -> tuple[bytes, bytes | None]:
    """(public key, secret key or None) of a certificate file as pyzmq's `create_certificates`
    writes it (Z85 text, `public-key = "…"`, `secret-key = "…"`). Raises KeyFileError naming
    `path` and what is wrong, never quoting the file."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KEY_FILE + 1)
    except FileNotFoundError:
        raise KeyFileError(f"QF_CURVE_KEYS: {path}: no such file (`qf keys DIR` makes the keys)") from None
    except OSError as exc:
        raise KeyFileError(f"QF_CURVE_KEYS: {path}: cannot be read ({exc.strerror or type(exc).__name__})") from None
    if len(data) > MAX_KEY_FILE:
        raise KeyFileError(f"QF_CURVE_KEYS: {path}: not a CURVE key file (over {MAX_KEY_FILE} bytes)")
    found: dict[bytes, bytes] = {}
    for line in data.splitlines():
        name, eq, value = line.strip().partition(b"=")
        name = name.strip()
        if eq and name in (b"public-key", b"secret-key"):
            found[name] = value.strip().strip(b"\"' \t")
    public, key = found.get(b"public-key"), found.get(b"secret-key")
    if public is None or not _z85_key(public):
        raise KeyFileError(f"QF_CURVE_KEYS: {path}: no valid public-key line (not a CURVE key file)")
    if not secret:
        return public, None
    if key is None or not _z85_key(key):
        raise KeyFileError(f"QF_CURVE_KEYS: {path}: no valid secret-key line (a public key where the secret "
                           "one belongs?)")
    if zmq.curve_public(key) != public:
        raise KeyFileError(f"QF_CURVE_KEYS: {path}: its secret key does not match its public key (damaged)")
    mode = os.stat(path).st_mode & 0o777
    if mode & 0o077:
        log.warning("curve_key_exposed", extra={"file": str(path), "mode": f"{mode:04o}",
                                                "fix": f"chmod 600 {path}"})
    return public, key


def make_keys(directory: str | Path, force: bool = False, parties=PARTIES) -> list[Path]:
    """Make a CURVE key pair per party under `directory` (`public/<party>.key` 0644 and
    `private/<party>.key_secret` 0600; `private/` 0700), creating what is missing. Returns the
    files written. Raises FileExistsError naming the first file of a key already there when not
    `force` (nothing is written then), NotADirectoryError when `directory` is a file. With
    `force`, each file is replaced whole (written beside it, then renamed)."""
    root = Path(directory)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"{root} is not a directory")
    if not force:
        for party in parties:
            for path in (secret_path(root, party), public_path(root, party)):
                if path.exists():
                    raise FileExistsError(str(path))
    public_dir, private_dir = root / PUBLIC_DIR, root / PRIVATE_DIR
    public_dir.mkdir(parents=True, exist_ok=True)
    private_dir.mkdir(mode=0o700, exist_ok=True)
    os.chmod(private_dir, 0o700)
    written: list[Path] = []
    old_umask = os.umask(0o077)  # the secret file is never readable by others, not even for a moment
    try:
        with tempfile.TemporaryDirectory(dir=private_dir, prefix=".new-") as tmp:
            for party in parties:
                made_public, made_secret = (Path(p) for p in create_certificates(tmp, party))
                os.chmod(made_secret, 0o600)
                os.chmod(made_public, 0o644)
                os.replace(made_secret, secret_path(root, party))
                os.replace(made_public, public_path(root, party))
                written += [public_path(root, party), secret_path(root, party)]
    finally:
        os.umask(old_umask)
    return written


def needs(party: str) -> tuple[str, ...]:
    """The parties whose public keys `party` needs: the owners of the sockets it connects to,
    and the clients of the sockets it binds."""
    out: list[str] = []
    for owner, clients in SERVERS.values():
        wanted = clients if owner == party else (owner,) if party in clients else ()
        out += [p for p in wanted if p not in out]
    return tuple(out)


# -- who may send what to risk --------------------------------------------------------------------

def refusal(peer: str, kind: str, action: str = "") -> str | None:
    """Why a request of type `kind` (`order`, `cancel`, `control` with `action`) from the party
    `peer` must be refused on risk's ROUTER, or None when it may be served. Orders and cancels
    come from the strategies only; HALT/RESUME/FLATTEN from the API only; STATE (read-only: the
    strategy asks it at start) from either."""
    if kind in ("order", "cancel"):
        allowed: tuple[str, ...] = ("strategy",)
    elif kind == "control":
        allowed = ("strategy", "api") if action == "STATE" else ("api",)
    else:
        return None  # anything else is refused by risk as an unexpected type anyway
    if peer in allowed:
        return None
    what = f"control {action}" if kind == "control" else kind
    return f"{what} is not accepted from the {peer} key (only from: {', '.join(allowed)})"


# -- the ZAP gate: one authenticator per ZeroMQ context --------------------------------------------

class Gate:
    """The ZAP handler's rules for one context: ZAP domain -> {client public key (Z85) -> party}.
    Called on the authenticator's thread for each handshake (`callback`); counts and logs what it
    refuses (at most one line per domain and key a minute). `refused` is read by heartbeats."""

    def __init__(self) -> None:
        self.allowed: dict[str, dict[bytes, str]] = {}
        self.names: dict[bytes, str] = {}
        self.refused = 0
        self._logged: dict[tuple[str, bytes], float] = {}
        self._lock = threading.Lock()

    def allow(self, domain: str, keys: dict[bytes, str]) -> None:
        with self._lock:
            self.allowed[domain] = dict(keys)
            self.names.update(keys)

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.allowed.get(domain, ()):
            return True
        self.refused += 1
        now = time.monotonic()
        seen = (domain, key)
        if now - self._logged.get(seen, -REFUSAL_LOG_S) >= REFUSAL_LOG_S:
            if len(self._logged) > 1000:
                self._logged.clear()
            self._logged[seen] = now
            # a public key's first characters say which key it was (public keys are no secret)
            log.warning("curve_refused", extra={"socket": domain.removeprefix("qf."), "client_key": key[:8].decode(),
                                                "known_as": self.names.get(key, "unknown"), "refused": self.refused})
        return False


def _authenticator(ctx: zmq.Context, rules: Gate):
    """pyzmq's ZAP thread on `ctx`, asking `rules` and naming each accepted connection by its
    party (the frames' User-Id). Imported here: it loads asyncio, which only a process that
    serves a socket with CURVE needs."""
    from zmq.auth.thread import ThreadAuthenticator

    class Authenticator(ThreadAuthenticator):
        def curve_user_id(self, client_public_key: bytes) -> str:
            return rules.names.get(z85.encode(client_public_key), "unknown")

    auth = Authenticator(ctx, log=logging.getLogger("qf.curve.zap"))
    auth.start()
    for domain in SERVERS:
        auth.configure_curve_callback(f"qf.{domain}", rules)
    return auth


_GATES: dict[int, tuple[zmq.Context, object, Gate]] = {}
_GATES_LOCK = threading.Lock()


def gate(ctx: zmq.Context) -> Gate:
    """The Gate of `ctx`, its authenticator thread started on first use (ZeroMQ allows one ZAP
    handler per context)."""
    with _GATES_LOCK:
        entry = _GATES.get(id(ctx))
        if entry is None or entry[0] is not ctx:
            rules = Gate()
            entry = _GATES[id(ctx)] = (ctx, _authenticator(ctx, rules), rules)
        return entry[2]


def refused_total() -> int:
    """Handshakes refused in this process so far (every context), for heartbeats."""
    with _GATES_LOCK:
        return sum(g.refused for _, _, g in _GATES.values())


def stop_gate(ctx: zmq.Context) -> None:
    """Stop `ctx`'s authenticator (before `ctx.term()`, which waits for its socket); idempotent."""
    with _GATES_LOCK:
        entry = _GATES.pop(id(ctx), None)
    if entry is not None:
        entry[1].stop()


# -- one process's identity --------------------------------------------------------------------------

@dataclass(frozen=True)
class Curve:
    """A process's CURVE identity: its party, key pair, the public keys it needs (party -> Z85) and
    its bus endpoints (endpoint -> BusConfig field), which tell who owns a socket. `client` and
    `server` set a socket up before it connects or binds (shared/bus.py's `connect` and `bind`)."""
    party: str
    public: bytes
    secret: bytes = field(repr=False)  # a Curve printed whole must not show it
    peers: dict
    endpoints: dict

    def _setting(self, endpoint: str) -> str:
        name = self.endpoints.get(endpoint)
        if name is None:
            raise ConfigError(f"QF_CURVE_KEYS: {endpoint} is none of the bus endpoints (QF_MD_PUB, QF_RISK_REP, "
                              "QF_BROKER_REP, QF_BROKER_PUB, QF_RISK_PUB, QF_STRATEGY_PUB): no CURVE rule for it")
        return name

    def client(self, sock: zmq.Socket, endpoint: str) -> None:
        """Make `sock` a CURVE client of the party that binds `endpoint`."""
        owner = SERVERS[self._setting(endpoint)][0]
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_serverkey = self.peers[owner]

    def server(self, sock: zmq.Socket, endpoint: str) -> None:
        """Make `sock` a CURVE server for `endpoint` accepting only its listed clients' keys."""
        name = self._setting(endpoint)
        owner, clients = SERVERS[name]
        if owner != self.party:
            raise ConfigError(f"QF_CURVE_KEYS: {self.party} cannot bind {endpoint}: the {owner}'s socket")
        gate(sock.context).allow(f"qf.{name}", {self.peers[c]: c for c in clients})
        sock.curve_server = True
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.zap_domain = f"qf.{name}".encode()


def load(cfg, party: str) -> Curve | None:
    """The CURVE identity of `party` from `cfg` (a shared.config Config), or None when
    QF_CURVE_KEYS is empty. Reads its secret key and the public keys it needs once per process
    (cached). Raises KeyFileError naming the first file that is missing or wrong."""
    if not cfg.bus.curve_keys:
        return None
    return _load(cfg.bus.curve_keys, party, cfg.bus)


@lru_cache(maxsize=16)
def _load(directory: str, party: str, bus) -> Curve:
    if party not in PARTIES:
        raise ValueError(f"unknown party {party!r}")
    public, secret = read_key_file(secret_path(directory, party), secret=True)
    listed = public_path(directory, party)
    if listed.exists() and read_key_file(listed, secret=False)[0] != public:
        # another party's key pair copied in: its peers would refuse every handshake, silently
        raise KeyFileError(f"QF_CURVE_KEYS: {secret_path(directory, party)} does not match {listed}: it is "
                           f"another key pair than the one {party}'s peers are given (run `qf keys` again)")
    peers = {party: public}
    for other in needs(party):
        if other != party:
            peers[other] = read_key_file(public_path(directory, other), secret=False)[0]
    endpoints = {one: name for name in SERVERS for one in getattr(bus, name).split(",")}
    return Curve(party, public, secret, peers, endpoints)
