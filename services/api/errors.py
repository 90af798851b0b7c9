"""The API's error answer: `{"error": {"code", "message"}}` with an HTTP status, for every failure."""
from __future__ import annotations

from shared.config import mask_secrets
from shared.errors import ApiError  # defined in the one error tree; importable from here too

__all__ = ["ApiError", "bad_param", "error_body", "error_code"]


def bad_param(message: str) -> ApiError:
    """400 `bad_param`: a query parameter or body field the API does not accept."""
    return ApiError(400, "bad_param", message)


def error_body(code: str, message: str) -> dict:
    """The JSON body of every error answer; a URL's credentials in `message` are masked
    (an error that quotes a setting or a driver's message must not hand them to a client)."""
    return {"error": {"code": code, "message": mask_secrets(message)}}


def error_code(reason: str) -> str:
    """An HTTP reason phrase as an error code: "Method Not Allowed" → "method_not_allowed"."""
    return "_".join(reason.lower().replace("-", " ").split()) or "error"
