"""Control requests to risk (HALT, RESUME, FLATTEN, STATE): the one way a front end acts."""
from __future__ import annotations

import time

from shared import curve, messages
from shared.bus import LazyPirateClient, NoReply
from shared.config import Config
from shared.enums import ControlAction
from shared.errors import DecodeError, QFError
from shared.messages import Control, ControlReply, Error


class RiskUnreachable(QFError):
    """Risk did not answer a control request in time (a front end says 503 / "risk is down")."""
    code = "risk_unavailable"


class RiskRefused(QFError):
    """Risk answered with an error, or with something that is not a control reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def ask_risk(cfg: Config, action: ControlAction, by: str, reason: str) -> dict:
    """Send a `control` request to risk (Lazy Pirate REQ, one attempt: a control is not repeated
    behind the caller's back) and return its reply as a plain dict {state, reason, positions,
    equity, detail}. Raises RiskUnreachable when risk does not answer within
    QF_RISK_CONTROL_TIMEOUT_MS, RiskRefused when it answers with an error or nonsense. With
    QF_CURVE_KEYS it speaks as the `api` party (the only key risk takes HALT/RESUME/FLATTEN from):
    KeyFileError when that key cannot be read."""
    client = LazyPirateClient(cfg.bus.risk_rep, cfg.risk.control_timeout_ms, retries=1,
                              curve=curve.load(cfg, "api"))
    try:
        raw = client.request(messages.encode(Control(ts=time.time_ns(), action=action, by=by, reason=reason)))
    except NoReply:
        raise RiskUnreachable(f"risk did not answer within {cfg.risk.control_timeout_ms} ms") from None
    finally:
        client.close()
    try:
        reply = messages.decode(raw, messages.REQUESTS)
    except DecodeError as exc:
        raise RiskRefused("bad_risk_reply", f"risk's answer could not be read: {str(exc)[:80]}") from None
    if isinstance(reply, Error):
        raise RiskRefused("risk_error", f"{reply.code}: {reply.text}"[:300])
    if not isinstance(reply, ControlReply):
        raise RiskRefused("bad_risk_reply", f"unexpected {reply.TYPE} answer")
    return {"state": reply.state.value, "reason": reply.reason, "positions": reply.positions,
            "equity": reply.equity, "detail": reply.detail}
