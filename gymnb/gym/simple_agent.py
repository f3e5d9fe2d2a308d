"""Agent server (NeMo Gym's `simple_agent`): seed a session, loop model <-> tools, verify.

    POST /run                a dataset row -> the resources server's verify response (row + response + reward)
    POST /v1/responses       Responses create params -> one Response holding every step's output (no verify)
    POST /aggregate_metrics  proxied to the resources server
    GET  /                   {"status": "ok"}

The loop (docs/protocol.md section 3, as NeMo Gym's simple_agent): call the model server with `input + outputs so far`; append
its output items; stop when the response is incomplete (e.g. cut by max_output_tokens), or has no function_call
and at least one assistant message, or after `max_steps`. Otherwise run each function_call in order: POST
`/<name>` on the resources server with the JSON-decoded arguments and append a `function_call_output` holding
the raw HTTP body. Undecodable arguments become `{"error": "Invalid tool call arguments: ..."}` and the loop
goes on (the model sees its mistake). Tool names that are not plain identifiers, or name the server's own
endpoints (`verify`, `seed_session`, ...), get the same kind of error output instead of a request.
Departure from NeMo Gym: with `max_steps: null` the loop still ends after MAX_STEPS_CAP steps, so a model that
only ever emits reasoning cannot hang a rollout.

Cookies: the resources server's session cookie from `/seed_session` goes with every tool call and `/verify`;
the model server's cookie goes with every model call of the rollout (endpoint affinity). Nothing is shared
between rollouts: the HTTP client keeps no cookie jar.
Failures of the model or resources server (policy server down, a 422 for a malformed row) come back as an
OpenAI-style error naming the server and its message, with the upstream 4xx status or 502.
"""

from __future__ import annotations

import json
import re

import aiohttp
from aiohttp import web

from gymnb.core.errors import ConfigError, RequestError
from gymnb.core.http import read_json
from gymnb.gym.common import check_responses_create_params, check_row, make_server_app

HTTP_KEY = web.AppKey("gymnb_agent_http", aiohttp.ClientSession)
MAX_STEPS_CAP = 100
TOOL_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,127}$")
RESERVED_TOOL_NAMES = frozenset({"seed_session", "verify", "aggregate_metrics", "run", "v1"})


def _cookies(resp: aiohttp.ClientResponse) -> dict[str, str]:
    return {name: morsel.value for name, morsel in resp.cookies.items()}


class Upstream:
    """One server the agent calls (model or resources), by its resolved config reference."""

    def __init__(self, ref: dict, role: str):
        if not ref or "url" not in ref:
            raise ConfigError(f"simple_agent: the {role} reference {ref!r} has no url; start the agent through "
                              "gymnb.gym.start_gym, which resolves references to running servers")
        self.name, self.url, self.role = ref.get("name", role), ref["url"], role

    async def post(self, http: aiohttp.ClientSession, path: str, body, cookies: dict) -> tuple[int, str, dict]:
        """(status, body text, cookies to carry on) of POST url+path."""
        try:
            async with http.post(self.url + path, json=body, cookies=cookies) as resp:
                return resp.status, await resp.text(), {**cookies, **_cookies(resp)}
        except aiohttp.ClientError as exc:
            raise RequestError(f"{self.role} {self.name!r} at {self.url} is unreachable ({path}): {exc}",
                               code="upstream_unreachable", status=502) from None

    async def post_json(self, http: aiohttp.ClientSession, path: str, body, cookies: dict) -> tuple[dict, dict]:
        """POST and decode a JSON object; a non-200 answer raises, keeping its message, param and 4xx status."""
        status, text, cookies = await self.post(http, path, body, cookies)
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = {"error": {"message": text[:2000]}}
        if status != 200:
            error = data.get("error") if isinstance(data, dict) else None
            error = error if isinstance(error, dict) else {"message": str(data)[:2000]}
            raise RequestError(f"{self.role} {self.name!r} {path} answered HTTP {status}: {error.get('message')}",
                               param=error.get("param"), code=error.get("code") or "upstream_error",
                               status=status if 400 <= status < 500 else 502)
        if not isinstance(data, dict):
            raise RequestError(f"{self.role} {self.name!r} {path} answered a non-object", status=502)
        return data, cookies


def _add_usage(total: dict | None, usage: dict | None) -> dict | None:
    if not usage:
        return total
    if total is None:
        return {k: v for k, v in usage.items()}
    for key in ("input_tokens", "output_tokens", "total_tokens"):
        total[key] = total.get(key, 0) + usage.get(key, 0)
    return total


