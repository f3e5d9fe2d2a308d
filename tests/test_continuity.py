"""Continuity toolkit on constructed rollouts: real tokenizer and chat templates, one client fault per test."""

from __future__ import annotations

import json
import re

import pytest
import torch
from rollout_builders import (
    build_rollout,
    call_text,
    drop_eos_client,
    make_dropping_client,
    make_left_truncating_client,
    naive_client,
    splice_client,
    tool,
)

from gymnb.core.errors import ContinuityError
from gymnb.core.models import load_tokenizer
from gymnb.tokens.continuity import (
    audit_loss_mask,
    check_continuity,
    extract_trainable_turns,
    main,
    process_rollout_for_training,
)

TOOLS = [tool("email_send_email", recipient="Email address of the recipient", subject="Subject line")]
INPUT = [{"role": "system", "content": "You are a workplace assistant."}, {"role": "user", "content": "Email Ann."}]
ARGS = {"recipient": "ann@example.com", "subject": "Hi"}
ARGS_JSON = json.dumps(ARGS)


def split_ids(tokenizer, *pieces) -> list[int]:
    """Ids of `pieces` encoded one by one: the same text as their concatenation, a different tokenization."""
    return [i for piece in pieces for i in tokenizer.encode(piece, add_special_tokens=False)]


def tool_turn(text=None, **extra):
    turn = {"text": text or "I'll write.\n" + call_text("email_send_email", ARGS), "content": "I'll write.",
            "tool_calls": [("email_send_email", ARGS_JSON)], "tool_outputs": ['{"output": "Email sent"}']}
    return {**turn, **extra}


@pytest.fixture(scope="module")
def merge_ids(tokenizer):
    ids = split_ids(tokenizer, "Done. Sk", "in", "ny")
    assert ids != tokenizer.encode("Done. Skinny", add_special_tokens=False)  # the premise of the BPE case
    return ids


@pytest.fixture(scope="module")
def think_tokenizer(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir), chat_template="chatml_think")


def three_calls(merge_ids):
    """Tool call, then a generation whose ids are not the canonical tokenization, then one cut by max_tokens."""
    return [tool_turn(), {"text": "Done. Skinny", "gen_ids": merge_ids, "user_after": "Thanks!"},
            {"text": "You are welcome", "cut": True}]


def assert_first_mismatch(rollout, div):
    """The reported token index is exactly where the call's prompt stops continuing the previous call."""
    turns = extract_trainable_turns(rollout)
    expected = turns[div.model_call - 1]["prompt_token_ids"] + turns[div.model_call - 1]["generation_token_ids"]
    actual = turns[div.model_call]["prompt_token_ids"]
    i = div.token_index
    assert expected[:i] == actual[:i]
    assert i == len(actual) or expected[i] != actual[i]


def test_spliced_rollout_is_continuous_and_trains_on_exactly_the_generated_ids(tokenizer, merge_ids):
    rollout = build_rollout(tokenizer, INPUT, three_calls(merge_ids), tools=TOOLS, reward=1.0)
    result = check_continuity(rollout, tokenizer)
    assert result.ok and result.num_calls == 3 and result.divergence is None

    processed = process_rollout_for_training(rollout, tokenizer)
    log = processed["message_log"]
    assert [(m["role"], m["trainable"]) for m in log] == [
        ("user", False), ("assistant", True), ("tool", False), ("assistant", True), ("user", False),
        ("assistant", True)]
    turns = extract_trainable_turns(rollout)
    assert processed["input_ids"].tolist() == turns[-1]["prompt_token_ids"] + turns[-1]["generation_token_ids"]
    assert log[3]["token_ids"].tolist() == merge_ids + [tokenizer.eos_token_id]  # generated ids, not re-tokenized
    assert log[3]["token_ids"].dtype == torch.long
    assert torch.allclose(log[1]["generation_logprobs"], torch.tensor(turns[0]["generation_log_probs"]))
    assert "<tool_response>" in log[2]["content"]
    audit = audit_loss_mask(processed, rollout)
    assert audit["ok"], audit["problems"]
    assert audit["num_trainable_tokens"] == sum(len(t["generation_token_ids"]) for t in turns)
    assert processed["num_trainable_tokens"] == audit["num_trainable_tokens"]


def test_loss_mask_audit_catches_a_context_token_marked_trainable(tokenizer, merge_ids):
    rollout = build_rollout(tokenizer, INPUT, three_calls(merge_ids), tools=TOOLS)
    processed = process_rollout_for_training(rollout, tokenizer)
    processed["loss_mask"][0] = True
    audit = audit_loss_mask(processed, rollout)
    assert not audit["ok"]
    assert "trainable tokens but" in audit["problems"][0]


