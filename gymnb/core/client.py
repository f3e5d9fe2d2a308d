"""A small blocking JSON-over-HTTP client: the validation checks and the real-stack drivers talk to servers with it.

Blocking on purpose: the checks run inside Jupyter kernels, whose event loop is already running, so
`asyncio.run` is unavailable there; the standard library's client works in any context and keeps every status
code and error body for the report.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import urllib.error
import urllib.request

from gymnb.core.config import API_KEY_ENV
from gymnb.core.errors import ServerError


@dataclasses.dataclass
class HttpReply:
    status: int
    body: object  # decoded JSON, or the raw text when the body is not JSON
    seconds: float

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


def root_url(url: str) -> str:
    """Server root from either form users paste: `http://h:p` or `http://h:p/v1`."""
    url = url.rstrip("/")
    return url.removesuffix("/v1")


def request_json(method: str, url: str, body: object = None, *, api_key: str = "", timeout: float = 600.0,
                 raw_body: bytes | None = None) -> HttpReply:
    """Send one request; any HTTP status comes back as a reply, an unreachable server raises ServerError."""
    data = raw_body if raw_body is not None else (None if body is None else json.dumps(body).encode())
    headers = {"Content-Type": "application/json"}
    api_key = api_key or os.environ.get(API_KEY_ENV, "")  # how `gymnb validate` hands the key to a kernel
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ServerError(f"cannot reach {url}: {reason}. Is the server running? Start one with "
                          f"`gymnb serve` (or pass its URL with --base-url / base_url).") from None
    seconds = time.perf_counter() - start
    text = raw.decode("utf-8", errors="replace")
    try:
        parsed = json.loads(text) if text else None
    except json.JSONDecodeError:
        parsed = text
    return HttpReply(status, parsed, seconds)


def error_message(reply: HttpReply) -> str | None:
    """The message of an OpenAI-style error body (`{"error": {"message"}}`, or vLLM's flat `{"message"}`)."""
    body = reply.body
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return err["message"]
        if isinstance(body.get("message"), str):
            return body["message"]
    return None


def describe(reply: HttpReply, limit: int = 300) -> str:
    """`HTTP 400: <message or body>` for check details."""
    text = error_message(reply) or (reply.body if isinstance(reply.body, str) else json.dumps(reply.body))
    text = text or ""
    return f"HTTP {reply.status}: {text[:limit]}"
