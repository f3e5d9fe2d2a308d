"""Shared aiohttp pieces of every NeMo-Gym-compatible server (head, resources, agents, model server).

What a resources server needs, in the order it uses them:

- `make_server_app(name)` -> `web.Application` with `GET /` -> `{"status": "ok"}`, the error middleware and the
  session middleware already installed. Add your routes to it (`app.router.add_post("/verify", handler)`).
- Sessions. NeMo Gym keys per-rollout state by a session cookie; every response carries one (the cookie name
  is per server instance, `gymnb_session___<name>`, so one client jar can hold the cookies of several servers).
  In a handler, `session_id(request)` is this request's id (fresh if the client sent none). Keep state in a
  `SessionStore`: `store.put(request, state)` in `/seed_session`, `store.get(request)` in tools and `/verify`
  (HTTP 400 "no seeded session" when the client never seeded, as NeMo Gym's tool calls require).
- Errors. Raise `gymnb.core.errors.RequestError(message, param=..., status=...)` anywhere in a handler: the
  middleware answers `{"error": {"message", "type", "param", "code"}}` with that status. Unknown routes give
  404 in the same shape, and an unexpected exception gives 500 in the same shape: a client's fault never kills
  the server. `gymnb.core.http.error_response(...)` builds such a response directly.
- Input. `await gymnb.core.http.read_json(request)`: the body as a dict (400 if not JSON, nested deeper than
  MAX_JSON_DEPTH or holding lone surrogates, 408 if it stalls, 422 if not an object);
  `require_fields(body, {"question": str, ...})` raises 422 naming the first missing or mistyped field.
- Rows. `check_row(body)` checks a dataset row's `responses_create_params` as NeMo Gym does (an object with
  `input`; unknown keys rejected): 422 naming the field. `check_verify_body(body)` also checks `response`.
- Metrics. `compute_aggregate_metrics(verify_responses, score_fn=..., answer_key=...)` answers
  `POST /aggregate_metrics` in NeMo Gym's shape (group_level_metrics, agent_metrics, key_metrics).
- Running. `gymnb.core.http.ServerLoop` owns one background thread with an asyncio loop;
  `loop.start_app(app, host, port)` serves an app there (port 0 = a free port) and returns its URL;
  `loop.stop()` shuts all of them down.

Clients: aiohttp's default cookie jar ignores cookies from IP hosts such as 127.0.0.1, so carry the cookies
yourself (`cookies=resp.cookies`, as the simple agent does) or use `aiohttp.CookieJar(unsafe=True)`.
"""

from __future__ import annotations

import collections
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from gymnb.core.errors import RequestError
from gymnb.core.http import SERVER_NAME_KEY, error_middleware

log = logging.getLogger(__name__)

SESSION_COOKIE_PREFIX = "gymnb_session___"
# aiohttp >= 3.13 wants typed request keys; older versions take a plain string.
_SESSION_KEY = web.RequestKey("gymnb_session_id", str) if hasattr(web, "RequestKey") else "gymnb_session_id"

def cookie_name(server_name: str) -> str:
    return SESSION_COOKIE_PREFIX + server_name


def session_id(request: web.Request) -> str:
    """This request's session id: the client's cookie value, or a fresh id that the response will set."""
    return request[_SESSION_KEY]


@web.middleware
async def session_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
    name = cookie_name(request.app[SERVER_NAME_KEY])
    sid = request.cookies.get(name)
    request[_SESSION_KEY] = sid or uuid.uuid4().hex
    response = await handler(request)
    # Set on every response, as NeMo Gym does, so a client that only keeps the latest cookies stays in session.
    response.set_cookie(name, request[_SESSION_KEY], httponly=True, samesite="Lax")
    return response