def test_bpe_merge(tokenizer, merge_ids):
    rollout = build_rollout(tokenizer, INPUT, three_calls(merge_ids), tools=TOOLS, client=naive_client)
    result = check_continuity(rollout, tokenizer, rollout_index=7)
    div = result.divergence
    assert not result.ok and div.kind == "bpe_merge"
    assert (div.model_call, div.rollout_index, div.in_generation) == (2, 7, True)
    assert_first_mismatch(rollout, div)
    assert "'in'|'ny'" in div.explanation and "Skinny" in div.expected_text
    assert "rollout 7: model call 2" in result.describe()
    with pytest.raises(ContinuityError, match="BPE merge"):
        process_rollout_for_training(rollout, tokenizer)


def test_whitespace(tokenizer):
    turns = [{"text": "The email is sent.  \n\n", "content": "The email is sent.", "user_after": "Thanks"},
             {"text": "Welcome"}]
    rollout = build_rollout(tokenizer, INPUT, turns, client=naive_client)
    div = check_continuity(rollout, tokenizer).divergence
    assert div.kind == "whitespace" and div.model_call == 1
    assert_first_mismatch(rollout, div)


@pytest.mark.parametrize("text", [
    call_text("email_send_email", ARGS, compact=True),  # JSON re-serialized with other separators
    "I'll write.\n\n" + call_text("email_send_email", ARGS),  # blank line before the tag re-rendered as one
])
def test_tool_call_rerender(tokenizer, text):
    rollout = build_rollout(tokenizer, INPUT, [tool_turn(text), {"text": "Sent."}], tools=TOOLS,
                            client=naive_client)
    div = check_continuity(rollout, tokenizer).divergence
    assert div.kind == "tool_call_rerender" and div.model_call == 1 and div.in_generation
    assert_first_mismatch(rollout, div)


def test_stripped_reasoning(think_tokenizer):
    turns = [{"text": "<think>Two and two.</think>The answer is 4.", "reasoning": "Two and two.",
              "content": "The answer is 4.", "user_after": "And 3+3?"}, {"text": "6"}]
    naive = build_rollout(think_tokenizer, [{"role": "user", "content": "2+2?"}], turns, client=naive_client)
    div = check_continuity(naive, think_tokenizer).divergence
    assert div.kind == "stripped_reasoning"
    assert "<think>" in div.expected_text and "<think>" not in div.actual_text
    assert_first_mismatch(naive, div)
    spliced = build_rollout(think_tokenizer, [{"role": "user", "content": "2+2?"}], turns, client=splice_client)
    assert check_continuity(spliced, think_tokenizer).ok  # counting eos tokens survives the stripped block


def test_dropped_separator(tokenizer):
    rollout = build_rollout(tokenizer, INPUT, [tool_turn(), {"text": "Sent."}], tools=TOOLS,
                            client=drop_eos_client)
    div = check_continuity(rollout, tokenizer).divergence
    assert div.kind == "dropped_separator"
    gen = extract_trainable_turns(rollout)[0]
    assert div.token_index == len(gen["prompt_token_ids"]) + len(gen["generation_token_ids"]) - 1
    assert "<|im_end|>" in div.explanation


@pytest.mark.parametrize("client", [
    make_dropping_client(3),  # old turns dropped from the conversation
    make_left_truncating_client(150),  # prompt cut on the left to fit a context limit
    lambda tok, prompt, gen, messages, tools: (prompt + gen)[:len(prompt) + 2],  # prompt shorter than history
], ids=["dropped-turns", "left-cut", "right-cut"])
def test_truncated_history(tokenizer, merge_ids, client):
    turns = [tool_turn(), {"text": "Done. Skinny", "user_after": "Thanks!"}, {"text": "Bye"}]
    rollout = build_rollout(tokenizer, INPUT, turns, tools=TOOLS, client=client)
    div = check_continuity(rollout, tokenizer).divergence
    assert div.kind == "truncated_history"
    assert_first_mismatch(rollout, div)


def test_other_change_in_history(tokenizer):
    def corrupt(tok, prompt, gen, messages, tools):
        ids = splice_client(tok, prompt, gen, messages, tools)
        ids[5] += 1  # one changed token inside the system prompt
        return ids
    rollout = build_rollout(tokenizer, INPUT, [tool_turn(), {"text": "Sent."}], tools=TOOLS, client=corrupt)
    div = check_continuity(rollout, tokenizer).divergence
    assert div.kind == "other" and div.token_index == 5 and not div.in_generation


def test_without_tokenizer_locates_but_does_not_decode(tokenizer, merge_ids):
    rollout = build_rollout(tokenizer, INPUT, three_calls(merge_ids), tools=TOOLS, client=naive_client)
    div = check_continuity(rollout).divergence
    assert div.kind == "other" and div.expected_text is None and div.model_call == 2
    assert_first_mismatch(rollout, div)


