"""JSON over HTTP as every gymnb server speaks it: the policy server and the NeMo-Gym-compatible servers.

Errors go out as OpenAI-style bodies, `{"error": {"message", "type", "param", "code"}}`, with the status of
the failure; request bodies come in as JSON objects. `ServerLoop` serves aiohttp apps from one background
thread, answering even requests aiohttp cannot parse in that error shape. Only aiohttp and gymnb.core.errors
below it, so the policy stage and the environments stage share it without importing each other.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import threading
import traceback

from aiohttp import web, web_protocol
from aiohttp.http_exceptions import LineTooLong

from gymnb.core.errors import EnvironmentServerError, RequestError

log = logging.getLogger(__name__)

# OpenAI's error types; a 404 is an invalid request there too (an unknown model or route).
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
               500: "server_error", 502: "upstream_error", 503: "server_error", 504: "upstream_error"}
MAX_JSON_DEPTH = 100  # far past any real request (tool schemas nest ~10), far below Python's recursion limit


def error_response(message: str, *, status: int = 400, param: str | None = None, code: str | None = None,
                   type_: str | None = None) -> web.Response:
    """An OpenAI-style error body with `status`; `type_` overrides the type the status implies."""
    error_type = type_ or ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    body = {"error": {"message": message, "type": error_type, "param": param, "code": code}}
    return web.json_response(body, status=status)


SERVER_NAME_KEY = web.AppKey("gymnb_server_name", str)  # the name a 404 gives, to tell servers apart


@web.middleware
async def error_middleware(request: web.Request, handler):
    """Every failure of a handler as an OpenAI-style body with its status: a client's fault, an unknown route
    or a bug answers, and the server keeps serving."""
    try:
        return await handler(request)
    except RequestError as exc:
        return error_response(str(exc), status=exc.status, param=exc.param, code=exc.code)
    except web.HTTPException as exc:  # unknown route, wrong method, body too large
        if exc.status < 400:
            raise
        message = f"{exc.reason}: {request.method} {request.path}"
        if exc.status == 404:
            message = f"no route {request.method} {request.path} on server {request.app.get(SERVER_NAME_KEY, '?')!r}"
        return error_response(message, status=exc.status)
    except Exception as exc:  # noqa: BLE001  a bug or an upstream failure: log it, answer 500, keep serving
        log.error("%s %s failed:\n%s", request.method, request.path, traceback.format_exc())
        return error_response(f"internal server error: {type(exc).__name__}: {exc}", status=500)


BODY_READ_TIMEOUT = 120.0  # seconds for a body to arrive: a stalled client does not hold a handler forever
_SCALARS = frozenset({int, float, bool, type(None), str})
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def parse_json_body(raw: bytes):
    """Decode a request body: 400 (`invalid_json`) for what is not JSON a server can work with.

    Refused besides syntax errors: bytes that are not UTF-8, nesting deeper than MAX_JSON_DEPTH (Python's
    parser and every recursive consumer after it would raise RecursionError), and lone surrogates such as
    `"\\ud800"` (valid JSON escapes that no UTF-8 encoder, tokenizer or response writer accepts).
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(f"the request body is not UTF-8: {exc}", code="invalid_json") from None
    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RequestError(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:
        raise RequestError(f"the request body nests JSON deeper than {MAX_JSON_DEPTH} levels",
                           code="invalid_json") from None
    check_json_value(body, strings=_SURROGATE_ESCAPE.search(text) is not None)
    return body


def check_json_value(body, *, strings: bool) -> None:
    """Depth bound and (when `strings`) no lone surrogate in any key or string; iterative, so no recursion."""
    if isinstance(body, str) and strings and not is_utf8(body):
        raise RequestError("the request body is a string holding a lone UTF-16 surrogate", code="invalid_json")
    stack = [(body, 1, "body")] if isinstance(body, (dict, list)) else []
    while stack:
        value, depth, path = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise RequestError(f"the request body nests JSON deeper than {MAX_JSON_DEPTH} levels (at "
                               f"{path[:60]}...)", code="invalid_json")
        if isinstance(value, list) and _SCALARS.issuperset(map(type, value)) and not (strings and str in
                                                                                       set(map(type, value))):
            continue  # a list of numbers (token ids, log-probs): nothing to check, skipped at C speed
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            if strings:
                for text in (key, item):
                    if isinstance(text, str) and not is_utf8(text):
                        where = json_path(path, key)
                        raise RequestError(f"{where} holds a lone UTF-16 surrogate (e.g. \"\\ud800\"), which "
                                           f"is not text: send valid Unicode", param=where, code="invalid_json")
            if isinstance(item, (dict, list)):
                stack.append((item, depth + 1, json_path(path, key)))


def is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def json_path(path: str, key) -> str:
    return f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}"


