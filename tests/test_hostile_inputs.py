"""Hostile-input suite: generated requests (hypothesis over each server's request schema, valid and hostile
values mixed) against the policy server and every environment server.

The invariant, per request: the answer is a 2xx, or a 4xx with an OpenAI-style body (`error.message`, `type`,
`param`, `code`); never a 5xx; and a normal request right after it is served.
"""

from __future__ import annotations

import json
import urllib.request

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gymnb.core.models import load_model
from gymnb.gym import start_gym
from gymnb.gym.data import load_rows
from gymnb.policy.server import PolicyServer

SETTINGS = {"deadline": None, "derandomize": True,
            "suppress_health_check": [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]}
LONE_SURROGATES = st.sampled_from(["\ud800", "a\udfffb", "\udbff\ud800"])
EXTREME_INTS = st.sampled_from([-(2**63) - 1, -(2**31), -2, -1, 0, 2**31, 2**63, 2**64, 10**30])
SCALARS = (st.none() | st.booleans() | st.integers(-5, 300) | EXTREME_INTS | st.floats(allow_nan=True)
           | st.text(max_size=20) | LONE_SURROGATES)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)


def field(valid, hostile=JSON):
    """Mostly schema-valid values, often anything at all."""
    return st.one_of(valid, hostile)


TEXT = field(st.text(max_size=40), LONE_SURROGATES | JSON)
CONTENT_PART = st.fixed_dictionaries({"type": st.sampled_from(["text", "input_text", "image_url"]), "text": TEXT})
TOKEN_IDS = st.lists(st.integers(-1, 49160) | EXTREME_INTS, max_size=6)
MESSAGE = st.fixed_dictionaries(
    {"role": field(st.sampled_from(["system", "developer", "user", "assistant", "tool"]))},
    optional={"content": field(st.text(max_size=40) | st.lists(CONTENT_PART, max_size=2)),
              "tool_calls": field(st.lists(st.fixed_dictionaries({"function": st.fixed_dictionaries(
                  {"name": TEXT}, optional={"arguments": TEXT})}), max_size=2)),
              "prompt_token_ids": field(TOKEN_IDS), "generation_token_ids": field(TOKEN_IDS),
              "generation_log_probs": field(st.lists(st.floats(allow_nan=True), max_size=6)),
              "name": TEXT, "tool_call_id": TEXT})
TOOL = st.fixed_dictionaries({"type": field(st.just("function")), "function": field(st.fixed_dictionaries(
    {"name": TEXT}, optional={"parameters": JSON, "description": TEXT}))})
CHAT_BODY = st.fixed_dictionaries({"messages": field(st.lists(MESSAGE, min_size=1, max_size=4))}, optional={
    "model": field(st.just("tiny")), "temperature": field(st.floats(0, 2)), "top_p": field(st.floats(0, 1)),
    "top_k": field(st.integers(-1, 60000)), "n": field(st.integers(1, 3)), "max_tokens": field(st.integers(1, 4)),
    "max_completion_tokens": field(st.integers(1, 4)), "seed": field(st.integers()), "stop": field(
        st.text(min_size=1, max_size=4) | st.lists(st.text(min_size=1, max_size=4), max_size=3)),
    "logprobs": field(st.booleans()), "top_logprobs": field(st.integers(0, 21)), "ignore_eos": field(st.booleans()),
    "tools": field(st.lists(TOOL, max_size=2)), "tool_choice": field(st.sampled_from(["auto", "none"])),
    "chat_template_kwargs": field(st.dictionaries(st.sampled_from(
        ["enable_thinking", "chat_template", "tokenize", "documents", "x"]), JSON, max_size=2)),
    "required_prefix_token_ids": field(TOKEN_IDS), "presence_penalty": field(st.floats(-2, 2)),
    "stream": field(st.booleans())})
TOKENIZE_BODY = st.one_of(
    st.fixed_dictionaries({"prompt": TEXT}, optional={"add_special_tokens": JSON, "model": TEXT}),
    st.fixed_dictionaries({"messages": field(st.lists(MESSAGE, min_size=1, max_size=3))},
                          optional={"add_generation_prompt": field(st.booleans()), "tools": JSON,
                                    "chat_template_kwargs": JSON}),
    JSON)
OUTPUT_ITEM = field(st.fixed_dictionaries({"type": field(st.sampled_from(["message", "function_call", "reasoning"]))},
                                          optional={"content": field(st.lists(st.fixed_dictionaries(
                                              {"type": st.just("output_text"), "text": TEXT}), max_size=2)),
                                              "role": TEXT, "name": TEXT, "arguments": TEXT}))
