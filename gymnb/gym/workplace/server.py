"""workplace_assistant environment, resources server: NeMo Gym's protocol over the simulated company.

Endpoints (besides `GET /`):
- `POST /seed_session` with a dataset row: gives this session (cookie) a fresh copy of the company; `{}`.
- `POST /<tool_name>` with the tool's JSON arguments: `{"output": ...}` from the session's company, e.g.
  `POST /email_reply_email {"email_id": "00000057", "body": "Thanks!"}` -> `{"output": "Email replied
  successfully."}`. A call that does not fit the tool (undecodable JSON, unknown argument, wrong type) answers
  `{"output": "Error executing tool '<name>': <why>"}` with HTTP 200, so the model sees it and can retry; a tool
  that does not exist is a 404 naming the 27 that do; a call before `/seed_session` is a 400.
- `POST /verify` with the row plus `"response"`: the body plus `"reward"` (see `verify`). It replays the calls
  on pristine copies of the company, so it needs no session; it ends the caller's session if there is one.
- `POST /aggregate_metrics` with `{"verify_responses": [...]}`: NeMo Gym's metrics, plus the mean reward of
  each task category (`mean/reward/<category>`).

Config (the `workplace_assistant` resources server instance): `data_dir` (a folder of NeMo Gym's CSV files, or
null for the embedded synthetic company), `name`, `max_sessions` (live sessions kept, oldest dropped first;
default 10000). NeMo Gym answers an unknown tool with a 200 error output; gymnb answers 404 so that a misrouted
call is not mistaken for a tool's answer.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import socket
import statistics
from typing import Any

from aiohttp import web

from gymnb.core.errors import RequestError
from gymnb.core.http import read_json
from gymnb.gym.common import (
    SessionStore,
    check_row,
    check_verify_body,
    make_server_app,
    require_fields,
)
from gymnb.gym.metrics import compute_aggregate_metrics
from gymnb.gym.workplace.company import base_state
from gymnb.gym.workplace.schemas import TOOL_NAMES, TOOL_SPECS
from gymnb.gym.workplace.state import CompanyState
from gymnb.gym.workplace.tools import ToolError, call_tool
from gymnb.gym.workplace.verify import compute_reward, extract_function_calls

log = logging.getLogger(__name__)


def parse_ground_truth(body: dict) -> list[dict]:
    """The row's ground-truth calls; 422 naming the field when they are not `[{"name", "arguments"}]`.

    NeMo Gym also accepts the list JSON-encoded as one string; `arguments` is a JSON string.
    """
    require_fields(body, {"ground_truth": (list, str)})
    calls = body["ground_truth"]
    if isinstance(calls, str):
        try:
            calls = json.loads(calls)
        except json.JSONDecodeError as exc:
            raise RequestError(f"field 'ground_truth' is a string but not JSON: {exc}", param="ground_truth",
                               code="invalid_json", status=422) from None
        if not isinstance(calls, list):
            raise RequestError("field 'ground_truth' must be a list of calls", param="ground_truth", status=422)
    for i, call in enumerate(calls):
        if not isinstance(call, dict):
            raise RequestError(f"ground_truth[{i}] must be an object with `name` and `arguments`",
                               param=f"ground_truth[{i}]", code="invalid_type", status=422)
        require_fields(call, {"name": str, "arguments": str}, prefix=f"ground_truth[{i}].")
    return calls


def check_workplace_row(body: dict) -> None:
    """A dataset row of this environment: NeMo Gym's row checks, then its own fields when present."""
    check_row(body)
    if "ground_truth" in body:
        parse_ground_truth(body)
    optional = {"id": (int, str), "category": str, "environment_name": str}
    require_fields(body, {k: t for k, t in optional.items() if k in body})


def fastapi_dumps(value) -> str:
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def run_tool(state: CompanyState, name: str, raw_body: bytes) -> Any:
    """The tool's output for a raw request body; any failure becomes NeMo Gym's error text."""
    try:
        arguments = json.loads(raw_body or b"{}")
        return call_tool(state, name, arguments)
    except (ToolError, ValueError, TypeError) as exc:  # ValueError covers undecodable JSON and bad UTF-8
        return f"Error executing tool '{name}': {exc}"
    except Exception as exc:  # a tool bug must not cost the rollout its server
        log.exception("tool %s failed", name)
        return f"Error executing tool '{name}': {type(exc).__name__}: {exc}"


