"""Drift audit: naive re-rendering of constructed rollouts vs the ids the model generated."""

from __future__ import annotations

import json

import pytest
from rollout_builders import build_rollout, call_text, tool

from gymnb.core.models import load_tokenizer
from gymnb.tokens.drift import audit_drift, rollout_conversation

TOOLS = [tool("email_send_email", recipient="Email address of the recipient", subject="Subject line")]
INPUT = [{"role": "system", "content": "You are a workplace assistant."}, {"role": "user", "content": "Email Ann."}]
ARGS = {"recipient": "ann@example.com", "subject": "Hi"}


def tool_turn(text):
    return {"text": text, "content": "", "tool_calls": [("email_send_email", json.dumps(ARGS))],
            "tool_outputs": ['{"output": "Email sent"}']}


def test_canonical_rollout_has_no_drift(tokenizer):
    """Text that round-trips exactly: the rebuilt conversation renders to the very ids that were sampled."""
    turns = [tool_turn(call_text("email_send_email", ARGS)), {"text": "Sent it.", "user_after": "Thanks"},
             {"text": "Welcome", "cut": True}]
    rollout = build_rollout(tokenizer, INPUT, turns, tools=TOOLS)
    report = audit_drift([rollout], tokenizer).to_dict()
    assert report["num_calls"] == 3 and report["num_calls_drifted"] == 0
    assert report["num_rollouts_drifted"] == 0 and report["off_policy_tokens"] == 0
    assert report["generated_tokens"] > 0


def test_drift_counts_kinds_and_off_policy_tokens(tokenizer):
    merged = [i for p in ("Done. Sk", "in", "ny") for i in tokenizer.encode(p, add_special_tokens=False)]
    turns = [tool_turn(call_text("email_send_email", ARGS)),  # round-trips
             tool_turn(call_text("email_send_email", ARGS, compact=True)),  # tool call re-rendered
             {"text": "Done. Skinny", "gen_ids": merged}]  # BPE merge
    rollout = build_rollout(tokenizer, INPUT, turns, tools=TOOLS)
    drift = audit_drift([rollout], tokenizer)
    report = drift.to_dict()
    assert report["call_kinds"] == {"tool_call_rerender": 1, "bpe_merge": 1}
    assert [d.kind if d else None for d in drift.rollouts[0].call_divergences] == [
        None, "tool_call_rerender", "bpe_merge"]
    # the whole conversation first leaves the sampled ids inside call 1's tool call: every generated token
    # from there on is trained at a shifted position or with other ids
    full = drift.rollouts[0].full_divergence
    assert full.kind == "tool_call_rerender"
    gens = [item for item in rollout["response"]["output"] if "generation_token_ids" in item]
    call1_start = len(gens[1]["prompt_token_ids"])
    expected_off = (call1_start + len(gens[1]["generation_token_ids"]) - full.token_index
                    + len(gens[2]["generation_token_ids"]))
    assert report["off_policy_tokens"] == expected_off
    assert report["generated_tokens"] == sum(len(g["generation_token_ids"]) for g in gens)
    assert "1/1 rollouts and 2/3 model calls would go off-policy" in drift.describe()


def test_reasoning_stripped_from_history_is_a_whole_conversation_drift(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir), chat_template="chatml_think")
    turns = [{"text": "<think>Two and two.</think>The answer is 4.", "reasoning": "Two and two.",
              "content": "The answer is 4.", "user_after": "And 3+3?"}, {"text": "6"}]
    rollout = build_rollout(tokenizer, [{"role": "user", "content": "2+2?"}], turns)
    report = audit_drift([rollout], tokenizer).to_dict()
    assert report["num_calls_drifted"] == 0  # each generation alone re-renders fine...
    assert report["rollout_kinds"] == {"stripped_reasoning": 1}  # ...but the template drops it from history
    assert report["off_policy_share"] == pytest.approx(1.0)


def test_rollout_conversation_rebuilds_chat_messages(tokenizer):
    turns = [tool_turn(call_text("email_send_email", ARGS)),
             {"text": "<think>ok</think>Sent.", "reasoning": "ok", "content": "Sent."}]
    rollout = build_rollout(tokenizer, INPUT, turns, tools=TOOLS)
    messages, tools, call_messages = rollout_conversation(rollout)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert call_messages == [2, 4]
    assert messages[2]["tool_calls"][0]["function"] == {"name": "email_send_email", "arguments": json.dumps(ARGS)}
    assert messages[3] == {"role": "tool", "tool_call_id": "call_0", "content": '{"output": "Email sent"}'}
    assert messages[4]["content"] == "<think>ok</think>Sent."
    assert tools[0]["function"]["name"] == "email_send_email"
