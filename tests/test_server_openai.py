"""The real `openai` client against a live server; the seed's "Full Endpoint Test" (validate-integration.md).

Tool calling needs a model that calls tools: a scripted tiny model (gymnb.policy.scripted) overfit so that greedy
decoding emits a `<tool_call>` and, after the tool result, a final answer. It is served like any model.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
import openai
import pytest

from gymnb.core.models import cache_dir, load_model
from gymnb.policy.scripted import make_scripted_model
from gymnb.policy.server import PolicyServer

ADD_TOOL = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers.",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}
QUESTION = [{"role": "user", "content": "What is 2 plus 3?"}]
TOOL_TURN = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
SCRIPT = {
    "messages": QUESTION,
    "tools": [ADD_TOOL],
    "completions": [TOOL_TURN, "The sum is 5."],
    "followups": [[{"role": "tool", "tool_call_id": "call_0", "content": "5"}]],
}


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with PolicyServer.start(load_model(str(tiny_model_dir), max_model_len=512), model_id="tiny") as server:
        yield server


@pytest.fixture(scope="module")
def scripted_server():
    model_dir = make_scripted_model(cache_dir() / "tiny" / "scripted-add-tool", [SCRIPT])
    with PolicyServer.start(str(model_dir), model_id="scripted", max_model_len=512) as server:
        yield server


def token_fields(message) -> dict:
    extra = message.model_extra
    return {k: extra[k] for k in ("prompt_token_ids", "generation_token_ids", "generation_log_probs")}


def test_openai_client_plain_chat(server):
    client = openai.OpenAI(base_url=server.base_url, api_key="unused")
    assert [m.id for m in client.models.list().data] == ["tiny"]
    resp = client.chat.completions.create(
        model="tiny", messages=QUESTION, max_tokens=6, temperature=0.5, seed=1, logprobs=True, top_logprobs=3
    )
    choice = resp.choices[0]
    fields = token_fields(choice.message)
    assert len(fields["generation_token_ids"]) == len(fields["generation_log_probs"]) == 6
    assert resp.usage.prompt_tokens == len(fields["prompt_token_ids"]) and resp.usage.completion_tokens == 6
    assert choice.finish_reason == "length"
    assert [t.logprob for t in choice.logprobs.content] == pytest.approx(fields["generation_log_probs"])
    assert all(
        len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob >= t.logprob for t in choice.logprobs.content
    )


def test_openai_client_tool_call_then_answer(scripted_server):
    client = openai.OpenAI(base_url=scripted_server.base_url, api_key="unused")
    first = client.chat.completions.create(
        model="scripted", messages=QUESTION, tools=[ADD_TOOL], temperature=0, max_tokens=60
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "add" and json.loads(call.function.arguments) == {"a": 2, "b": 3}
    assert choice.message.content is None
    # The client sends the assistant turn back unchanged, token fields included, then the tool result.
    assistant = choice.message.model_dump(exclude_none=True)
    messages = [*QUESTION, assistant, {"role": "tool", "tool_call_id": call.id, "content": "5"}]
    second = client.chat.completions.create(
        model="scripted", messages=messages, tools=[ADD_TOOL], temperature=0, max_tokens=60
    )
    answer = second.choices[0]
    assert answer.message.content == "The sum is 5." and answer.finish_reason == "stop"
    before, after = token_fields(choice.message), token_fields(answer.message)
    generated = before["prompt_token_ids"] + before["generation_token_ids"][:-1]  # trailing eos dropped
    assert after["prompt_token_ids"][: len(generated)] == generated


def test_openai_client_sees_400_and_404(server):
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=QUESTION, temperature=5)
    assert info.value.status_code == 400 and info.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="not-served", messages=QUESTION)
    assert client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=1).choices


async def full_endpoint_test(base_url: str) -> list[str]:
    """The seed's Full Endpoint Test: models, chat completions, tokenize (its steps and its assertions)."""
    passed = []
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base_url}/v1/models") as resp:
            assert resp.status == 200, f"Models endpoint failed: {resp.status}"
            data = await resp.json()
            assert "data" in data, "No models returned"
            passed.append("models")
        body = {
            "model": data["data"][0]["id"],
            "messages": [{"role": "user", "content": "Say 'test'"}],
            "max_tokens": 10,
        }
        async with session.post(f"{base_url}/v1/chat/completions", json=body) as resp:
            assert resp.status == 200, f"Chat completions failed: {resp.status}"
            result = await resp.json()
            assert "choices" in result, "No choices in response"
            passed.append("chat")
        async with session.post(f"{base_url}/tokenize", json={"prompt": "Hello world"}) as resp:
            assert resp.status == 200
            assert (await resp.json())["count"] > 0
            passed.append("tokenize")
    return passed


def test_seed_full_endpoint_test(server):
    assert asyncio.run(full_endpoint_test(server.url)) == ["models", "chat", "tokenize"]
