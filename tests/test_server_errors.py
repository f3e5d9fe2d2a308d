"""Every client fault gets its OpenAI-style 4xx, names the field, and leaves the server answering."""

from __future__ import annotations

import urllib.request

import pytest
from test_server import post

from gymnb.core.models import load_model
from gymnb.policy.server import PolicyServer

USER = [{"role": "user", "content": "hi"}]
TURN = {
    "role": "assistant",
    "content": "ok",
    "prompt_token_ids": [1, 2],
    "generation_token_ids": [3, 4],
    "generation_log_probs": [-0.1, -0.2],
}

BAD_CHAT_BODIES = {
    "malformed json": (b'{"messages": [', 400, None),
    "body not an object": ([1, 2], 400, None),
    "missing messages": ({"model": "tiny"}, 400, "messages"),
    "empty messages": ({"messages": []}, 400, "messages"),
    "messages not a list": ({"messages": "hi"}, 400, "messages"),
    "unknown model": ({"model": "gpt-9", "messages": USER}, 404, "model"),
    "unknown role": ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    "message not an object": ({"messages": ["hi"]}, 400, "messages[0]"),
    "content wrong type": ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    "user content missing": ({"messages": [{"role": "user"}]}, 400, "messages[0].content"),
    "image content part": (
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        400,
        "messages[0].content",
    ),
    "temperature wrong type": ({"messages": USER, "temperature": "hot"}, 400, "temperature"),
    "temperature negative": ({"messages": USER, "temperature": -0.5}, 400, "temperature"),
    "temperature too high": ({"messages": USER, "temperature": 2.5}, 400, "temperature"),
    "top_p zero": ({"messages": USER, "top_p": 0}, 400, "top_p"),
    "top_p above one": ({"messages": USER, "top_p": 1.5}, 400, "top_p"),
    "top_k below -1": ({"messages": USER, "top_k": -2}, 400, "top_k"),
    "n zero": ({"messages": USER, "n": 0}, 400, "n"),
    "n float": ({"messages": USER, "n": 1.5}, 400, "n"),
    "max_tokens zero": ({"messages": USER, "max_tokens": 0}, 400, "max_tokens"),
    "max_tokens string": ({"messages": USER, "max_tokens": "10"}, 400, "max_tokens"),
    "max_tokens bool": ({"messages": USER, "max_tokens": True}, 400, "max_tokens"),
    "seed string": ({"messages": USER, "seed": "x"}, 400, "seed"),
    "stop wrong type": ({"messages": USER, "stop": 5}, 400, "stop"),
    "logprobs not bool": ({"messages": USER, "logprobs": "yes"}, 400, "logprobs"),
    "top_logprobs too many": ({"messages": USER, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    "top_logprobs without logprobs": ({"messages": USER, "top_logprobs": 2}, 400, "top_logprobs"),
    "presence penalty": ({"messages": USER, "presence_penalty": 0.5}, 400, "presence_penalty"),
    "stream": ({"messages": USER, "stream": True}, 400, "stream"),
    "tools not a list": ({"messages": USER, "tools": {"name": "f"}}, 400, "tools"),
    "tool without name": (
        {"messages": USER, "tools": [{"type": "function", "function": {}}]},
        400,
        "tools[0]",
    ),
    "history tool call without name": (
        {"messages": [*USER, {"role": "assistant", "content": None, "tool_calls": [{"function": {}}]}]},
        400,
        "messages[1].tool_calls[0]",
    ),
    "token fields partial": (
        {"messages": [*USER, {"role": "assistant", "content": "ok", "generation_token_ids": [3]}, *USER]},
        400,
        "messages[1].prompt_token_ids",
    ),
    "token fields length mismatch": (
        {"messages": [*USER, {**TURN, "generation_log_probs": [-0.1]}, *USER]},
        400,
        "messages[1].generation_log_probs",
    ),
    "token id out of vocabulary": (
        {"messages": [*USER, {**TURN, "generation_token_ids": [3, 10**6]}, *USER]},
        400,
        "messages[1].generation_token_ids",
    ),
    "negative token id": (
        {"messages": [*USER, {**TURN, "prompt_token_ids": [-1]}, *USER]},
        400,
        "messages[1].prompt_token_ids",
    ),
    "token id not an int": (
        {"messages": [*USER, {**TURN, "prompt_token_ids": ["a"]}, *USER]},
        400,
        "messages[1].prompt_token_ids",
    ),
    "log-probs not numbers": (
        {"messages": [*USER, {**TURN, "generation_log_probs": ["a", "b"]}, *USER]},
        400,
        "messages[1].generation_log_probs",
    ),
    "token fields on a user message": ({"messages": [{**TURN, "role": "user"}]}, 400, "messages[0].role"),
    "required prefix out of vocabulary": (
        {"messages": [*USER, TURN, *USER], "required_prefix_token_ids": [10**6]},
        400,
        "required_prefix_token_ids",
    ),
    "required prefix without assistant": (
        {"messages": USER, "required_prefix_token_ids": [1, 2]},
        400,
        "required_prefix_token_ids",
    ),
    "prompt longer than context": (
        {"messages": [{"role": "user", "content": "hello " * 300}]},
        400,
        "messages",
    ),
    "prefix longer than context": (
        {"messages": [*USER, {**TURN, "prompt_token_ids": [5] * 300}, *USER]},
        400,
        "messages",
    ),
}


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with PolicyServer.start(load_model(str(tiny_model_dir), max_model_len=256), model_id="tiny") as server:
        yield server


def assert_still_serving(server) -> None:
    status, resp = post(server.url + "/v1/chat/completions", {"messages": USER, "max_tokens": 1})
    assert status == 200 and len(resp["choices"][0]["message"]["generation_token_ids"]) == 1


@pytest.mark.parametrize("case", list(BAD_CHAT_BODIES))
def test_bad_chat_request_gets_its_4xx(server, case):
    body, status, param = BAD_CHAT_BODIES[case]
    got, resp = post(server.url + "/v1/chat/completions", body)
    assert got == status, resp
    error = resp["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param
    assert_still_serving(server)


def test_context_errors_say_so(server):
    _, resp = post(server.url + "/v1/chat/completions", BAD_CHAT_BODIES["prompt longer than context"][0])
    assert resp["error"]["code"] == "context_length_exceeded" and "256" in resp["error"]["message"]


def test_max_tokens_is_clamped_to_the_context_left(server):
    content = "hello " * 100
    status, resp = post(
        server.url + "/v1/chat/completions",
        {"messages": [{"role": "user", "content": content}], "max_tokens": 10_000, "temperature": 0},
    )
    assert status == 200
    message = resp["choices"][0]["message"]
    assert len(message["prompt_token_ids"]) + len(message["generation_token_ids"]) <= 256


@pytest.mark.parametrize(
    "path,body,status",
    [
        ("/tokenize", {"model": "tiny"}, 400),
        ("/tokenize", {"prompt": "hi", "model": "other"}, 404),
        ("/tokenize", {"messages": [{"role": "robot", "content": "x"}]}, 400),
        ("/tokenize", b"not json", 400),
        ("/detokenize", {"tokens": [10**7]}, 400),
        ("/detokenize", {"tokens": "abc"}, 400),
        ("/v1/completions", {"prompt": "hi"}, 404),
    ],
)
def test_bad_tokenize_and_routes(server, path, body, status):
    got, resp = post(server.url + path, body)
    assert got == status and resp["error"]["message"]
    assert_still_serving(server)


def test_wrong_method_is_405(server):
    request = urllib.request.Request(server.url + "/v1/chat/completions", method="GET")
    try:
        urllib.request.urlopen(request, timeout=10)
        raise AssertionError("GET on a POST route answered 200")
    except urllib.error.HTTPError as exc:
        assert exc.code == 405


def test_api_key_is_enforced(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir), max_model_len=256)
    with PolicyServer.start(loaded, model_id="tiny", api_key="sekret") as server:
        for key in (None, "wrong"):
            status, resp = post(server.url + "/v1/chat/completions", {"messages": USER, "max_tokens": 1}, key)
            assert status == 401 and resp["error"]["code"] == "invalid_api_key"
            assert post(server.url + "/tokenize", {"prompt": "hi"}, key)[0] == 401
        status, resp = post(
            server.url + "/v1/chat/completions", {"messages": USER, "max_tokens": 1}, "sekret"
        )
        assert status == 200
        with urllib.request.urlopen(server.url + "/health", timeout=10) as resp:
            assert resp.status == 200  # liveness probes need no key