def category_means(verify_responses: list[dict]) -> dict[str, float]:
    by_category = collections.defaultdict(list)
    for response in verify_responses:
        if isinstance(response.get("category"), str):
            by_category[response["category"]].append(float(response["reward"]))
    return {f"mean/reward/{cat}": statistics.fmean(rewards) for cat, rewards in sorted(by_category.items())}


def make_app(config: dict) -> web.Application:
    """The workplace_assistant resources server for one instance's config (see the module docstring)."""
    base = base_state(config.get("data_dir"))  # loaded before serving: a bad data_dir fails at startup
    app = make_server_app(config.get("name", "workplace_assistant"))
    # A session holds a whole company copy (~0.3 MB synthetic), so /verify releases it, as NeMo Gym does; the
    # bound only matters for rollouts that never reach /verify.
    sessions = SessionStore(max_sessions=int(config.get("max_sessions", 10_000)))

    async def seed_session(request: web.Request) -> web.Response:
        check_workplace_row(await read_json(request))
        sessions.put(request, base.copy())
        return web.json_response({})

    async def call(request: web.Request) -> web.Response:
        name = request.match_info["tool_name"]
        if name not in TOOL_SPECS:
            raise RequestError(f"unknown tool {name!r}; workplace_assistant has these 27 tools: "
                               f"{', '.join(TOOL_NAMES)}", param="tool_name", code="unknown_tool", status=404)
        state = sessions.get(request)
        if state is None:
            raise RequestError("this session was verified and released: POST /seed_session to start a new one",
                               param="session", code="session_not_seeded", status=400)
        # The body is what the agent hands the model as the tool's output, so it must be byte for byte what
        # NeMo Gym's FastAPI server sends: compact separators, non-ASCII kept.
        return web.json_response({"output": run_tool(state, name, await request.read())}, dumps=fastapi_dumps)

    async def verify(request: web.Request) -> web.Response:
        body = await read_json(request)
        check_verify_body(body)
        check_workplace_row(body)
        ground_truth = parse_ground_truth(body)
        reward = compute_reward(base, extract_function_calls(body["response"]), ground_truth)
        if request in sessions:
            sessions.put(request, None)  # the rollout is over: drop its company, keep the id as "ended"
        return web.json_response({**body, "reward": reward})

    async def aggregate_metrics(request: web.Request) -> web.Response:
        body = await read_json(request)
        require_fields(body, {"verify_responses": list})
        responses = body["verify_responses"]
        for i, item in enumerate(responses):
            if not isinstance(item, dict):
                raise RequestError(f"verify_responses[{i}] must be an object", param=f"verify_responses[{i}]",
                                   status=422)
            require_fields(item, {"reward": (int, float)}, prefix=f"verify_responses[{i}].")
        # The row's `id` is a number but not a metric.
        metrics = compute_aggregate_metrics([{k: v for k, v in r.items() if k != "id"} for r in responses])
        metrics["agent_metrics"].update(category_means(responses))
        return web.json_response(metrics)

    app.router.add_post("/seed_session", seed_session)
    app.router.add_post("/verify", verify)
    app.router.add_post("/aggregate_metrics", aggregate_metrics)
    app.router.add_post("/{tool_name}", call)  # last: the fixed routes above take precedence
    return app


def main(argv: list[str]) -> int:
    """Serve one workplace_assistant resources server (for pointing a NeMo Gym client at it by hand)."""
    parser = argparse.ArgumentParser(prog="python -m gymnb.gym.workplace.server", description=main.__doc__)
    parser.add_argument("--data-dir", default=None, help="folder of NeMo Gym CSV files (default: synthetic company)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 = a free port")
    args = parser.parse_args(argv)
    app = make_app({"data_dir": args.data_dir})
    sock = socket.socket()
    sock.bind((args.host, args.port))
    print(f"workplace_assistant resources server on http://{args.host}:{sock.getsockname()[1]}", flush=True)
    web.run_app(app, sock=sock, print=None)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