async def read_body(request: web.Request) -> bytes:
    """The raw body, or 408 when the client stops sending it (slow-loris clients would hold the handler)."""
    try:
        return await asyncio.wait_for(request.read(), BODY_READ_TIMEOUT)
    except TimeoutError:
        raise RequestError(f"the request body did not arrive within {BODY_READ_TIMEOUT:g} s",
                           code="request_timeout", status=408) from None


async def read_json(request: web.Request, *, non_object_status: int = 422) -> dict:
    """The request body as a JSON object: 400 if it is not JSON (see parse_json_body), 408 if it stalls,
    `non_object_status` if it is not an object.

    NeMo Gym's servers (FastAPI) answer a well-formed body of the wrong shape with 422, OpenAI's with 400:
    each server keeps the status its clients expect. Big bodies are decoded on a worker thread so the event
    loop keeps answering other requests.
    """
    raw = await read_body(request)
    if len(raw) < 65536:
        body = parse_json_body(raw)
    else:
        body = await asyncio.get_running_loop().run_in_executor(None, parse_json_body, raw)
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}",
                           status=non_object_status)
    return body


# aiohttp keeps an idle connection, or one whose client stalls before finishing its headers, for an hour by
# default: a few hundred stalled clients would hold as many sockets. Clients pool connections for less (aiohttp
# 15 s, httpx 5 s), so closing after 30 idle seconds costs them nothing.
KEEPALIVE_TIMEOUT = 30.0


class OpenAIErrorHandler(web_protocol.RequestHandler):
    """aiohttp answers a request it cannot parse (a header past 8 KiB, a broken request line) itself, before
    any app code runs, in plain text; this gives those answers the OpenAI error shape every other error has."""

    __slots__ = ()  # the same layout as RequestHandler, so an instance of it can take this class

    def handle_error(self, request, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        plain = super().handle_error(request, status, exc, message)  # logs, checks nothing was sent yet
        if isinstance(exc, LineTooLong):
            response = error_response(f"a request line or header is longer than the server accepts (8190 bytes): "
                                  f"{exc.message}", status=status, code="header_too_large")
        else:
            response = error_response(f"{plain.reason}: {message or exc or 'the request could not be parsed'}",
                                  status=status)
        response.force_close()
        return response


class OpenAIErrorSite(web.SockSite):
    """A SockSite whose connections answer unparsable requests with OpenAI-style bodies (OpenAIErrorHandler)."""

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server

        def protocol() -> web_protocol.RequestHandler:
            handler = server()
            handler.__class__ = OpenAIErrorHandler
            return handler

        self._server = await asyncio.get_running_loop().create_server(protocol, sock=self._sock,
                                                                      backlog=self._backlog)


class ServerLoop:
    """One background thread running an asyncio loop that serves any number of aiohttp apps on loopback."""

    def __init__(self, name: str = "gymnb-gym"):
        self.loop = asyncio.new_event_loop()
        self._runners: list[web.AppRunner] = []
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro, timeout: float | None = None):
        """Run a coroutine on the background loop from another thread and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start_app(self, app: web.Application, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve `app` on host:port (0 = a free port) and return `http://host:port`."""
        return self.run(self._start_app(app, host, port))

    async def _start_app(self, app: web.Application, host: str, port: int) -> str:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise EnvironmentServerError(f"cannot listen on {host}:{port}: {exc}; choose another port "
                                         "(or 0 for a free one)") from None
        runner = web.AppRunner(app, access_log=None, handle_signals=False, keepalive_timeout=KEEPALIVE_TIMEOUT)
        await runner.setup()
        await OpenAIErrorSite(runner, sock, shutdown_timeout=1.0).start()
        self._runners.append(runner)
        return f"http://{host}:{sock.getsockname()[1]}"

    def stop(self) -> None:
        if not self._thread.is_alive():
            return

        async def _cleanup():
            for runner in reversed(self._runners):
                await runner.cleanup()
            self._runners.clear()
            # what is still pending (a scheduler, a request cut short by Ctrl-C) is cancelled and awaited: a
            # closed loop that still holds pending tasks makes asyncio print "Task was destroyed but it is
            # pending!" with a stack dump for each one at exit
            pending = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)

        try:
            self.run(_cleanup(), timeout=30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=30)
            if not self._thread.is_alive():
                self.loop.close()
