"""simple_agent end to end: a scripted tiny model behind the real policy server, the real model server and a
small stateful resources server built from gymnb.gym.common (a counter), all over loopback HTTP.

The scripted model calls `add` with undecodable arguments, then `add(a=2)`, then answers.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket

import aiohttp
import pytest
from aiohttp import web

from gymnb.core.http import ServerLoop, read_json
from gymnb.core.models import cache_dir
from gymnb.gym import model_server, simple_agent
from gymnb.gym.common import SessionStore, check_row, make_server_app, require_fields

# With a description: the policy server fills in a missing one, and the scripted prompts must match its rendering.
ADD_TOOL = {"type": "function", "name": "add", "description": "Add a.",
            "parameters": {"type": "object", "properties": {"a": {}}}}
CHAT_TOOLS = [{"type": "function", "function": {k: v for k, v in ADD_TOOL.items() if k != "type"}}]
PROMPT = "Add 2."
BAD_ARGUMENTS = '{"a": 2'


def invalid_arguments_output(arguments: str) -> str:
    """What NeMo Gym's simple_agent returns to the model for arguments that are not JSON."""
    try:
        json.loads(arguments)
    except json.JSONDecodeError as exc:
        return json.dumps({"error": f"Invalid tool call arguments: {exc!r}"})
    raise AssertionError("arguments decode")


def tool_turn(content: str) -> list[dict]:
    return [{"role": "tool", "tool_call_id": "ignored by the template", "content": content}]


CONVERSATION = {
    "messages": [{"role": "user", "content": PROMPT}],
    "tools": CHAT_TOOLS,
    "completions": ['<tool_call>\n{"name": "add", "arguments": ' + json.dumps(BAD_ARGUMENTS) + '}\n</tool_call>',
                    '<tool_call>\n{"name": "add", "arguments": {"a": 2}}\n</tool_call>',
                    "Done."],
    "followups": [tool_turn(invalid_arguments_output(BAD_ARGUMENTS)), tool_turn('{"output": 2}')],
}


def make_counter_app() -> web.Application:
    """A resources server: /seed_session, /add (per-session total), /verify (reward = total == target)."""
    app, store = make_server_app("counter"), SessionStore()

    async def seed_session(request):
        body = await read_json(request)
        check_row(body)
        require_fields(body, {"target": int})
        store.put(request, {"total": 0})
        return web.json_response({})

    async def add(request):
        state, body = store.get(request), await read_json(request)
        require_fields(body, {"a": int})
        state["total"] += body["a"]
        return web.json_response({"output": state["total"]})

    async def verify(request):
        body = await read_json(request)
        return web.json_response({**body, "reward": float(store.get(request)["total"] == body["target"])})

    app.router.add_post("/seed_session", seed_session)
    app.router.add_post("/add", add)
    app.router.add_post("/verify", verify)
    return app


@pytest.fixture(scope="module")
def stack():
    from gymnb.policy.scripted import make_scripted_model
    from gymnb.policy.server import PolicyServer

    model_dir = make_scripted_model(cache_dir() / "tiny" / "scripted-gym-agent", [CONVERSATION])
    loop = ServerLoop("test-agent")
    with PolicyServer.start(str(model_dir), model_id="scripted") as policy:
        model_url = loop.start_app(model_server.make_app(
            {"name": "policy_model", "base_url": policy.base_url, "model": "scripted"}))
        counter_url = loop.start_app(make_counter_app())
        refs = {"model_server": {"type": "responses_api_models", "name": "policy_model", "url": model_url},
                "resources_server": {"type": "resources_servers", "name": "counter", "url": counter_url}}
        agents = {steps: loop.start_app(simple_agent.make_app({"name": "agent", "max_steps": steps, **refs}))
                  for steps in (None, 1)}
        yield {"agents": agents, "loop": loop, "counter_url": counter_url}
    loop.stop()


def row(target: int = 2) -> dict:
    return {"responses_create_params": {"input": [{"role": "user", "content": PROMPT}], "tools": [ADD_TOOL],
                                        "temperature": 0.0},
            "target": target}


