"""schemathesis hooks for tests/services/api/test_openapi.py (SCHEMATHESIS_HOOKS): the API's own
rules on top of schemathesis' checks."""
from __future__ import annotations

import schemathesis

# the only 5xx the API gives in that test's world: /health names the services that do not beat
DOCUMENTED_5XX = {("/health", 503, "unhealthy")}


@schemathesis.check
def error_bodies_are_the_api_shape(ctx, response, case):
    """Every 4xx/5xx is JSON {"error": {"code", "message"}}."""
    if response.status_code >= 400 and case.method.upper() != "HEAD":
        ctype = response.headers.get("content-type", response.headers.get("Content-Type", [""]))
        ctype = ctype[0] if isinstance(ctype, list) else ctype
        if not ctype.startswith("application/json"):
            raise AssertionError(f"{response.status_code} answered as {ctype!r}")
        error = response.json().get("error")
        if not (isinstance(error, dict) and isinstance(error.get("code"), str) and error["code"]
                and isinstance(error.get("message"), str)):
            raise AssertionError(f"{response.status_code} without the error shape: {response.text[:200]}")


@schemathesis.check
def no_undocumented_server_error(ctx, response, case):
    """No 5xx but /health's 503 `unhealthy` (never a 500)."""
    if response.status_code >= 500:
        code = (response.json().get("error") or {}).get("code")
        if (case.operation.path, response.status_code, code) not in DOCUMENTED_5XX:
            raise AssertionError(f"{response.status_code} {code} from {case.operation.path}: {response.text[:200]}")


@schemathesis.check
def refusals_are_400(ctx, response, case):
    """A request the API refuses for what it carries is 400 `bad_param` (never 422): only the
    auth, routing, method and size refusals have their own codes."""
    status = response.status_code
    if 400 <= status < 500 and status not in (400, 401, 403, 404, 405, 413):
        raise AssertionError(f"{status} for a request: {response.text[:200]}")
    if status == 400 and case.method.upper() == "GET":
        code = (response.json().get("error") or {}).get("code")
        if code != "bad_param":
            raise AssertionError(f"400 with code {code!r}: {response.text[:200]}")


_KINDS = {"/api/v1/trades": "trades", "/api/v1/orders": "orders", "/api/v1/signals": "signals"}


@schemathesis.hook
def map_case(ctx, case):
    """A cursor schemathesis made in the documented shape is made one the endpoint gave (the same
    position, re-signed for this endpoint): the document can say a cursor's shape, not its check,
    so a generated one would be refused as made up (400), which positive data must not be."""
    import re
    from services.control import queries
    cursor = (case.query or {}).get("cursor")
    kind = _KINDS.get(case.operation.path)
    if isinstance(cursor, str) and kind:
        m = re.fullmatch(r"[tos]\.([0-7]?[0-9a-f]{1,15})\.([A-Za-z0-9_-]{1,100})\.[0-9a-f]{10}", cursor)
        if m and (kind != "signals" or re.fullmatch(r"[0-9a-f]{1,16}", m[2])):
            row_id = int(m[2], 16) if kind == "signals" else m[2]
            case.query["cursor"] = queries.encode_cursor(kind, int(m[1], 16), row_id)
    return case
