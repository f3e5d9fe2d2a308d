"""Warm start: reference trajectories' loss masks, the fine-tuning step, and the HF directory it writes."""

from __future__ import annotations

import json
import re

import pytest
import torch

from gymnb.core.config import load_config
from gymnb.core.models import load_model, load_tokenizer, make_tiny_model
from gymnb.gym.workplace.compact import compact_rows
from gymnb.gym.workplace.company import base_state
from gymnb.gym.workplace.data import make_rows, reference_solutions
from gymnb.gym.workplace.reference import replay_solution
from gymnb.train.config import GRPOConfig
from gymnb.train.warm_start import FINAL_TEXT, build_trajectories, fine_tune, run_warm_start

# A ChatML template without tools, like SmolLM2's own.
PLAIN_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
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


def test_micro_batching_does_not_change_the_gradient(tiny_model_dir):
    from gymnb.train.batching import Sequence, TrainBatch, iter_micro_batches
    from gymnb.train.warm_start import sft_loss

    loaded = load_model(str(tiny_model_dir), threads=1)
    rows, solutions = sample(3)
    trajectories = build_trajectories(loaded.tokenizer, rows, solutions)  # different lengths: padding matters
    batch = TrainBatch([Sequence(t.token_ids, t.loss_mask, [0.0] * len(t.token_ids), 0.0, i)
                        for i, t in enumerate(trajectories)], torch.zeros(3))
    grads = []
    for micro in (1, 3):
        loaded.model.zero_grad()
        for micro_batch in iter_micro_batches(batch, micro, loaded.tokenizer.pad_token_id):
            sft_loss(loaded.model, micro_batch, batch.num_trainable_tokens).backward()
        grads.append({n: p.grad.clone() for n, p in loaded.model.named_parameters()})
    assert all(torch.allclose(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-7) for n in grads[0])
    assert all(bool(g.abs().sum() > 0) for g in grads[0].values())  # every parameter gets a gradient


def test_written_directory_reloads_with_a_template_that_renders_tools(tmp_path):
    # A base whose own tokenizer template has no tools (as the cached SmolLM2 directory): the run's
    # model.chat_template is what the warm-start directory must carry.
    base = make_tiny_model(tmp_path / "base")
    (base / "chat_template.jinja").write_text(PLAIN_TEMPLATE)
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


def test_training_config_compacts_train_and_validation_rows():
    from gymnb.train.grpo import load_data

    cfg = load_config(GRPOConfig, None, ["env.name=workplace_assistant", "env.tools=reference",
                                         "env.num_distractor_tools=2", "env.train_limit=5", "env.validation_limit=5"])
    train_rows, val_rows = load_data(cfg)
    solutions = reference_solutions("train", 5)
    for rows in (train_rows, val_rows):
        assert len(rows) == 5 and all(r["tools_subset"]["mode"] == "reference" for r in rows)
    for row, solution in zip(train_rows, solutions):
        names = {t["name"] for t in row["responses_create_params"]["tools"]}
        assert len(names) == len({c["name"] for turn in solution for c in turn}) + 2
    plain, _ = load_data(load_config(GRPOConfig, None, ["env.name=workplace_assistant", "env.train_limit=1"]))
    assert "tools_subset" not in plain[0] and len(plain[0]["responses_create_params"]["tools"]) == 27


def test_a_workplace_run_on_a_directory_without_a_tool_template_fails_with_the_remedy(tmp_path):
    from gymnb.core.errors import TrainingError
    from gymnb.train.grpo import train

    base = make_tiny_model(tmp_path / "base")
    (base / "chat_template.jinja").write_text(PLAIN_TEMPLATE)
    cfg = load_config(GRPOConfig, None, [f"model.name={base}", "env.name=workplace_assistant", "grpo.max_steps=0",
                                         f"output_dir={tmp_path}", "env.validation_limit=1"])
    with pytest.raises(TrainingError, match="set model.chat_template"):
        train(cfg, progress=False)
