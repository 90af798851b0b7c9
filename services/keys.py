"""`qf keys DIR`: a CURVE key pair per party, and where each file goes (shared/curve.py)."""
from __future__ import annotations

import argparse
import sys

from shared import curve


def add_parser(sub) -> None:
    k = sub.add_parser("keys", help="make the CURVE key pairs that secure the bus (QF_CURVE_KEYS)",
                       description="Make one CURVE key pair per party (" + ", ".join(curve.PARTIES) + ") in DIR: "
                                   "DIR/public/<party>.key (every host may hold all of them) and "
                                   "DIR/private/<party>.key_secret (mode 0600: only the host that runs that "
                                   "service). Then set QF_CURVE_KEYS=DIR: every ZeroMQ socket authenticates and "
                                   "encrypts, and each server accepts only its clients' keys. Keys already there "
                                   "are kept unless --force.")
    k.add_argument("dir", metavar="DIR", help="the key directory (made when missing)")
    k.add_argument("--force", action="store_true",
                   help="replace existing keys (every host then needs the new public keys and its new secret)")
    k.set_defaults(func=cmd_keys)


def cmd_keys(args: argparse.Namespace) -> int:
    """Exit 0 with the files listed; 1 when a key is already there (nothing written) or DIR cannot
    be used."""
    try:
        written = curve.make_keys(args.dir, force=args.force)
    except FileExistsError as exc:
        print(f"qf keys: {exc} already exists: nothing written (--force replaces every key pair; each host "
              "then needs the new files)", file=sys.stderr)
        return 1
    except OSError as exc:  # NotADirectoryError, PermissionError, a read-only file system
        print(f"qf keys: {args.dir}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(f"qf keys: made {len(written) // 2} CURVE key pairs in {args.dir}")
    for path in written:
        if path.suffix == ".key":
            print(f"  {path}  public: copy to every host")
        else:
            print(f"  {path}  secret (0600): only on the host that runs {path.name.removesuffix('.key_secret')}")
    print(f"Set QF_CURVE_KEYS={args.dir} for every service (README \"Running on several machines\").")
    return 0
