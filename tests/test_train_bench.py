"""`gymnb bench train` and `gymnb train` from the command line, on the scripted tiny model."""

from __future__ import annotations

import json

import pytest


def test_bench_train_splits_the_step_and_compares_with_the_floor(scripted_math_model, rows_file, tmp_path):
    from gymnb.bench.train import PHASES, main

    out = tmp_path / "train.json"
    argv = ["--config", "configs/train/grpo_math_cpu.yaml", "--steps", "2", "--out", str(out),
            f"model.name={scripted_math_model}", "model.threads=1", f"env.train_path={rows_file}",
            "env.validation_path=null", f"output_dir={tmp_path}", "generation.max_new_tokens=8",
            "grpo.num_prompts_per_step=2", "grpo.group_size=4", "grpo.drop_uniform_groups=false"]
    assert main(argv) == 0
    summary = json.loads(out.read_text())
    assert len(summary["steps"]) == 2
    mean = summary["mean"]
    assert mean["generation_s"] > 0 and mean["forward_backward_s"] > 0 and mean["optimizer_s"] > 0
    assert mean["floor_s"] > 0
    assert set(summary["ratio_to_floor"]) == {*PHASES, "step_s"}
    assert sum(summary["share_of_step"].values()) <= 1.0 + 1e-9  # the phases never exceed the step
    assert summary["config"]["validation"]["at_start"] is False  # benchmarks time steps, not validation
    assert len(summary["config_hash"]) == 12


def test_bench_train_summary_from_hand_measured_steps():
    from gymnb.bench.train import summarize

    step = {"step_s": 10.0, "floor_s": 2.0, "generation_s": 5.0, "environment_s": 1.0, "forward_backward_s": 3.0,
            "optimizer_s": 0.5, "refit_s": 0.5}
    slower = {**step, "step_s": 14.0, "generation_s": 9.0}
    no_batch = {**step, "step_s": 99.0, "floor_s": None}  # nothing to train on: not timed against the floor
    summary = summarize([step, slower, no_batch])
    assert summary["mean"]["step_s"] == 12.0 and summary["mean"]["generation_s"] == 7.0
    assert summary["share_of_step"]["generation_s"] == pytest.approx(7 / 12)
    assert summary["ratio_to_floor"] == pytest.approx({"step_s": 6.0, "generation_s": 3.5, "environment_s": 0.5,
                                                       "forward_backward_s": 1.5, "optimizer_s": 0.25,
                                                       "refit_s": 0.25})
    assert summarize([no_batch]) == {"steps": [no_batch], "mean": {}}


def test_train_cli_reports_config_errors_with_the_fix(tmp_path, capsys):
    from gymnb.cli import main

    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 1
    err = capsys.readouterr().err
    assert "missing.yaml not found" in err and "grpo_math_cpu" in err  # names the file and the configs there are
    assert main(["train", "--config", "configs/train/grpo_math_cpu.yaml", "grpo.num_prompts=4"]) == 1
    assert "'grpo.num_prompts'" in capsys.readouterr().err
