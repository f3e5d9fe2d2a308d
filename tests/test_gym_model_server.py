"""Model server: Responses <-> chat conversion against an OpenAI-compatible endpoint that records what it gets.

The endpoint here stands in for an external server (vLLM, a training framework): it answers scripted chat
completions, so each test can assert both what the model server sent and what it made of the answer.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from aiohttp import web

from gymnb.core.http import ServerLoop
from gymnb.core.responses import input_to_messages
from gymnb.gym.model_server import make_app, pick_base_url

TOKENS = {"prompt_token_ids": [1, 2, 3], "generation_token_ids": [7, 8], "generation_log_probs": [-0.5, -0.25]}


class RecordingEndpoint:
    """POST /v1/chat/completions: records the body, answers the next scripted (status, body)."""

    def __init__(self, answers: list[tuple[int, dict]]):
        self.answers, self.requests = list(answers), []
        self.app = web.Application()
        self.app.router.add_post("/v1/chat/completions", self.chat)

    async def chat(self, request: web.Request) -> web.Response:
        self.requests.append(await request.json())
        status, body = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        return web.json_response(body, status=status)


def completion(message: dict, finish_reason: str = "stop") -> tuple[int, dict]:
    return 200, {"id": "c1", "object": "chat.completion", "created": 1, "model": "m",
                 "choices": [{"index": 0, "finish_reason": finish_reason, "message": {"role": "assistant", **message}}],
                 "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}


@pytest.fixture
def loop():
    server_loop = ServerLoop("test-model-server")
    yield server_loop
    server_loop.stop()


def start(loop, answers, **config):
    endpoint = RecordingEndpoint(answers)
    endpoint_url = loop.start_app(endpoint.app)
    cfg = {"name": "policy_model", "base_url": endpoint_url + "/v1", "api_key": "k", "model": "policy",
           "return_token_id_information": True, "uses_reasoning_parser": True, **config}
    return endpoint, loop.start_app(make_app(cfg))


def post(url: str, body: dict, cookies: dict | None = None) -> tuple[int, dict, dict]:
    async def go():
        async with aiohttp.ClientSession() as http, http.post(url, json=body, cookies=cookies) as resp:
            return resp.status, await resp.json(), {k: m.value for k, m in resp.cookies.items()}
    return asyncio.run(go())


def test_multi_turn_input_becomes_chat_with_token_fields_on_the_assistant_turn(loop):
    endpoint, url = start(loop, [completion({"content": "Answer: 4", **TOKENS})])
    history = [
        {"role": "user", "content": "What is 2+2? Use the tool."},
        {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "need add"}]},
        {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "add", "arguments": '{"a": 2}',
         **TOKENS},
        {"type": "function_call_output", "call_id": "call_1", "output": '{"output": 4}'},
    ]
    tools = [{"type": "function", "name": "add", "parameters": {"type": "object"}, "strict": False}]
    status, response, _ = post(url + "/v1/responses", {"input": history, "tools": tools, "max_output_tokens": 9,
                                                       "temperature": 0.7})
    assert status == 200
    sent = endpoint.requests[0]
    assert sent["model"] == "policy" and sent["n"] == 1 and sent["max_tokens"] == 9 and sent["temperature"] == 0.7
    assert sent["tools"] == [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    _, assistant, tool = sent["messages"]
    assert assistant["content"] == "<think>need add</think>"
    assert assistant["tool_calls"][0]["function"] == {"name": "add", "arguments": '{"a": 2}'}
    assert {f: assistant[f] for f in TOKENS} == TOKENS  # carried unchanged for the splice
    assert tool == {"role": "tool", "tool_call_id": "call_1", "content": '{"output": 4}'}
    (message,) = response["output"]
    assert message["type"] == "message" and message["content"][0]["text"] == "Answer: 4"
    assert {f: message[f] for f in TOKENS} == TOKENS
    assert response["status"] == "completed" and response["usage"]["output_tokens"] == 2


def test_reasoning_and_tool_calls_become_items_with_tokens_on_the_last(loop):
    calls = [{"id": "call_a", "type": "function", "function": {"name": "f", "arguments": "{}"}},
             {"id": "call_b", "type": "function", "function": {"name": "g", "arguments": '{"x": 1}'}}]
    _, url = start(loop, [completion({"content": "<think>plan</think>", "tool_calls": calls, **TOKENS},
                                     "tool_calls")])
    _, response, _ = post(url + "/v1/responses", {"input": "hi"})
    kinds = [item["type"] for item in response["output"]]
    assert kinds == ["reasoning", "function_call", "function_call"]
    assert response["output"][0]["summary"][0]["text"] == "plan"
    assert [item["call_id"] for item in response["output"][1:]] == ["call_a", "call_b"]
    assert all(f not in item for item in response["output"][:-1] for f in TOKENS)
    assert {f: response["output"][-1][f] for f in TOKENS} == TOKENS


def test_length_cut_and_context_overflow_are_incomplete_not_errors(loop):
    overflow = (400, {"error": {"message": "the prompt has 9000 tokens but the model's context is 8192",
                                "type": "invalid_request_error", "code": "context_length_exceeded"}})
    _, url = start(loop, [completion({"content": "partial", **TOKENS}, "length"), overflow])
    _, cut, _ = post(url + "/v1/responses", {"input": "hi"})
    assert cut["status"] == "incomplete" and cut["incomplete_details"] == {"reason": "max_output_tokens"}
    status, overflowed, _ = post(url + "/v1/responses", {"input": "hi"})
    assert status == 200 and overflowed["incomplete_details"] == {"reason": "max_output_tokens"}


def test_upstream_errors_are_reported_not_raised(loop):
    _, url = start(loop, [(500, {"error": {"message": "engine crashed"}})])
    status, body, _ = post(url + "/v1/responses", {"input": "hi"})
    assert status == 502 and "engine crashed" in body["error"]["message"]
    status, body, _ = post(url + "/v1/responses", {"input": "hi", "bogus": 1})
    assert status == 422 and body["error"]["param"] == "bogus"
    status, body, _ = post(url + "/v1/responses", {"input": [{"type": "function_call", "call_id": "c", "name": "f",
                                                              "arguments": "{}", "prompt_token_ids": [1]}]})
    assert status == 422 and body["error"]["code"] == "partial_token_fields"


def test_sessions_stick_to_one_of_several_endpoints(loop):
    first, second = RecordingEndpoint([completion({"content": "a"})]), RecordingEndpoint([completion({"content": "b"})])
    urls = [loop.start_app(first.app) + "/v1", loop.start_app(second.app) + "/v1"]
    url = loop.start_app(make_app({"name": "pm", "base_url": urls, "model": "policy",
                                   "return_token_id_information": False}))
    expected = {}
    for i in range(12):
        sid = f"session-{i}"
        expected[sid] = "a" if pick_base_url(urls, sid) == urls[0] else "b"
        for _ in range(2):  # every call of a session goes to the same endpoint
            _, response, cookies = post(url + "/v1/responses", {"input": "hi"}, {"gymnb_session___pm": sid})
            assert response["output"][0]["content"][0]["text"] == expected[sid]
            assert cookies["gymnb_session___pm"] == sid
    assert set(expected.values()) == {"a", "b"}  # and sessions spread over both
    assert len(first.requests) + len(second.requests) == 24


def test_chat_shaped_history_is_accepted():
    messages = input_to_messages([
        {"role": "system", "content": "s"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "c", "type": "function",
                                                             "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c", "content": "out"}])
    assert [m["role"] for m in messages] == ["system", "assistant", "tool"]
    assert json.loads(messages[1]["tool_calls"][0]["function"]["arguments"]) == {}


def test_real_nemo_gym_rows_are_accepted_and_convert():
    """NeMo Gym's example rows (from its wheel): accepted as rows, and their tools/settings reach the chat request."""
    from nemo_gym_data import example_file

    from gymnb.core.responses import responses_to_chat
    from gymnb.gym.common import check_row

    math_rows = [json.loads(line) for line in example_file("math_with_judge").read_text().splitlines()]
    work_rows = [json.loads(line) for line in example_file("workplace_assistant").read_text().splitlines()]
    for row in math_rows + work_rows:
        check_row(row)
        body = responses_to_chat(row["responses_create_params"], model="m")
        assert [m["content"] for m in body["messages"]] == [m["content"] for m in row["responses_create_params"]["input"]]
    for row in work_rows:
        body = responses_to_chat(row["responses_create_params"], model="m")
        params = row["responses_create_params"]
        assert len(body["tools"]) == len(params["tools"]) == 27
        for chat_tool, tool in zip(body["tools"], params["tools"], strict=True):
            assert chat_tool == {"type": "function", "function": {"name": tool["name"],
                                                                  "description": tool["description"],
                                                                  "parameters": tool["parameters"]}}
        assert body["parallel_tool_calls"] is params["parallel_tool_calls"] and body["temperature"] == 1.0


