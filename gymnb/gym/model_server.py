"""Model server (NeMo Gym's `vllm_model`): the Responses API in front of any OpenAI-compatible chat endpoint.

    POST /v1/responses          Responses create params -> Response (conversion in gymnb.core.responses)
    POST /v1/chat/completions   chat body -> the policy endpoint's chat completion (model name and n=1 set here)
    GET  /                      {"status": "ok"}

Config (configs/envs/policy_model.yaml): `base_url` (one URL ending in /v1, or a list), `api_key`, `model`,
`return_token_id_information`, `uses_reasoning_parser`, `chat_template_kwargs`, `request_timeout_seconds`.

Several base URLs: each session (the model server's session cookie, which the agent carries across the steps of
one rollout) sticks to one endpoint, chosen by a hash of the session id, so a multi-turn rollout's prefix stays
in one engine's cache. Token ids, as real NeMo Gym's vllm_model does it: with `return_token_id_information`
every chat request asks for vLLM's per-token ids (gymnb.core.wire.VLLM_MODEL_TOKEN_REQUEST), and the ids are read in
gymnb.core.wire's priority: a complete bundle on the message (gymnb serve, NeMo RL), else vLLM's `return_token_ids`
fields, else the `token_id:<N>` logprobs plus `POST /tokenize` for the prompt. A server that answers with
none of them gives a 502 naming what is missing (real vllm_model raises there too).

Upstream failures never hang or kill the server: unreachable -> 502, timeout -> 504, an upstream 4xx is passed
on with its message, and a prompt over the context (HTTP 400 naming the context length) becomes an empty
completion cut for length, as NeMo Gym does, so the rollout ends `incomplete` instead of failing.
"""

from __future__ import annotations

import hashlib
import json
import time

import aiohttp
from aiohttp import web

from gymnb.core.errors import ConfigError, RequestError
from gymnb.core.http import read_json
from gymnb.core.responses import chat_to_response, responses_to_chat
from gymnb.core.wire import SOURCE_LOGPROBS, WireError, read_token_ids, tokenize_body
from gymnb.gym.common import check_responses_create_params, make_server_app, session_id

CLIENT_KEY = web.AppKey("gymnb_model_client", aiohttp.ClientSession)
CONTEXT_ERROR_MARKERS = ("context_length_exceeded", "context length", "maximum context", "max_tokens")


def pick_base_url(base_urls: list[str], sid: str) -> str:
    """Per-session affinity: a stable hash of the session id picks the endpoint."""
    digest = hashlib.sha256(sid.encode()).digest()
    return base_urls[int.from_bytes(digest[:8], "big") % len(base_urls)]


def empty_length_completion(model: str) -> dict:
    return {"id": "chatcmpl-context-overflow", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": [{"index": 0, "finish_reason": "length",
                                         "message": {"role": "assistant", "content": ""}}]}


