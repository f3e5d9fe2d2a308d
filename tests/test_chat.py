"""Tool calls: parsing model output, template-render -> parse round trip; both tool shapes render alike."""

from __future__ import annotations

import json

from gymnb.policy.chat import parse_tool_calls, parse_tools
from gymnb.policy.splice import build_prompt_ids

ADD_TOOL = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers.",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}},
    },
}


def test_parse_tool_calls_splits_content_and_calls():
    text = (
        'Let me add.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
        '<tool_call>{"name": "note", "arguments": "{\\"text\\": \\"hi\\"}"}</tool_call>'
    )
    content, calls = parse_tool_calls(text)
    assert content == "Let me add."
    assert [c["function"]["name"] for c in calls] == ["add", "note"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"a": 1, "b": 2}
    assert json.loads(calls[1]["function"]["arguments"]) == {"text": "hi"}
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert len({c["id"] for c in calls}) == 2


def test_malformed_or_unclosed_tool_calls_stay_text():
    for text in [
        "<tool_call>{not json}</tool_call>",
        '<tool_call>{"arguments": {}}</tool_call>',
        '<tool_call>{"name": "add", "arguments": {"a": 1}',
        "plain answer",
    ]:
        assert parse_tool_calls(text) == (text, [])


def test_render_then_parse_round_trip(tokenizer):
    calls = [
        {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}},
        {"id": "call_2", "type": "function", "function": {"name": "add", "arguments": {"a": 5, "b": -3}}},
    ]
    messages = [
        {"role": "user", "content": "Add things"},
        {"role": "assistant", "content": "Adding now.", "tool_calls": calls},
    ]
    text = tokenizer.apply_chat_template(messages, tools=[ADD_TOOL], tokenize=False)
    assistant_text = text.split("<|im_start|>assistant\n")[-1].removesuffix("<|im_end|>\n")
    content, parsed = parse_tool_calls(assistant_text)
    assert content == "Adding now."
    assert [p["function"]["name"] for p in parsed] == ["add", "add"]
    assert [json.loads(p["function"]["arguments"]) for p in parsed] == [{"a": 1, "b": 2}, {"a": 5, "b": -3}]


def test_chat_and_responses_tool_shapes_render_the_same(tokenizer):
    flat = {
        "type": "function",
        "name": "add",
        "description": "Add two integers.",
        "parameters": ADD_TOOL["function"]["parameters"],
        "strict": False,
    }
    messages = [{"role": "user", "content": "1+2?"}]
    chat_ids = build_prompt_ids(tokenizer, messages, parse_tools([ADD_TOOL]))
    flat_ids = build_prompt_ids(tokenizer, messages, parse_tools([flat]))
    assert chat_ids == flat_ids
    rendered = tokenizer.decode(chat_ids)
    assert '"name": "add"' in rendered and "<tools>" in rendered
