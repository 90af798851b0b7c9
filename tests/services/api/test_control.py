"""Control endpoints against a real risk service on real sockets: bearer token, HALT/RESUME/FLATTEN, state, 503."""
from __future__ import annotations

import threading
import time
import uuid

import pytest

from services.api.app import CONTROL_MAX_BYTES, create_app
from services.api.body import nesting
from services.risk.service import RiskService
from shared.config import load

TOKEN = "t0ken-for-tests"


def settings(tmp_path, **extra) -> dict[str, str]:
    tag = uuid.uuid4().hex[:10]
    env = {key: f"inproc://{tag}-{name}" for key, name in (
        ("QF_MD_PUB", "md"), ("QF_RISK_REP", "risk"), ("QF_BROKER_REP", "broker"),
        ("QF_BROKER_PUB", "broker-pub"), ("QF_RISK_PUB", "risk-pub"))}
    env.update({"QF_DB": str(tmp_path / "qf.db"), "QF_RUN_DIR": str(tmp_path / "run"), "QF_API_TOKEN": TOKEN,
                "QF_SHABBAT_PAUSE": "false",  # risk on the wall clock: no weekday may change an answer
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


# -- issue #11: hostile bodies get a typed 400/413, never a 500, and never reach risk ---------

def post_raw(api, data: bytes, content_type: str | None = "application/json", **headers):
    headers = {**auth(), **headers}
    if content_type is not None:
        headers["Content-Type"] = content_type
    return api.post("/api/v1/control", data=data, headers=headers)


HOSTILE_BODIES = {
    "nested arrays 100k deep": b"[" * 100_000 + b"]" * 100_000,  # over the size cap too
    "nested arrays within the size cap": b"[" * 2000 + b"]" * 2000,
    "nested objects within the size cap": b'{"a":' * 600 + b"1" + b"}" * 600,
    "nested under a known field": b'{"action": "HALT", "reason": ' + b"[" * 1500 + b"]" * 1500 + b"}",
    "a scalar": b'"HALT"',
    "an array": b'[{"action": "HALT", "reason": "x"}]',
    "null": b"null",
    "empty": b"",
    "whitespace": b" \n\t ",
    "invalid utf-8": b'{"action": "HALT", "reason": "\xff\xfe"}',
    "utf-16": '{"action": "HALT", "reason": "x"}'.encode("utf-16"),
    "a BOM": b'\xef\xbb\xbf{"action": "HALT", "reason": "x"}',
    "a huge integer": b'{"action": "HALT", "reason": "x", "by": ' + b"9" * 3000 + b"}",
    "a huge exponent": b'{"action": "HALT", "reason": 1e999999999}',
    "NaN": b'{"action": "HALT", "reason": NaN}',
    "Infinity": b'{"action": "HALT", "reason": "x", "by": -Infinity}',
    "duplicate keys": b'{"action": "RESUME", "action": "HALT", "reason": "x"}',
    "unknown field": b'{"action": "HALT", "reason": "x", "force": true}',
    "many unknown fields": b"{" + b", ".join(b'"k%d": 1' % i for i in range(300)) + b"}",
    "a lone surrogate": b'{"action": "HALT", "reason": "\\ud800"}',
    "truncated": b'{"action": "HALT", "reason": "x"',
    "trailing garbage": b'{"action": "HALT", "reason": "x"} {}',
    "binary": bytes(range(256)) * 4,
    "a string of brackets": b'{"action": "HALT", "reason": "' + b"[" * 3000 + b'"}',
    "single quotes": b"{'action': 'HALT', 'reason': 'x'}",
    "a comment": b'{"action": "HALT", /* */ "reason": "x"}',
}


@pytest.mark.parametrize("name", sorted(HOSTILE_BODIES))
def test_hostile_control_bodies_are_typed_400_or_413(risk, api, name):
    data = HOSTILE_BODIES[name]
    resp = post_raw(api, data)
    expected = 413 if len(data) > CONTROL_MAX_BYTES else 400
    body = error_of(resp, expected)
    assert body["code"] == ("request_entity_too_large" if expected == 413 else "bad_param"), body
    assert body["message"] and len(body["message"]) < 400
    assert risk.engine.state.value == "ACTIVE"  # nothing reached risk


def test_a_deep_body_is_refused_before_the_parser_recurses():
    # the nesting scan itself is linear: far beyond any recursion limit, it just counts
    assert nesting("[" * 200_000 + "]" * 200_000) == 200_000
    assert nesting('{"a": "[[[{{{", "b": [[1], {"c": []}]}') == 4  # { [ { [
    assert nesting('"\\"[[["') == 0


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/json; charset=latin-1",
                                          "application/xml", "json"])
def test_a_body_that_is_not_declared_json_is_400(risk, api, content_type):
    resp = post_raw(api, b'{"action": "HALT", "reason": "x"}', content_type)
    assert error_of(resp, 400)["code"] == "bad_param"
    assert risk.engine.state.value == "ACTIVE"


def test_a_body_at_the_size_cap_is_read_and_one_byte_more_is_413(risk, api):
    head = b'{"action": "HALT", "reason": "x", "by": "'
    fits = head + b" " * (CONTROL_MAX_BYTES - len(head) - 2) + b'"}'
    assert len(fits) == CONTROL_MAX_BYTES
    assert error_of(post_raw(api, fits), 400)["code"] == "bad_param"  # read whole: `by` is too long
    over = fits[:-2] + b' "}'
    assert error_of(post_raw(api, over), 413)["code"] == "request_entity_too_large"


def test_a_valid_body_with_a_charset_and_json_suffix_still_works(risk, api):
    resp = post_raw(api, b'{"action": "HALT", "reason": "drill"}', "application/json; charset=UTF-8")
    assert resp.status_code == 200 and resp.get_json()["state"] == "HALTED"
    resp = post_raw(api, b'{"action": "RESUME", "reason": "ok"}', "application/merge-patch+json")
    assert resp.status_code == 200 and resp.get_json()["state"] == "ACTIVE"


def test_every_error_is_json_with_the_error_shape(api):
    for resp, status in ((api.get("/nope"), 404), (api.delete("/health"), 405), (api.put("/api/v1/control"), 405),
                         (api.get("/api/v1/control"), 405), (api.post("/api/v1/control"), 401)):
        body = error_of(resp, status)
        assert resp.is_json and set(body) == {"code", "message"}, body
    assert api.delete("/health").headers["Allow"] == "GET, HEAD, OPTIONS"
