"""A real PostgreSQL server for the tests and the benchmark: Debian's binaries, a temporary cluster, a free port.

`PgServer.start()` runs `initdb` into a new temporary directory and `pg_ctl start` on it:
listening on 127.0.0.1 only (a free port), its unix socket in that directory, fsync on (the
defaults: synchronous_commit on, full_page_writes on; a kill -9 test against it means what it
says). TCP logins need a password (scram-sha-256); the superuser `postgres` logs in over the
unix socket only (trust: the directory is the server's own). `create_database()` makes a fresh
database owned by the role `qf` (its password, `password`, holds characters a URL escapes) and returns its URL,
`postgresql://qf:PASSWORD@127.0.0.1:PORT/NAME`; `stop()` stops the server (`pg_ctl stop -m fast`)
and removes the directory.

PostgreSQL refuses to run as root. As root, the server runs as Debian's `postgres` account
(made by the `postgresql` package) or, where there is none, as `qfpg`, a system account made
here with `useradd --system`; the processes are started with subprocess's `user=`/`group=`
(setuid in the child), and the directory is made in the system temp dir and handed to that
account (pytest's own temp dirs are root's, mode 0700). As anyone else, it runs as that user.

Startup: ~0.6 s here (initdb and the first start), then ~30 ms per database."""
from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from urllib.parse import quote

BIN_GLOB = "/usr/lib/postgresql/*/bin"  # Debian's layout: one directory per major version
ROLE = "qf"
FALLBACK_ACCOUNT = "qfpg"


