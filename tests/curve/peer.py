"""A process of its own that sends one request to a ZeroMQ ROUTER and prints what came back, as JSON.

    python tests/curve/peer.py ENDPOINT AS SERVER KIND ARG TIMEOUT_MS

AS is who the process is: `none` (no CURVE at all), `fresh` (a key pair made here, listed
nowhere) or `DIR:PARTY` (that party's secret key from a `qf keys` directory). SERVER is
`DIR:PARTY`, the public key of whoever binds ENDPOINT (ignored with `none`). KIND is `order`
(ARG: its client_order_id) or `control` (ARG: the action). Prints {"answer": the reply's type or
"NO_REPLY", "detail": its verdict, state or error code}: the tests in this folder run it to be a
client that is not in their own process."""
from __future__ import annotations

import json
import sys
import time
from decimal import Decimal
from pathlib import Path

import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from shared import messages  # noqa: E402
from shared.curve import public_path, read_key_file, secret_path  # noqa: E402
from shared.enums import ControlAction, OrderKind, Side  # noqa: E402


def main(endpoint: str, who: str, server: str, kind: str, arg: str, timeout_ms: str) -> None:
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    if who != "none":
        if who == "fresh":
            public, secret = zmq.curve_keypair()
        else:
            directory, party = who.split(":")
            public, secret = read_key_file(secret_path(directory, party), secret=True)
        directory, owner = server.split(":")
        sock.curve_publickey, sock.curve_secretkey = public, secret
        sock.curve_serverkey = read_key_file(public_path(directory, owner), secret=False)[0]
    sock.connect(endpoint)
    if kind == "order":
        req = messages.OrderRequest(ts=time.time_ns(), client_order_id=arg, strategy="peer", symbol="BTCUSDT",
                                    side=Side.BUY, kind=OrderKind.MARKET, qty=Decimal("0.001"))
    else:
        req = messages.Control(ts=time.time_ns(), action=ControlAction(arg), by="peer", reason="curve test")
    sock.send(messages.encode(req))
    if not sock.poll(int(timeout_ms)):
        print(json.dumps({"answer": "NO_REPLY", "detail": ""}))
        return
    reply = messages.decode(sock.recv(), messages.REQUESTS)
    detail = (getattr(reply, "code", None) or getattr(getattr(reply, "verdict", None), "value", None)
              or getattr(getattr(reply, "state", None), "value", None) or getattr(getattr(reply, "status", None),
                                                                                 "value", ""))
    print(json.dumps({"answer": reply.TYPE, "detail": detail}))


if __name__ == "__main__":
    main(*sys.argv[1:])