ROW = st.fixed_dictionaries(
    {"responses_create_params": field(st.fixed_dictionaries({"input": field(st.text(max_size=30) | st.lists(
        st.fixed_dictionaries({"role": st.just("user"), "content": TEXT}), max_size=2))}, optional={
        "max_output_tokens": field(st.integers(1, 4)), "temperature": field(st.floats(0, 2)),
        "metadata": JSON}))},
    optional={"question": TEXT, "expected_answer": TEXT, "response": field(st.fixed_dictionaries(
        {"output": field(st.lists(OUTPUT_ITEM, max_size=3))})), "verify_responses": field(st.lists(JSON, max_size=3)),
        "ground_truth": JSON, "id": JSON, "category": JSON})


def send(url: str, body) -> tuple[int, object]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()  # NaN goes out as NaN, as JS can send
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def assert_2xx_or_openai_4xx(status: int, body) -> None:
    assert status < 500, body
    if status >= 400:
        error = body["error"]
        assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
        assert "param" in error and "code" in error


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    # A short context keeps every generated request cheap (n, max_tokens and ignore_eos are generated too).
    with PolicyServer.start(load_model(str(tiny_model_dir), max_model_len=64), model_id="tiny") as server:
        yield server


@pytest.fixture(scope="module")
def gym(policy):
    with start_gym(["math_with_judge", "workplace_assistant"], policy_base_url=policy.base_url,
                   policy_model_name="tiny") as gym:
        yield gym


def assert_policy_serves(policy) -> None:
    status, body = send(policy.url + "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                              "max_tokens": 1})
    assert status == 200 and len(body["choices"][0]["message"]["generation_token_ids"]) == 1


@settings(max_examples=100, **SETTINGS)
@given(body=CHAT_BODY)
def test_generated_chat_requests(policy, body):
    assert_2xx_or_openai_4xx(*send(policy.url + "/v1/chat/completions", body))
    assert_policy_serves(policy)


@settings(max_examples=60, **SETTINGS)
@given(path=st.sampled_from(["/tokenize", "/detokenize"]), body=TOKENIZE_BODY | st.fixed_dictionaries(
    {"tokens": field(TOKEN_IDS)}))
def test_generated_tokenize_requests(policy, path, body):
    assert_2xx_or_openai_4xx(*send(policy.url + path, body))
    assert_policy_serves(policy)


ENV_ROUTES = [("math_with_judge", "/seed_session"), ("math_with_judge", "/verify"),
              ("math_with_judge", "/aggregate_metrics"), ("workplace_assistant", "/seed_session"),
              ("workplace_assistant", "/verify"), ("workplace_assistant", "/aggregate_metrics"),
              ("workplace_assistant", "/company_directory_find_email_address"),
              ("math_with_judge_simple_agent", "/run"), ("math_with_judge_simple_agent", "/aggregate_metrics"),
              ("policy_model", "/v1/responses"), ("policy_model", "/v1/chat/completions")]


def assert_env_serves(gym) -> None:
    row = load_rows("math_with_judge", "validation", limit=1)[0]
    row["responses_create_params"]["max_output_tokens"] = 2
    status, result = send(gym.server_url("math_with_judge_simple_agent") + "/run", row)
    assert status == 200 and result["reward"] in (0.0, 1.0)


@settings(max_examples=200, **SETTINGS)
@given(route=st.sampled_from(ENV_ROUTES), body=ROW | JSON)
def test_generated_environment_requests(gym, route, body):
    instance, path = route
    assert_2xx_or_openai_4xx(*send(gym.server_url(instance) + path, body))
    with urllib.request.urlopen(gym.server_url(instance) + "/", timeout=30) as resp:
        assert json.loads(resp.read()) == {"status": "ok"}  # still answering (a full /run: test below)


PATHOLOGICAL = {"100,000 deep": b"[" * 100_000 + b"]" * 100_000, "lone surrogate": b'{"question": "\\ud800"}',
                "not UTF-8": b'{"question": "\xff"}', "not JSON": b"{", "not an object": b"[1, 2]",
                "output items not objects": json.dumps({
                    "responses_create_params": {"input": "q"}, "question": "q", "expected_answer": "1",
                    "response": {"output": [1, "x", None, {"type": "message", "content": 5}]}}).encode(),
                "output text not a string": json.dumps({
                    "responses_create_params": {"input": "q"}, "question": "q", "expected_answer": "1",
                    "response": {"output": [{"type": "message", "content": [{"text": 5}]}]}}).encode()}


@pytest.mark.parametrize("case", list(PATHOLOGICAL))
def test_pathological_bodies_on_every_environment_route(gym, case):
    """Refused by every route; a malformed `response` only by the routes that read it (/verify)."""
    for instance, path in ENV_ROUTES:
        if path.startswith("/company_directory"):
            continue  # a tool answers bad arguments with an error text (200), as NeMo Gym tools do
        status, body = send(gym.server_url(instance) + path, PATHOLOGICAL[case])
        assert_2xx_or_openai_4xx(status, body)
        if not case.startswith("output") or path == "/verify":
            assert 400 <= status < 500, (instance, path, body)
    assert_env_serves(gym)