class SimpleAgent:
    def __init__(self, config: dict):
        self.model = Upstream(config.get("model_server"), "model server")
        self.resources = Upstream(config.get("resources_server"), "resources server")
        self.max_steps = config.get("max_steps")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise ConfigError(f"simple_agent {config.get('name')!r}: max_steps must be null or an integer >= 1, "
                              f"got {self.max_steps!r}")

    async def call_tool(self, http, call: dict, cookies: dict) -> tuple[str, dict]:
        """The function_call_output text for one call, and the resources cookies after it."""
        name = call.get("name") or ""
        try:
            arguments = json.loads(call.get("arguments") or "")
        except (json.JSONDecodeError, TypeError) as exc:
            return json.dumps({"error": f"Invalid tool call arguments: {exc!r}"}), cookies
        if not TOOL_NAME_RE.match(name) or name in RESERVED_TOOL_NAMES:
            return json.dumps({"error": f"Invalid tool name {name!r}"}), cookies
        # A failing tool's text (4xx/5xx body included) is the model's observation, as in NeMo Gym.
        _, text, cookies = await self.resources.post(http, f"/{name}", arguments, cookies)
        return text, cookies

    async def run_episode(self, http, params: dict, resources_cookies: dict) -> tuple[dict, dict, dict]:
        """The model loop; (final Response with all outputs, resources cookies, model cookies)."""
        inputs = params["input"]
        if isinstance(inputs, str):
            inputs = [{"type": "message", "role": "user", "content": inputs}]
        outputs: list[dict] = []
        model_cookies: dict = {}
        usage = None
        limit = min(self.max_steps or MAX_STEPS_CAP, MAX_STEPS_CAP)
        for step in range(1, limit + 1):
            response, model_cookies = await self.model.post_json(
                http, "/v1/responses", {**params, "input": inputs + outputs}, model_cookies)
            step_output = response.get("output") or []
            outputs.extend(step_output)
            usage = _add_usage(usage, response.get("usage"))
            if response.get("incomplete_details"):
                break
            calls = [o for o in step_output if o.get("type") == "function_call"]
            if not calls and any(o.get("type") == "message" and o.get("role") == "assistant" for o in step_output):
                break
            for call in calls:
                text, resources_cookies = await self.call_tool(http, call, resources_cookies)
                outputs.append({"type": "function_call_output", "call_id": call.get("call_id"), "output": text})
        response["output"], response["usage"] = outputs, usage
        return response, resources_cookies, model_cookies

    async def run(self, http, row: dict, cookies: dict) -> dict:
        """seed_session -> loop -> verify; the verify response."""
        _, cookies = await self.resources.post_json(http, "/seed_session", row, cookies)
        response, cookies, _ = await self.run_episode(http, row["responses_create_params"], cookies)
        result, _ = await self.resources.post_json(http, "/verify", {**row, "response": response}, cookies)
        return result


def make_app(config: dict) -> web.Application:
    """The simple agent for one instance config (references resolved to urls by gymnb.gym.spinup)."""
    agent = SimpleAgent(config)
    app = make_server_app(config.get("name", "simple_agent"), sessions=False)

    async def http_session(app: web.Application):
        # DummyCookieJar: cookies are carried per rollout by hand, never shared across rollouts.
        app[HTTP_KEY] = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(),
                                              timeout=aiohttp.ClientTimeout(total=None, sock_connect=30))
        yield
        await app[HTTP_KEY].close()

    async def run(request: web.Request) -> web.Response:
        row = await read_json(request)
        check_row(row)
        result = await agent.run(request.app[HTTP_KEY], row, dict(request.cookies))
        return web.json_response(result)

    async def responses(request: web.Request) -> web.Response:
        params = await read_json(request)
        check_responses_create_params(params, prefix="")
        response, resources_cookies, model_cookies = await agent.run_episode(
            request.app[HTTP_KEY], params, dict(request.cookies))
        answer = web.json_response(response)
        for name, value in {**resources_cookies, **model_cookies}.items():  # for a later /verify by the caller
            answer.set_cookie(name, value)
        return answer

    async def aggregate_metrics(request: web.Request) -> web.Response:
        body = await read_json(request)
        result, _ = await agent.resources.post_json(request.app[HTTP_KEY], "/aggregate_metrics", body, {})
        return web.json_response(result)

    app.cleanup_ctx.append(http_session)
    app.router.add_post("/run", run)
    app.router.add_post("/v1/responses", responses)
    app.router.add_post("/aggregate_metrics", aggregate_metrics)
    return app
