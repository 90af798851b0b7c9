"""A JSON request body read within bounds: size, nesting, strict JSON, one object.

Flask's `get_json` parsed any size and depth with the standard library: a
body nested a few thousand levels deep raised RecursionError out of the
parser (HTTP 500), and duplicate keys or `NaN` passed silently. Here the size
is capped before anything is parsed, the nesting is counted by a linear scan
of the brackets outside strings before the parser recurses, and the parser
refuses what JSON does not allow."""
from __future__ import annotations

import json
import re
from decimal import Decimal

from flask import Request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from services.api.errors import bad_param
from shared.errors import ApiError

MAX_DEPTH = 16  # far above any body the API takes (control: one flat object)
MAX_NUMBER_CHARS = 40  # a number's text; Python's int() of 10^5 digits costs seconds

# a whole string (escapes included), or one bracket: brackets inside strings are not nesting
_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)


def nesting(text: str) -> int:
    """The deepest nesting of arrays and objects in JSON `text` (0 for a scalar); linear,
    no recursion. Brackets inside strings do not count."""
    depth = peak = 0
    for m in _TOKENS.finditer(text):
        ch = m.group()
        if ch in "[{":
            depth += 1
            peak = max(peak, depth)
        elif ch in "]}":
            depth -= 1
    return peak


def _unique(pairs: list[tuple[str, object]]) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key[:40]!r}")
        out[key] = value
    return out


def _number(text: str) -> Decimal:
    if len(text) > MAX_NUMBER_CHARS:
        raise ValueError(f"a number of more than {MAX_NUMBER_CHARS} characters")
    return Decimal(text)  # exact, never a float


def _constant(name: str):
    raise ValueError(f"{name} is not JSON")


def json_kind(value: object) -> str:
    """What a parsed JSON value is, in JSON's words: null, true/false, a number, a string, an array."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float, Decimal)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def parse_object(data: bytes, max_depth: int = MAX_DEPTH) -> dict:
    """`data` as one strict JSON object: UTF-8, no duplicate keys, no NaN/Infinity, numbers
    (as Decimal) of at most MAX_NUMBER_CHARS characters, nested at most `max_depth` deep.
    Raises ApiError 400 `bad_param` naming what is wrong."""
    if not data.strip():
        raise bad_param("the body is empty: expected a JSON object")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad_param(f"the body is not valid UTF-8 (byte {exc.start})") from None
    depth = nesting(text)
    if depth > max_depth:
        raise bad_param(f"the body is nested {depth} levels deep; at most {max_depth} are accepted")
    try:
        value = json.loads(text, object_pairs_hook=_unique, parse_int=_number, parse_float=_number,
                           parse_constant=_constant)
    except json.JSONDecodeError as exc:
        raise bad_param(f"the body is not valid JSON: {exc.msg} at character {exc.pos}") from None
    except (ValueError, RecursionError) as exc:  # from the hooks above (RecursionError: belt and braces)
        raise bad_param(f"the body is not accepted JSON: {str(exc)[:100]}") from None
    if not isinstance(value, dict):
        raise bad_param(f"the body must be a JSON object, not {json_kind(value)}")
    return value


def read_object(request: Request, max_bytes: int, max_depth: int = MAX_DEPTH) -> dict:
    """The body of `request` as one JSON object (see `parse_object`).

    Raises ApiError: 400 `bad_param` when the content type is not JSON (or its charset not
    UTF-8), the body cannot be read (a malformed chunk) or is not accepted; 413 `request_entity_too_large` over `max_bytes`
    (checked against Content-Length before reading, and while reading a chunked body)."""
    if not request.is_json:
        raise bad_param(f"the body must be application/json, not {(request.mimetype or 'none')[:60]!r}")
    charset = request.mimetype_params.get("charset", "utf-8").lower()
    if charset not in ("utf-8", "utf8"):
        raise bad_param(f"the body must be UTF-8, not {charset[:40]!r}")
    # one byte over the cap: werkzeug stops a chunked body at its limit without a word, so
    # a body cut at exactly max_bytes would pass as whole; a byte more proves it is too long
    request.max_content_length = max_bytes + 1
    try:
        data = request.get_data(cache=True)
    except RequestEntityTooLarge:
        data = None
    except HTTPException:
        raise  # werkzeug's own answer (a client that went away: 400), JSON like every error
    except Exception as exc:  # the server refusing the body as it is read (gunicorn: a bad chunk size)
        raise bad_param(f"the body could not be read: {type(exc).__name__}") from None
    if data is None or len(data) > max_bytes:
        raise ApiError(413, "request_entity_too_large", f"the body is larger than {max_bytes} bytes")
    return parse_object(data, max_depth)

