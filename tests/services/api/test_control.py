"""Control endpoints against a real risk service on real sockets: bearer token, HALT/RESUME/FLATTEN, state, 503."""
from __future__ import annotations

import threading
import time
import uuid

import pytest

from services.api.app import create_app
from services.risk.service import RiskService
from shared.config import load

TOKEN = "t0ken-for-tests"


def settings(tmp_path, **extra) -> dict[str, str]:
    tag = uuid.uuid4().hex[:10]
    env = {key: f"inproc://{tag}-{name}" for key, name in (
        ("QF_MD_PUB", "md"), ("QF_RISK_REP", "risk"), ("QF_BROKER_REP", "broker"),
        ("QF_BROKER_PUB", "broker-pub"), ("QF_RISK_PUB", "risk-pub"))}
    env.update({"QF_DB": str(tmp_path / "qf.db"), "QF_RUN_DIR": str(tmp_path / "run"), "QF_API_TOKEN": TOKEN,
                "QF_RISK_CONTROL_TIMEOUT_MS": "300", "QF_HEARTBEAT_MS": "100"})
    env.update(extra)
    return env


@pytest.fixture
def risk_cfg(tmp_path):
    return load(settings(tmp_path))


@pytest.fixture
def risk(risk_cfg):
    """A running risk service (no broker: nothing here needs one)."""
    svc = RiskService(risk_cfg)
    thread = threading.Thread(target=svc.run, name="risk", daemon=True)
    thread.start()
    try:
        yield svc
    finally:
        svc.stop()
        thread.join(5)
        assert not thread.is_alive()


@pytest.fixture
def api(risk_cfg):
    return create_app(risk_cfg).test_client()


def auth(token: str = TOKEN) -> dict:
    return {"Authorization": f"Bearer {token}"}


def error_of(resp, status: int) -> dict:
    assert resp.status_code == status, resp.get_data(as_text=True)
    return resp.get_json()["error"]


def test_control_needs_the_bearer_token(risk, api):
    body = {"action": "HALT", "reason": "drill"}
    resp = api.post("/api/v1/control", json=body)
    assert error_of(resp, 401)["code"] == "unauthorized" and resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert error_of(api.post("/api/v1/control", json=body, headers={"Authorization": "Basic abc"}), 401)
    assert error_of(api.post("/api/v1/control", json=body, headers=auth("wrong")), 403)["code"] == "forbidden"
    assert error_of(api.get("/api/v1/risk/state"), 401)["code"] == "unauthorized"
    assert error_of(api.get("/api/v1/risk/state", headers=auth("nope")), 403)["code"] == "forbidden"
    assert risk.engine.state.value == "ACTIVE"  # nothing reached risk


def test_control_is_off_without_a_configured_token(tmp_path, risk):
    cfg = load({**settings(tmp_path), "QF_API_TOKEN": ""})
    resp = create_app(cfg).test_client().post("/api/v1/control", json={"action": "HALT", "reason": "x"},
                                              headers=auth(""))
    assert error_of(resp, 403)["code"] == "control_disabled"


def test_halt_resume_flatten_and_state(risk, api):
    resp = api.post("/api/v1/control", json={"action": "HALT", "reason": "drill", "by": "alice"}, headers=auth())
    assert resp.status_code == 200, resp.get_data(as_text=True)
    body = resp.get_json()
    assert body["state"] == "HALTED" and body["reason"] == "drill" and body["equity"] == "10000"
    assert body["detail"]["by"] == "api:alice" and body["detail"]["changed"] is True
    assert risk.engine.state.value == "HALTED"

    state = api.get("/api/v1/risk/state", headers=auth()).get_json()
    assert state["state"] == "HALTED" and state["detail"]["changed"] is False
    assert {"realized", "fees", "unrealized", "peak_equity", "day_start_equity", "drawdown"} <= set(state["detail"])

    flat = api.post("/api/v1/control", json={"action": "FLATTEN", "reason": "end of day"}, headers=auth()).get_json()
    assert flat["state"] == "REDUCING" and flat["detail"]["flatten"] == []  # nothing open, nothing to send
    back = api.post("/api/v1/control", json={"action": "RESUME", "reason": "ok"}, headers=auth()).get_json()
    assert back["state"] == "ACTIVE" and risk.engine.state_by == "api"


@pytest.mark.parametrize("body", [None, [], {"action": "STATE", "reason": "x"}, {"action": "HALT"},
                                  {"action": "HALT", "reason": ""}, {"action": "HALT", "reason": "x", "who": "me"},
                                  {"action": "HALT", "reason": "x" * 501}, {"action": "HALT", "reason": "x", "by": 5}])
def test_bad_control_bodies_are_400(risk, api, body):
    kwargs = {"data": "not json", "content_type": "application/json"} if body is None else {"json": body}
    assert error_of(api.post("/api/v1/control", headers=auth(), **kwargs), 400)["code"] == "bad_param"
    assert risk.engine.state.value == "ACTIVE"


def test_silent_risk_is_503(api):
    started = time.monotonic()  # no risk service runs on this endpoint
    resp = api.post("/api/v1/control", json={"action": "HALT", "reason": "x"}, headers=auth())
    assert error_of(resp, 503)["code"] == "risk_unavailable"
    assert error_of(api.get("/api/v1/risk/state", headers=auth()), 503)["code"] == "risk_unavailable"
    assert time.monotonic() - started < 5
