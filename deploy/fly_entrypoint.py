"""Fly.io entrypoint: hand the root-owned volume to the `qf` user, drop root, exec `qf ARGS`.

Fly mounts volumes owned by root; QuantumFlow runs as the unprivileged `qf`
user (as in docker compose), so this is the only code that runs as root, and
only for the chown. fly.toml's `[processes] app = "up"` arrives here as
argv, so the machine runs `qf up`: every service under the supervisor, over
ipc:// sockets, with the SQLite file on the volume."""
import os
import pwd
import sys

DATA_DIR = "/data"
USER = "qf"


def main(argv: list[str]) -> None:
    user = pwd.getpwnam(USER)
    if os.getuid() == 0:
        if os.path.isdir(DATA_DIR):
            # Only the mount point: files below it are created by `qf` itself.
            os.chown(DATA_DIR, user.pw_uid, user.pw_gid)
        os.setgroups([])
        os.setgid(user.pw_gid)
        os.setuid(user.pw_uid)
    os.environ["HOME"] = user.pw_dir
    os.environ["USER"] = os.environ["LOGNAME"] = USER
    args = argv or ["up"]
    os.execvp("qf", ["qf", *args])


if __name__ == "__main__":
    main(sys.argv[1:])