class PolicyClient:
    """Calls the policy endpoint(s) of one model server instance."""

    def __init__(self, config: dict):
        urls = config["base_url"]
        self.base_urls = [u.rstrip("/") for u in ([urls] if isinstance(urls, str) else list(urls))]
        if not self.base_urls:
            raise ConfigError(f"model server {config.get('name', 'policy_model')!r}: base_url is empty")
        self.model = config["model"]
        self.api_key = config.get("api_key")
        self.name = config.get("name", "policy_model")
        self.return_tokens = bool(config.get("return_token_id_information", True))
        self.chat_template_kwargs = config.get("chat_template_kwargs")
        self.uses_reasoning_parser = bool(config.get("uses_reasoning_parser", True))
        self.timeout = float(config.get("request_timeout_seconds", 600.0))

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    async def post(self, http: aiohttp.ClientSession, url: str, body: dict) -> tuple[int, dict]:
        try:
            async with http.post(url, json=body, headers=self.headers(),
                                 timeout=aiohttp.ClientTimeout(total=self.timeout)) as resp:
                text = await resp.text()
                status = resp.status
        except TimeoutError:
            raise RequestError(f"model server {self.name!r}: the policy endpoint {url} did not answer within "
                               f"{self.timeout:.0f}s (request_timeout_seconds)", code="upstream_timeout",
                               status=504) from None
        except aiohttp.ClientError as exc:
            raise RequestError(f"model server {self.name!r}: cannot reach the policy endpoint {url}: {exc}. Is the "
                               "policy server running at that base URL?", code="upstream_unreachable",
                               status=502) from None
        try:
            return status, json.loads(text)
        except json.JSONDecodeError:
            if status >= 400:
                return status, {"error": {"message": text[:2000]}}
            raise RequestError(f"model server {self.name!r}: {url} answered non-JSON: {text[:300]!r}",
                               code="upstream_protocol", status=502) from None

    async def chat(self, http: aiohttp.ClientSession, body: dict, sid: str) -> dict:
        """Send a chat completion to this session's endpoint; the completion with token fields on its message."""
        base_url = pick_base_url(self.base_urls, sid)
        body = {**body, "model": self.model, "n": 1}
        status, completion = await self.post(http, f"{base_url}/chat/completions", body)
        if status >= 400:
            message = _error_message(completion)
            if status == 400 and any(m in message.lower() or m == _error_code(completion)
                                     for m in CONTEXT_ERROR_MARKERS):
                return empty_length_completion(self.model)
            raise RequestError(f"model server {self.name!r}: the policy endpoint answered HTTP {status}: {message}",
                               code="upstream_error", status=status if status < 500 else 502)
        if not isinstance(completion.get("choices"), list) or not completion["choices"]:
            raise RequestError(f"model server {self.name!r}: chat completion without choices: "
                               f"{json.dumps(completion)[:300]}", code="upstream_protocol", status=502)
        if self.return_tokens:
            await self.attach_tokens(http, base_url, body, completion)
        return completion

    async def attach_tokens(self, http: aiohttp.ClientSession, base_url: str, body: dict, completion: dict) -> None:
        """Put the call's three token fields on the message, read from whichever shape the endpoint used."""
        choice = completion["choices"][0]
        try:
            sources = read_token_ids(completion)
        except WireError as exc:
            raise RequestError(f"model server {self.name!r}: {exc}", code="upstream_protocol", status=502) from None
        if not sources:
            raise RequestError(f"model server {self.name!r}: return_token_id_information is on, but the policy "
                               "endpoint returned no token ids (no prompt_token_ids/generation_token_ids on the "
                               "message, no vLLM token_ids, no choices[0].logprobs.content)",
                               code="upstream_protocol", status=502)
        ids = sources[0]
        if ids.source == SOURCE_LOGPROBS:
            ids = ids.with_prompt(await self.tokenize(http, base_url, body))
        choice.setdefault("message", {}).update(ids.as_fields())
        for key in ("logprobs", "token_ids"):  # now on the message; duplicates would only travel along
            choice.pop(key, None)
        completion.pop("prompt_token_ids", None)

    async def tokenize(self, http: aiohttp.ClientSession, base_url: str, body: dict) -> list[int]:
        """Prompt ids from the endpoint's `/tokenize` (at the server root, not under /v1)."""
        url = base_url.removesuffix("/v1") + "/tokenize"
        status, tokenized = await self.post(http, url, tokenize_body(body))
        if status >= 400 or not isinstance(tokenized.get("tokens"), list):
            raise RequestError(f"model server {self.name!r}: POST {url} failed (HTTP {status}): "
                               f"{_error_message(tokenized)}", code="upstream_error", status=502)
        return tokenized["tokens"]


def _error_message(body: dict) -> str:
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return str(error.get("message"))
    return str(body.get("message") or body)[:2000] if isinstance(body, dict) else str(body)[:2000]


def _error_code(body: dict) -> str | None:
    error = body.get("error") if isinstance(body, dict) else None
    return error.get("code") if isinstance(error, dict) else None


def make_app(config: dict) -> web.Application:
    """The model server for one `vllm_model` instance config."""
    client = PolicyClient(config)
    app = make_server_app(config.get("name", "policy_model"))

    async def http_session(app: web.Application):
        # No cookie jar: the policy endpoint is stateless, and cookies of one rollout must not leak to another.
        app[CLIENT_KEY] = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
        yield
        await app[CLIENT_KEY].close()

    async def responses(request: web.Request) -> web.Response:
        params = await read_json(request)
        check_responses_create_params(params, prefix="")
        body = responses_to_chat(params, model=client.model, chat_template_kwargs=client.chat_template_kwargs,
                                 vllm_logprobs=client.return_tokens)
        completion = await client.chat(request.app[CLIENT_KEY], body, session_id(request))
        return web.json_response(chat_to_response(params, completion, model=client.model,
                                                  uses_reasoning_parser=client.uses_reasoning_parser))

    async def chat_completions(request: web.Request) -> web.Response:
        body = await read_json(request)
        if not isinstance(body.get("messages"), list):
            raise RequestError("field 'messages' must be a list", param="messages", status=422)
        if client.chat_template_kwargs and "chat_template_kwargs" not in body:
            body["chat_template_kwargs"] = dict(client.chat_template_kwargs)
        completion = await client.chat(request.app[CLIENT_KEY], body, session_id(request))
        return web.json_response(completion)

    app.cleanup_ctx.append(http_session)
    app.router.add_post("/v1/responses", responses)
    app.router.add_post("/v1/chat/completions", chat_completions)
    return app
