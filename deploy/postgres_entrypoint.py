"""The `postgres` container of docker-compose.yml's postgres profile: Debian's PostgreSQL serving the database QF_DB names.

QF_DB is the one setting (postgresql://USER:PASSWORD@postgres:5432/NAME, the URL every QuantumFlow
service is given too): on the first start, with an empty data directory, this makes the cluster
(initdb: UTF-8, C collation, data checksums), the role USER with PASSWORD (scram-sha-256) and the
database NAME owned by it, with a server that listens on its unix socket only meanwhile; then,
and on every later start, it execs the server listening on every interface of the container,
password logins only. Without a usable QF_DB it prints one line and exits with status 2 (a
secret is never defaulted). The password is never printed.
"""
from __future__ import annotations

import glob
import os
import subprocess
import sys
import tempfile
from urllib.parse import unquote, urlparse

DATA = os.environ.get("PGDATA", "/var/lib/postgresql/data")
SOCKETS = "/var/run/postgresql"


def fail(text: str) -> None:
    print(f"qf-postgres: {text}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def bin_dir() -> str:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(p.split("/")[4]))
    if not found:
        fail("no PostgreSQL server in /usr/lib/postgresql/*/bin (the image installs Debian's postgresql)")
    return os.path.dirname(found[-1])


def target() -> tuple[str, str, str]:
    """(user, password, database) from QF_DB; exits with one line when it names none."""
    url = os.environ.get("QF_DB", "")
    parsed = urlparse(url)
    if parsed.scheme not in ("postgres", "postgresql"):
        fail("QF_DB must be postgresql://USER:PASSWORD@postgres:5432/NAME for the postgres profile "
             "(set it in .env next to docker-compose.yml)")
    user, password = unquote(parsed.username or ""), unquote(parsed.password or "")
    name = unquote(parsed.path.lstrip("/"))
    if not (user and password and name):
        fail("QF_DB must name a user, a password and a database: postgresql://USER:PASSWORD@postgres:5432/NAME")
    if user == "postgres":
        fail("QF_DB: use a user of its own, not the superuser `postgres`")
    return user, password, name


def quote_ident(text: str) -> str:
    return '"' + text.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def initialise(bin_: str, user: str, password: str, name: str) -> None:
    """initdb into DATA, then the role and the database over the unix socket (nothing listens on TCP)."""
    with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(DATA), delete=False) as f:
        f.write(os.urandom(24).hex() + "\n")  # the superuser's: it logs in over the socket only (peer)
        pwfile = f.name
    try:
        subprocess.run([f"{bin_}/initdb", "-D", DATA, "--username=postgres", f"--pwfile={pwfile}",
                        "--auth-local=peer", "--auth-host=scram-sha-256", "--encoding=UTF8", "--locale=C",
                        "--data-checksums"], check=True, stdout=subprocess.DEVNULL)
    finally:
        os.unlink(pwfile)
    with open(os.path.join(DATA, "pg_hba.conf"), "a") as f:
        f.write("# QuantumFlow's services, from the other containers: password logins only\n"
                "host all all 0.0.0.0/0 scram-sha-256\nhost all all ::/0 scram-sha-256\n")
    ctl = [f"{bin_}/pg_ctl", "-D", DATA, "-w", "-t", "60"]
    subprocess.run([*ctl, "-o", f"-c listen_addresses='' -c unix_socket_directories={SOCKETS}", "start"],
                   check=True, stdout=subprocess.DEVNULL)
    try:
        sql = (f"CREATE ROLE {quote_ident(user)} LOGIN PASSWORD {quote_literal(password)};\n"
               f"CREATE DATABASE {quote_ident(name)} OWNER {quote_ident(user)} TEMPLATE template0;\n")
        # on stdin, never on a command line (ps would show it) or in a log line
        subprocess.run([f"{bin_}/psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", SOCKETS, "-U", "postgres",
                        "-d", "postgres"], input=sql, text=True, check=True, stdout=subprocess.DEVNULL)
    finally:
        subprocess.run([*ctl, "-m", "fast", "stop"], check=True, stdout=subprocess.DEVNULL)
    print(f"qf-postgres: made the cluster in {DATA}, role {user}, database {name}", flush=True)


def main() -> None:
    user, password, name = target()
    bin_ = bin_dir()
    if not os.path.exists(os.path.join(DATA, "PG_VERSION")):
        os.makedirs(DATA, mode=0o700, exist_ok=True)
        initialise(bin_, user, password, name)
    os.execv(f"{bin_}/postgres", [f"{bin_}/postgres", "-D", DATA, "-c", "listen_addresses=*",
                                  "-c", f"unix_socket_directories={SOCKETS}"])


if __name__ == "__main__":
    main()