def test_metadata_carries_seed_template_kwargs_and_extra_body(loop):
    endpoint, url = start(loop, [completion({"content": "ok", **TOKENS})], chat_template_kwargs={"enable_thinking": True})
    metadata = {"seed": "3", "chat_template_kwargs": '{"enable_thinking": false}',
                "extra_body": '{"seed": 17, "top_k": 5, "max_tokens": 1}'}
    status, _, _ = post(url + "/v1/responses", {"input": "hi", "metadata": metadata, "max_output_tokens": 4})
    sent = endpoint.requests[0]
    assert status == 200 and sent["seed"] == 17 and sent["top_k"] == 5
    assert sent["max_tokens"] == 4  # the request's own field wins over extra_body
    assert sent["chat_template_kwargs"] == {"enable_thinking": False}  # the row wins over the server config
    # Like real vllm_model, other metadata keys are not interpreted (a bare metadata.seed never reached vLLM).
    status, _, _ = post(url + "/v1/responses", {"input": "hi", "metadata": {"seed": "x"}})
    assert status == 200 and "seed" not in endpoint.requests[1]
    status, body, _ = post(url + "/v1/responses", {"input": "hi", "metadata": {"extra_body": "[1]"}})
    assert status == 422 and body["error"]["param"] == "metadata.extra_body"