async def handle_status(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def make_server_app(name: str, *, sessions: bool = True, client_max_size: int = 64 * 1024**2) -> web.Application:
    """A bare server with `GET /`, OpenAI-style errors and (by default) session cookies; add routes to it."""
    # Sessions outermost, so that error responses carry the session cookie too.
    middlewares = ([session_middleware] if sessions else []) + [error_middleware]
    app = web.Application(middlewares=middlewares, client_max_size=client_max_size)
    app[SERVER_NAME_KEY] = name
    app.router.add_get("/", handle_status)
    return app


class SessionStore:
    """Per-session state of one server, keyed by the session cookie; oldest sessions dropped past `max_sessions`.

    The bound keeps a long training run's memory flat: NeMo Gym never ends a session explicitly.
    """

    def __init__(self, max_sessions: int = 100_000):
        self.max_sessions = max_sessions
        self._states: collections.OrderedDict[str, Any] = collections.OrderedDict()

    def put(self, request: web.Request, state: Any) -> None:
        sid = session_id(request)
        self._states[sid] = state
        self._states.move_to_end(sid)
        while len(self._states) > self.max_sessions:
            self._states.popitem(last=False)

    def get(self, request: web.Request) -> Any:
        sid = session_id(request)
        if sid not in self._states:
            raise RequestError("no seeded session: POST /seed_session first and send back its session cookie",
                               param="session", code="session_not_seeded", status=400)
        return self._states[sid]

    def __contains__(self, request: web.Request) -> bool:
        return session_id(request) in self._states

    def __len__(self) -> int:
        return len(self._states)


def require_fields(body: dict, fields: dict[str, type | tuple[type, ...]], *, prefix: str = "") -> None:
    """Raise 422 naming the first field of `fields` that `body` lacks or holds with the wrong JSON type."""
    for name, types in fields.items():
        path = f"{prefix}{name}"
        if name not in body:
            raise RequestError(f"missing required field {path!r}", param=path, code="missing_field", status=422)
        value = body[name]
        # JSON true/false are not numbers, although Python's bool is an int.
        wrong_bool = isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,))
        if wrong_bool or not isinstance(value, types):
            want = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
            raise RequestError(f"field {path!r} must be {want}, got {type(value).__name__}",
                               param=path, code="invalid_type", status=422)


# The fields of OpenAI's ResponseCreateParamsNonStreaming that NeMo Gym accepts (it forbids any other key).
RESPONSES_CREATE_PARAMS_KEYS = frozenset({
    "background", "include", "input", "instructions", "max_output_tokens", "max_tool_calls", "metadata", "model",
    "parallel_tool_calls", "previous_response_id", "prompt", "reasoning", "service_tier", "store", "temperature",
    "text", "tool_choice", "tools", "top_logprobs", "top_p", "truncation", "user", "stream"})


def check_responses_create_params(params: Any, *, prefix: str = "responses_create_params.") -> None:
    """422 naming the field when `params` is not a Responses API request NeMo Gym would accept."""
    name = prefix.rstrip(".")
    if not isinstance(params, dict):
        raise RequestError(f"field {name!r} must be an object", param=name, code="invalid_type", status=422)
    unknown = sorted(set(params) - RESPONSES_CREATE_PARAMS_KEYS)
    if unknown:
        raise RequestError(f"unknown field {prefix}{unknown[0]} (allowed: {sorted(RESPONSES_CREATE_PARAMS_KEYS)})",
                           param=prefix + unknown[0], code="unknown_field", status=422)
    require_fields(params, {"input": (str, list)}, prefix=prefix)
    if params.get("stream"):
        raise RequestError("streaming is not supported", param=prefix + "stream", status=422)
    for i, item in enumerate(params["input"] if isinstance(params["input"], list) else []):
        if not isinstance(item, dict) or not (item.get("type") or item.get("role")):
            raise RequestError(f"{prefix}input[{i}] must be an object with a `type` or a `role`",
                               param=f"{prefix}input[{i}]", code="invalid_type", status=422)


def check_row(body: dict) -> None:
    """422 naming the field when a dataset row (the body of /run, /seed_session) is malformed."""
    require_fields(body, {"responses_create_params": dict})
    check_responses_create_params(body["responses_create_params"])


def check_verify_body(body: dict) -> None:
    """`check_row` plus a `response` object holding an `output` list of Responses output items."""
    check_row(body)
    require_fields(body, {"response": dict})
    require_fields(body["response"], {"output": list}, prefix="response.")
    for i, item in enumerate(body["response"]["output"]):
        check_output_item(item, f"response.output[{i}]")


def check_output_item(item: Any, path: str) -> None:
    """422 naming the field unless `item` is an output item object (a `type`; a message's text parts as text)."""
    if not isinstance(item, dict):
        raise RequestError(f"{path} must be an object (a Responses output item), got {type(item).__name__}",
                           param=path, code="invalid_type", status=422)
    require_fields(item, {"type": str}, prefix=f"{path}.")
    if item["type"] == "message":
        content = item.get("content") or []
        if not isinstance(content, list):
            raise RequestError(f"{path}.content must be a list of content parts", param=f"{path}.content",
                               code="invalid_type", status=422)
        for j, part in enumerate(content):
            if not isinstance(part, dict) or not isinstance(part.get("text", ""), str):
                raise RequestError(f"{path}.content[{j}] must be an object whose `text` is a string",
                                   param=f"{path}.content[{j}]", code="invalid_type", status=422)
    for name in ("name", "arguments"):
        if item["type"] == "function_call" and not isinstance(item.get(name), str):
            raise RequestError(f"{path}.{name} of a function_call must be a string", param=f"{path}.{name}",
                               code="invalid_type", status=422)
