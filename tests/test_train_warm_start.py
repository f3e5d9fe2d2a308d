"""Warm start: reference trajectories' loss masks, the fine-tuning step, and the HF directory it writes."""

from __future__ import annotations

import json
import re

import pytest
import torch

from gymnb.config import load_config
from gymnb.gym.workplace.compact import compact_rows
from gymnb.gym.workplace.data import make_rows, reference_solutions
from gymnb.gym.workplace.reference import replay_solution
from gymnb.gym.workplace.state import base_state
from gymnb.models import load_model, load_tokenizer, make_tiny_model
from gymnb.train.config import GRPOConfig
from gymnb.train.warm_start import FINAL_TEXT, build_trajectories, fine_tune, run_warm_start

ASSISTANT_TURN = re.compile(r"<\|im_start\|>assistant\n(.*?<\|im_end\|>)", re.DOTALL)


def sample(n: int):
    rows, solutions = make_rows("train", n), reference_solutions("train", n)
    return compact_rows(rows, "reference", solutions=solutions, num_distractors=1), solutions


def rendered_assistant_turns(tokenizer, row: dict, solution: list[list[dict]]) -> list[str]:
    """The oracle: the whole conversation rendered as text by the chat template, no token ids involved."""
    params = row["responses_create_params"]
    messages = [dict(m) for m in params["input"]]
    for turn, outputs in zip(solution, replay_solution(base_state(), solution)):
        calls = [{"type": "function", "function": {"name": c["name"], "arguments": json.loads(c["arguments"])}}
                 for c in turn]
        messages.append({"role": "assistant", "content": "", "tool_calls": calls})
        messages += [{"role": "tool", "content": text} for text in outputs]
    messages.append({"role": "assistant", "content": FINAL_TEXT})
    tools = [{"type": "function", "function": {k: v for k, v in t.items() if k not in ("type", "strict")}}
             for t in params["tools"]]
    return ASSISTANT_TURN.findall(tokenizer.apply_chat_template(messages, tools=tools, tokenize=False))


def masked_spans(trajectory) -> list[list[int]]:
    spans, current = [], []
    for token, masked in zip(trajectory.token_ids, trajectory.loss_mask):
        if masked:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    return spans + ([current] if current else [])


def test_loss_mask_covers_exactly_the_assistant_turns(tokenizer):
    rows, solutions = sample(10)  # one or two tasks of every category, one to three lookup turns
    for row, solution, trajectory in zip(rows, solutions, build_trajectories(tokenizer, rows, solutions)):
        decoded = [tokenizer.decode(span, skip_special_tokens=False) for span in masked_spans(trajectory)]
        assert decoded == rendered_assistant_turns(tokenizer, row, solution)
        assert len(decoded) == len(solution) + 1  # every lookup turn, the actions, the closing message
        # everything else (system prompt, tools, tool outputs, template glue) is unmasked context
        unmasked = tokenizer.decode([t for t, m in zip(trajectory.token_ids, trajectory.loss_mask) if not m])
        assert unmasked.count("<tool_response>") >= len(solution) and '<tool_call>\n{"name": "' not in unmasked


def test_fine_tuning_lowers_the_loss_on_a_tiny_dataset(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir), threads=1)
    for p in loaded.model.parameters():
        p.requires_grad_(True)
    rows, solutions = sample(3)
    trajectories = build_trajectories(loaded.tokenizer, rows, solutions)
    records = fine_tune(loaded.model, trajectories, lr=3e-3, epochs=6, batch_size=3, micro_batch_size=2,
                        pad_token_id=loaded.tokenizer.pad_token_id, progress=False)
    assert len(records) == 6 and all(r["num_tokens"] == sum(sum(t.loss_mask) for t in trajectories) for r in records)
    assert records[-1]["loss"] < 0.9 * records[0]["loss"]
    assert all(r["loss"] < records[0]["loss"] for r in records[1:])


def test_micro_batching_does_not_change_the_step(tiny_model_dir):
    rows, solutions = sample(2)
    grads = []
    for micro in (1, 2):
        loaded = load_model(str(tiny_model_dir), threads=1)
        for p in loaded.model.parameters():
            p.requires_grad_(True)
        trajectories = build_trajectories(loaded.tokenizer, rows, solutions)
        before = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
        fine_tune(loaded.model, trajectories, lr=1e-3, epochs=1, batch_size=2, micro_batch_size=micro,
                  pad_token_id=loaded.tokenizer.pad_token_id, progress=False)
        grads.append({n: p.detach() - before[n] for n, p in loaded.model.named_parameters()})
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])
    assert all(bool(g.abs().sum() > 0) for g in grads[0].values())  # every parameter trained


def test_written_directory_reloads_with_a_template_that_renders_tools(tmp_path):
    # A base whose own tokenizer template has no tools (as the cached SmolLM2 directory): the run's
    # model.chat_template is what the warm-start directory must carry.
    base = make_tiny_model(tmp_path / "base", chat_template=None)
    probe = [{"type": "function", "function": {"name": "probe_tool_name", "description": "", "parameters": {}}}]
    hi = [{"role": "user", "content": "hi"}]
    assert "probe_tool_name" not in load_tokenizer(str(base)).apply_chat_template(hi, tools=probe, tokenize=False)
    cfg = load_config(GRPOConfig, None, [
        f"model.name={base}", "model.chat_template=chatml_tools", "model.threads=1", "env.name=workplace_assistant",
        "env.tools=reference", "warm_start.num_trajectories=2", "warm_start.batch_size=2", f"output_dir={tmp_path}"])
    rows, _ = sample(2)
    out = run_warm_start(cfg, tmp_path / "run", rows, progress=False)
    reloaded = load_tokenizer(str(out))  # no chat_template given: the directory's own
    assert "probe_tool_name" in reloaded.apply_chat_template(hi, tools=probe, tokenize=False)
    summary = json.loads((tmp_path / "run" / "warm_start" / "warm_start.json").read_text())
    assert summary["num_trajectories"] == 2 and summary["num_steps"] == 1
    assert run_warm_start(cfg, tmp_path / "run", rows, progress=False) == out  # same settings: reused
    assert json.loads((out.parent / "warm_start.json").read_text())["total_s"] == summary["total_s"]


def test_warm_start_settings_are_checked_at_load_time():
    with pytest.raises(Exception, match="embedded workplace_assistant rows only"):
        load_config(GRPOConfig, None, ["env.name=math_with_judge", "warm_start.num_trajectories=4"])
    with pytest.raises(Exception, match="env.tools='some'"):
        load_config(GRPOConfig, None, ["env.name=workplace_assistant", "env.tools=some"])
    with pytest.raises(Exception, match="env.tools applies to workplace_assistant only"):
        load_config(GRPOConfig, None, ["env.name=math_with_judge", "env.tools=category"])
