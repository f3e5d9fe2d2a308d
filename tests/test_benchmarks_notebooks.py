"""The benchmark notebooks through papermill on a smoke scale: mode `run`, then mode `external` on that run.

Slow tier: a kernel per notebook, a real (scripted tiny) model, the real servers and environments.
"""

from __future__ import annotations

import json

import pytest
from scripted_math import QUESTIONS

from gymnb.core.config import REPO_ROOT

NOTEBOOKS = REPO_ROOT / "notebooks" / "benchmarks"
pytestmark = pytest.mark.slow


def execute(notebook: str, out_dir, **parameters) -> dict:
    import papermill

    out_dir.mkdir(parents=True, exist_ok=True)
    papermill.execute_notebook(str(NOTEBOOKS / notebook), str(out_dir / "executed.ipynb"),
                               parameters={"output_dir": str(out_dir), **parameters}, kernel_name="python3",
                               progress_bar=False, cwd=str(REPO_ROOT))
    return json.loads((out_dir / "results.json").read_text())


def mean_reward(path) -> float:
    rewards = [json.loads(line)["reward"] for line in path.read_text().splitlines() if line.strip()]
    return sum(rewards) / len(rewards)


def test_math_notebook_runs_training_then_scores_it_as_an_external_run(scripted_math_model, rows_file, tmp_path):
    overrides = [f"model.name={scripted_math_model}", "model.threads=1", f"env.train_path={rows_file}",
                 f"env.validation_path={rows_file}", f"output_dir={tmp_path / 'train'}", "run_name=smoke",
                 "generation.max_new_tokens=8", "grpo.num_prompts_per_step=2", "grpo.max_steps=2",
                 "grpo.drop_uniform_groups=false", "optimizer.lr=1e-3", "checkpoint.every_steps=0"]
    run = execute("math_dapo17k_aime24.ipynb", tmp_path / "run", mode="run", scale="cpu", overrides=overrides)
    run_dir = tmp_path / "train" / "smoke"
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert run["mode"] == "run" and run["num_steps"] == 2
    assert [(p["step"], p["accuracy"]) for p in run["validation"]] == [
        (m["step"], m["validation/accuracy"]) for m in logged if "validation/accuracy" in m]
    assert run["median_token_mult_prob_error"] == pytest.approx(1.0, abs=1e-3)
    checks = {c["name"]: c for c in run["verdict"]["checks"]}
    assert checks["median token_mult_prob_error"]["status"] == "met"
    # the gain is the run's own validation files, read here without gymnb: after minus before, same prompts
    before = mean_reward(run_dir / "validation" / "step_000000.jsonl")
    after = mean_reward(run_dir / "validation" / "step_000002.jsonl")
    improvement = checks["validation improvement (95% interval above 0)"]
    assert improvement["value"] == pytest.approx(after - before)
    assert improvement["interval"]["num_prompts"] == len(QUESTIONS)
    assert (tmp_path / "run" / "training.png").stat().st_size > 10_000

    external = execute("math_dapo17k_aime24.ipynb", tmp_path / "external", mode="external", scale="cpu",
                       external_metrics=str(run_dir / "metrics.jsonl"),
                       external_checkpoint=str(run_dir / "final"), external_base_checkpoint=str(scripted_math_model),
                       eval_split=str(rows_file), eval_max_new_tokens=8)
    assert external["mode"] == "external" and external["num_steps"] == 2
    assert external["evaluated"]["after_samples"]["num_prompts"] == len(QUESTIONS)
    # greedy decoding of the same weights on the same prompts measures what the run itself measured
    assert external["evaluated"]["before_samples"]["mean"] == pytest.approx(before)
    assert external["evaluated"]["after_samples"]["mean"] == pytest.approx(after)
    measured = {c["name"]: c for c in external["verdict"]["checks"]}
    assert measured["validation improvement (95% interval above 0)"]["value"] == pytest.approx(after - before)
    reproduced = measured["trainer's last validation reproduces under gymnb's environments"]
    assert reproduced["status"] == "met" and reproduced["value"] == pytest.approx(after)


def test_workplace_notebook_does_not_verify_another_trainers_own_numbers(tmp_path):
    metrics = tmp_path / "nemo_rl_metrics.jsonl"
    lines = [{"step": s, "train/reward_mean": 0.2 + s / 1000, "train/token_mult_prob_error": 1.02}
             for s in range(1, 101)]
    lines[0].update({"val/acc": 0.30, "val/n": 400})
    lines[-1].update({"val/acc": 0.42, "val/n": 400})
    metrics.write_text("".join(json.dumps(x) + "\n" for x in lines))
    result = execute("workplace_assistant.ipynb", tmp_path / "out", mode="external", scale="full",
                     external_metrics=str(metrics),
                     external_key_map={"val/acc": "validation/accuracy", "val/n": "validation/num_samples"})
    # a 12-point gain on 400 samples, as claimed, but no served checkpoint: gymnb measured nothing
    assert result["status"] == "not_verified", result["verdict"]
    assert [p["accuracy"] for p in result["validation"]] == [0.30, 0.42]  # key map applied
    statuses = {c["name"]: c["status"] for c in result["verdict"]["checks"]}
    assert statuses["validation improvement (95% interval above 0)"] == "not verified"
    assert statuses["trainer's last validation reproduces under gymnb's environments"] == "not verified"
    assert result["evaluated"] is None


def test_notebook_rejects_a_bad_mode_naming_the_parameter(tmp_path):
    import papermill

    with pytest.raises(papermill.PapermillExecutionError, match="mode='train'"):
        execute("workplace_assistant.ipynb", tmp_path, mode="train")
