"""JSON over HTTP as every gymnb server speaks it: the policy server and the NeMo-Gym-compatible servers.

Errors go out as OpenAI-style bodies, `{"error": {"message", "type", "param", "code"}}`, with the status of
the failure; request bodies come in as JSON objects. Only aiohttp and gymnb.errors below it, so the server
stage and the environments stage share it without importing each other.
"""

from __future__ import annotations

import json

from aiohttp import web

from gymnb.errors import RequestError

# OpenAI's error types; a 404 is an invalid request there too (an unknown model or route).
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
               500: "server_error", 502: "upstream_error", 503: "server_error", 504: "upstream_error"}


def error_response(message: str, *, status: int = 400, param: str | None = None, code: str | None = None,
                   type_: str | None = None) -> web.Response:
    """An OpenAI-style error body with `status`; `type_` overrides the type the status implies."""
    error_type = type_ or ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    body = {"error": {"message": message, "type": error_type, "param": param, "code": code}}
    return web.json_response(body, status=status)


async def read_json(request: web.Request, *, non_object_status: int = 422) -> dict:
    """The request body as a JSON object: 400 if it is not JSON, `non_object_status` if it is not an object.

    NeMo Gym's servers (FastAPI) answer a well-formed body of the wrong shape with 422, OpenAI's with 400:
    each server keeps the status its clients expect.
    """
    raw = await request.read()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(f"the request body is not valid JSON: {exc}", code="invalid_json", status=400) from None
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}",
                           status=non_object_status)
    return body