@pytest.mark.parametrize("mutate, message, kind", [
    (lambda r: r["response"]["output"][-1].pop("generation_log_probs"), "but not \\['generation_log_probs'\\]",
     "malformed_token_fields"),
    (lambda r: r["response"]["output"][-1]["generation_log_probs"].pop(), "generation_log_probs",
     "malformed_token_fields"),
    (lambda r: [r["response"]["output"][-1].pop(f) for f in ("prompt_token_ids", "generation_token_ids",
                                                              "generation_log_probs")],
     "no output item carries token fields", "missing_token_fields"),
    (lambda r: r.pop("response"), "is this a NeMo Gym /run result", "not_a_rollout"),
])
def test_structural_problems_are_reported_not_raised(tokenizer, mutate, message, kind):
    rollout = build_rollout(tokenizer, INPUT, [{"text": "Hello"}])
    mutate(rollout)
    result = check_continuity(rollout, tokenizer)
    assert not result.ok and result.divergence is None
    assert re.search(message, result.problem) and result.problem_kind == kind


def test_a_model_call_that_lost_its_token_fields_is_a_problem(tokenizer, merge_ids):
    rollout = build_rollout(tokenizer, INPUT, three_calls(merge_ids), tools=TOOLS)
    carriers = [item for item in rollout["response"]["output"] if "generation_token_ids" in item]
    for name in ("prompt_token_ids", "generation_token_ids", "generation_log_probs"):
        carriers[1].pop(name)  # call 1 (the middle one) now looks like context to a trainer
    result = check_continuity(rollout, tokenizer)
    assert not result.ok and "carry no token fields" in result.problem
    with pytest.raises(ContinuityError, match="carry no token fields"):
        process_rollout_for_training(rollout, tokenizer)


def test_check_continuity_cli(tokenizer, merge_ids, tmp_path, capsys):
    good = build_rollout(tokenizer, INPUT, three_calls(merge_ids), tools=TOOLS)
    bad = build_rollout(tokenizer, INPUT, three_calls(merge_ids), tools=TOOLS, client=naive_client)
    path = tmp_path / "rollouts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [good, bad, good]) + "\n")
    tok_dir = tokenizer.name_or_path
    assert main([str(path), "--tokenizer", tok_dir, "--json", str(tmp_path / "s.json")]) == 1
    out = capsys.readouterr().out
    assert "3 rollouts, 3 multi-turn: 2 continuous, 1 broken" in out
    assert "rollout 1: model call 2, token" in out and "BPE merge" in out
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["kinds"] == {"bpe_merge": 1} and summary["broken"][0]["rollout_index"] == 1

    path.write_text(json.dumps(good) + "\n")
    assert main([str(path), "--tokenizer", tok_dir]) == 0


def test_check_continuity_cli_names_a_bad_line(tmp_path, capsys):
    from gymnb.cli import main as gymnb_main

    path = tmp_path / "bad.jsonl"
    path.write_text('{"response": {"output": []}}\nnot json\n')
    assert gymnb_main(["check-continuity", str(path)]) == 1
    assert f"{path}:2: not valid JSON" in capsys.readouterr().err


@pytest.mark.parametrize("make, message", [
    (lambda d: d, "is a directory: pass the rollouts JSONL file inside it"),
    (lambda d: (d / "model.bin").write_bytes(b"\x80\x81\xfe\xff" * 64) and d / "model.bin", "is not a text file"),
    (lambda d: (d / "empty.jsonl").write_text("") or d / "empty.jsonl", "holds no rollouts (empty file)"),
])
def test_check_continuity_cli_refuses_what_is_not_a_rollouts_file(tmp_path, capsys, make, message):
    from gymnb.cli import main as gymnb_main

    path = make(tmp_path)
    assert gymnb_main(["check-continuity", str(path)]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_check_continuity_cli_fails_when_nothing_multi_turn_was_checked(tokenizer, tmp_path, capsys):
    single = build_rollout(tokenizer, INPUT, [{"text": "Done."}])
    path = tmp_path / "single.jsonl"
    path.write_text(json.dumps(single) + "\n")
    assert main([str(path), "--tokenizer", tokenizer.name_or_path]) == 1
    captured = capsys.readouterr()
    assert "1 rollouts, 0 multi-turn" in captured.out
    assert "nothing was checked: none of the 1 rollouts has two or more model calls" in captured.err


def test_a_broken_rollout_shows_the_token_split_and_names_both_sides_as_suspects(tokenizer, merge_ids):
    """Both sides of a BPE merge decode to the same text, so the pieces are what tells them apart; a rollout
    alone cannot say whether its client dropped the token fields or the server ignored them."""
    rollout = build_rollout(tokenizer, INPUT, three_calls(merge_ids), tools=TOOLS, client=naive_client)
    text = check_continuity(rollout, tokenizer).describe()
    assert "expected: " in text and "' Sk'|['in']|'ny'" in text and "' Sk'|['inn']|'y'" in text
    assert "Either the client re-sent the earlier assistant turn without its token fields, or the server" in text
    assert "protocol.md section" not in text and "docs/protocol.md" in text


def test_a_probe_that_sent_its_token_fields_blames_the_server(tokenizer, merge_ids):
    rollout = build_rollout(tokenizer, INPUT, three_calls(merge_ids), tools=TOOLS, client=naive_client)
    probe = {**rollout, "probe": "splice_bpe", "sent_token_fields": True}
    fix = check_continuity(probe, tokenizer).divergence.fix
    assert fix.startswith("Server at fault") and "ignored them" in fix