def bin_dir() -> str | None:
    """The newest PostgreSQL server bin directory with initdb, pg_ctl and postgres, or None."""
    found = [d for d in glob.glob(BIN_GLOB)
             if all(os.access(os.path.join(d, b), os.X_OK) for b in ("initdb", "pg_ctl", "postgres"))]
    found.sort(key=lambda d: int(d.split("/")[-2]) if d.split("/")[-2].isdigit() else 0)
    return found[-1] if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _account() -> pwd.struct_passwd | None:
    """The account the server runs as when this process is root (None: run as ourselves)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", FALLBACK_ACCOUNT):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", FALLBACK_ACCOUNT],
                   check=True, capture_output=True, timeout=30)
    return pwd.getpwnam(FALLBACK_ACCOUNT)


class PgServer:
    """One temporary PostgreSQL cluster (see the module docstring). Not thread-safe."""

    def __init__(self, bin_path: str) -> None:
        self.bin = bin_path
        self.account = _account()
        self.dir = tempfile.mkdtemp(prefix="qf-pg-")
        self.data = os.path.join(self.dir, "data")
        self.log = os.path.join(self.dir, "server.log")
        self.port = 0
        # characters a URL must escape: the services must decode them as libpq does
        self.password = f"pw-{secrets.token_hex(10)}@/:%?"
        self.running = False
        self.start_s = 0.0  # what `start()` took (initdb and the server's start)

    # -- processes as the server's account ---------------------------------------------

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        kw: dict = {}
        if self.account is not None:
            kw = dict(user=self.account.pw_uid, group=self.account.pw_gid, extra_groups=[])
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "HOME": self.dir, "TZ": "UTC"}
        # stdout to a file, never a pipe: `pg_ctl start` leaves the server holding it
        with open(os.path.join(self.dir, "commands.log"), "ab") as out:
            done = subprocess.run(args, cwd=self.dir, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                  stderr=subprocess.STDOUT, timeout=timeout, **kw)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed ({done.returncode}):\n{self.tail()}")
        return done

    def tail(self, n: int = 40) -> str:
        text = ""
        for name in ("commands.log", "server.log"):
            try:
                with open(os.path.join(self.dir, name), errors="replace") as f:
                    text += "".join(f.readlines()[-n:])
            except OSError:
                pass
        return text

    def start(self) -> "PgServer":
        """initdb, configure, start; returns self once the server accepts connections."""
        if self.account is not None:
            os.chown(self.dir, self.account.pw_uid, self.account.pw_gid)
        pwfile = os.path.join(self.dir, "superuser.pw")
        with open(pwfile, "w") as f:  # initdb wants one; the superuser logs in over the socket only
            f.write(secrets.token_hex(16) + "\n")
        if self.account is not None:
            os.chown(pwfile, self.account.pw_uid, self.account.pw_gid)
        # --no-sync: initdb's own final flush of the new cluster only; the server fsyncs as usual
        self._run(os.path.join(self.bin, "initdb"), "-D", self.data, "--username=postgres", f"--pwfile={pwfile}",
                  "--auth-local=trust", "--auth-host=scram-sha-256", "--encoding=UTF8", "--locale=C", "--no-sync",
                  timeout=120)
        os.unlink(pwfile)
        for attempt in range(5):  # a free port may be taken between the check and the bind
            self.port = _free_port()
            with open(os.path.join(self.data, "postgresql.auto.conf"), "a") as f:
                f.write(f"listen_addresses = '127.0.0.1'\nport = {self.port}\n"
                        f"unix_socket_directories = '{self.dir}'\n"
                        "fsync = on\nsynchronous_commit = on\nfull_page_writes = on\n"
                        "shared_buffers = 32MB\nmax_connections = 200\n"
                        "log_min_messages = warning\nlog_connections = off\n")
            try:
                self._run(os.path.join(self.bin, "pg_ctl"), "start", "-w", "-t", "60", "-D", self.data,
                          "-l", self.log, timeout=90)
                break
            except RuntimeError:
                if attempt == 4 or "could not bind" not in self.tail():
                    raise
        self.running = True
        self.admin(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{self.password}'")
        return self

    def restart(self) -> None:
        """Stop the server (fast: every connection is closed) and start it again on the same port."""
        ctl = os.path.join(self.bin, "pg_ctl")
        self._run(ctl, "restart", "-m", "fast", "-w", "-t", "60", "-D", self.data, "-l", self.log, timeout=90)

    def stop(self) -> None:
        """Stop the server (fast shutdown) and remove its directory."""
        try:
            if self.running:
                self._run(os.path.join(self.bin, "pg_ctl"), "stop", "-m", "fast", "-w", "-t", "60", "-D", self.data,
                          timeout=90)
                self.running = False
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- databases ------------------------------------------------------------------

    def admin(self, *statements: str, database: str = "postgres") -> None:
        """Run `statements` as the superuser over the unix socket, each in autocommit."""
        import psycopg2
        con = psycopg2.connect(host=self.dir, port=self.port, user="postgres", dbname=database)
        try:
            con.autocommit = True
            with con.cursor() as cur:
                for sql in statements:
                    cur.execute(sql)
        finally:
            con.close()

    def url(self, name: str, password: str | None = None) -> str:
        """postgresql://qf:PASSWORD@127.0.0.1:PORT/`name`, the password percent-escaped."""
        secret = quote(self.password if password is None else password, safe="")
        return f"postgresql://{ROLE}:{secret}@127.0.0.1:{self.port}/{name}"

    def create_database(self, name: str | None = None) -> str:
        """A new empty database owned by `qf` (from template0); returns its URL."""
        name = name or "qf_" + uuid.uuid4().hex[:12]
        self.admin(f'CREATE DATABASE "{name}" OWNER {ROLE} TEMPLATE template0')
        return self.url(name)

    def clone_database(self, url: str) -> str:
        """A new database copied from the one `url` names (its sessions are ended first: PostgreSQL
        copies only a database nobody is connected to); returns the copy's URL."""
        source = url.rsplit("/", 1)[-1].split("?", 1)[0]
        name = "qf_" + uuid.uuid4().hex[:12]
        self.admin(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{source}'",
                   f'CREATE DATABASE "{name}" OWNER {ROLE} TEMPLATE "{source}"')
        return self.url(name)

    def drop_database(self, url_or_name: str) -> None:
        """Drop a database made by `create_database`, closing whatever still holds it."""
        name = url_or_name.rsplit("/", 1)[-1].split("?", 1)[0]
        self.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def start() -> PgServer:
    """A running PgServer; RuntimeError naming the reason when the binaries are missing or it fails."""
    path = bin_dir()
    if path is None:
        raise RuntimeError(f"no PostgreSQL server binaries ({BIN_GLOB}/initdb): `make sysdeps` installs "
                           "Debian's postgresql")
    server = PgServer(path)
    started = time.perf_counter()
    try:
        server.start()
    except BaseException:
        tail = server.tail()
        server.stop()
        if tail:
            print(tail)
        raise
    server.start_s = time.perf_counter() - started
    return server


def rows(url: str, sql: str, params: tuple = ()) -> list[tuple]:
    """Every row `sql` returns on the database `url` names; [] while its tables do not exist yet
    (as tests/test_e2e.py reads a SQLite file the broker has not created yet)."""
    import psycopg2
    from psycopg2 import errors
    con = psycopg2.connect(url)
    try:
        with con.cursor() as cur:
            try:
                cur.execute(sql, params or None)
            except errors.UndefinedTable:
                return []
            return cur.fetchall()
    finally:
        con.close()
