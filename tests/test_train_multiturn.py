"""A GRPO step on multi-turn tool-calling rollouts from the real workplace environment.

Reuses the rollout tests' scripted tiny model (look a colleague up, email them, confirm: three model calls with
tool outputs in between), so the model is trained once per machine for both suites.
"""

from __future__ import annotations

import json

import pytest
from scripted_workplace import scripted_workplace_model, workplace_rows

from gymnb.core.config import load_config
from gymnb.train.config import GRPOConfig


def test_grpo_step_trains_exactly_the_generated_tokens_of_every_call(tmp_path):
    from gymnb.train.grpo import train

    rows = workplace_rows()
    model_dir = scripted_workplace_model(rows)
    rows_file = tmp_path / "rows.jsonl"
    rows_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = {
        "run_name": "multiturn", "output_dir": str(tmp_path), "model.name": str(model_dir), "model.threads": 1,
        "env.name": "workplace_assistant", "env.train_path": str(rows_file), "env.validation_path": str(rows_file),
        "generation.temperature": 0.7, "generation.max_new_tokens": 64, "grpo.num_prompts_per_step": 1,
        "grpo.group_size": 4, "grpo.max_steps": 1, "grpo.drop_uniform_groups": False,
        "validation.at_start": False, "checkpoint.every_steps": 0, "checkpoint.save_final": False,
    }
    cfg = load_config(GRPOConfig, None, [f"{k}={v}" for k, v in overrides.items()])
    (step,) = train(cfg, progress=False).metrics

    assert step["train/num_samples"] == 4 and step["train/num_skipped_rollouts"] == 0
    assert step["train/model_calls_mean"] > 1  # tool calls happened: several model calls per rollout
    # the loss mask covers every generated token of every call, and nothing else
    generated = step["train/response_length_mean"] * step["train/num_samples"]
    assert step["train/num_trainable_tokens"] == pytest.approx(generated)
    # across tool outputs and re-rendered turns, the trainer still sees the server's distribution
    assert step["train/token_mult_prob_error"] == pytest.approx(1.0, abs=1e-3)
    assert step["validation/accuracy"] == 1.0  # greedy, the scripted calls are the ground truth