async def post_all(url: str, bodies: list[dict]) -> list[tuple[int, dict]]:
    async with aiohttp.ClientSession() as http:
        async def one(body):
            async with http.post(url, json=body) as resp:
                return resp.status, await resp.json()
        return await asyncio.gather(*[one(b) for b in bodies])


def post(url: str, body: dict) -> tuple[int, dict]:
    return asyncio.run(post_all(url, [body]))[0]


def model_calls(output: list[dict]) -> list[dict]:
    return [item for item in output if "generation_token_ids" in item]


def test_run_loops_through_tools_and_verifies_in_the_seeded_session(stack):
    status, result = post(stack["agents"][None] + "/run", row())
    assert status == 200, result
    output = result["response"]["output"]
    assert [o["type"] for o in output] == ["function_call", "function_call_output"] * 2 + ["message"]
    assert [o["output"] for o in output if o["type"] == "function_call_output"] == [
        invalid_arguments_output(BAD_ARGUMENTS), '{"output": 2}']  # the bad call did not end the loop
    assert output[1]["call_id"] == output[0]["call_id"] and output[3]["call_id"] == output[2]["call_id"]
    assert result["reward"] == 1.0 and result["target"] == 2  # verify saw the session's state
    calls = model_calls(output)
    assert len(calls) == 3 and all(o["type"] != "function_call_output" for o in calls)
    for before, after in itertools.pairwise(calls):  # on-policy: each prompt extends the previous prompt+generation
        prefix = before["prompt_token_ids"] + before["generation_token_ids"]
        assert after["prompt_token_ids"][:len(prefix)] == prefix


def test_max_steps_ends_the_loop(stack):
    status, result = post(stack["agents"][1] + "/run", row())
    assert status == 200
    assert [o["type"] for o in result["response"]["output"]] == ["function_call", "function_call_output"]
    assert result["reward"] == 0.0  # add(2) never ran


def test_concurrent_rollouts_keep_their_own_sessions(stack):
    results = asyncio.run(post_all(stack["agents"][None] + "/run", [row(2), row(2), row(3), row(2)]))
    assert [r["reward"] for _, r in results] == [1.0, 1.0, 0.0, 1.0]


def test_responses_endpoint_runs_the_loop_without_verify(stack):
    async def go():
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            async with http.post(stack["counter_url"] + "/seed_session", json=row()) as resp:
                assert resp.status == 200
            async with http.post(stack["agents"][None] + "/v1/responses", json=row()["responses_create_params"]) as r:
                response = await r.json()
            async with http.post(stack["counter_url"] + "/verify", json={**row(), "response": response}) as resp:
                return response, await resp.json()
    response, verified = asyncio.run(go())
    assert response["output"][-1]["type"] == "message" and verified["reward"] == 1.0


@pytest.mark.parametrize("body, param", [
    ({"responses_create_params": {"tools": []}, "target": 2}, "responses_create_params.input"),
    ({"responses_create_params": {"input": "x", "max_tokens": 3}, "target": 2}, "responses_create_params.max_tokens"),
    ({"responses_create_params": {"input": "x"}}, "target"),  # refused by the resources server's seed_session
    ({"target": 2}, "responses_create_params"),
])
def test_malformed_rows_get_422_naming_the_field(stack, body, param):
    status, result = post(stack["agents"][None] + "/run", body)
    assert status == 422 and result["error"]["param"] == param


def test_policy_server_down_is_a_clear_error_not_a_hang(stack):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    loop = stack["loop"]
    model_url = loop.start_app(model_server.make_app({"name": "policy_model", "base_url": dead, "model": "m"}))
    agent_url = loop.start_app(simple_agent.make_app({
        "name": "agent", "model_server": {"name": "policy_model", "url": model_url},
        "resources_server": {"name": "counter", "url": stack["counter_url"]}}))
    status, result = post(agent_url + "/run", row())
    assert status == 502
    assert "cannot reach the policy endpoint" in result["error"]["message"] and dead in result["error"]["message"]
