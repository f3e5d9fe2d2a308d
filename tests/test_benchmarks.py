"""Benchmark scoring: intervals, paired improvement, verdicts against the seed's criteria, metrics loading."""

from __future__ import annotations

import json

import pytest

from gymnb import benchmarks as bm


def samples(rewards_by_task: dict[int, list[float]]) -> list[dict]:
    return [{"task_index": t, "reward": r} for t, rs in rewards_by_task.items() for r in rs]


def metrics_log(steps: int, accuracies: dict[int, tuple[float, int]], mult_error: float = 1.01) -> list[dict]:
    out = []
    for step in range(steps + 1):
        record = {"step": step}
        if step:
            record.update({"train/reward_mean": 0.3, "train/token_mult_prob_error": mult_error,
                           "train/response_length_mean": 40.0})
        if step in accuracies:
            record["validation/accuracy"], record["validation/num_samples"] = accuracies[step]
        out.append(record)
    return out


def test_wilson_interval_matches_known_values():
    low, high = bm.wilson(0.3, 100)
    assert low == pytest.approx(0.2189, abs=1e-3) and high == pytest.approx(0.3958, abs=1e-3)
    iv = bm.accuracy_interval(samples({i: [1.0 if i < 30 else 0.0] for i in range(100)}))
    assert iv["mean"] == pytest.approx(0.3) and iv["low"] == pytest.approx(low)


def test_paired_improvement_uses_the_same_prompts():
    before = samples({i: [1.0 if i < 30 else 0.0] for i in range(100)})
    after = samples({i: [1.0 if i < 55 else 0.0] for i in range(100)})
    imp = bm.paired_improvement(before, after)
    assert imp["delta"] == pytest.approx(0.25) and imp["num_prompts"] == 100
    assert imp["low"] > 0.15 and imp["p_value"] < 1e-6
    assert imp["improved_prompts"] == 25 and imp["worsened_prompts"] == 0
    # Same accuracy, different prompts solved: no improvement.
    shuffled = samples({i: [1.0 if i >= 70 else 0.0] for i in range(100)})
    flat = bm.paired_improvement(before, shuffled)
    assert flat["delta"] == pytest.approx(0.0) and flat["low"] < 0 < flat["high"]


def test_math_full_verdict_needs_steps_accuracy_and_on_policy_health():
    good = metrics_log(1000, {0: (0.5, 960), 1000: (0.87, 960)})
    verdict = bm.compute_verdict("math", "full", good)
    assert verdict["passed"], bm.format_verdict(verdict)
    short = bm.compute_verdict("math", "full", metrics_log(999, {999: (0.9, 960)}))
    assert not short["passed"] and not short["checks"][0]["passed"]
    low = bm.compute_verdict("math", "full", metrics_log(1000, {1000: (0.80, 960)}))
    assert [c["passed"] for c in low["checks"]] == [True, False, True]
    off_policy = bm.compute_verdict("math", "full", metrics_log(1000, {1000: (0.9, 960)}, mult_error=1.2))
    assert not off_policy["passed"]
    assert "NOT MET" in bm.format_verdict(off_policy)


def test_workplace_verdict_from_summary_numbers_when_no_samples():
    improved = bm.compute_verdict("workplace", "full", metrics_log(100, {0: (0.40, 500), 100: (0.55, 500)}))
    assert improved["passed"]
    noisy = bm.compute_verdict("workplace", "full", metrics_log(100, {0: (0.40, 20), 100: (0.45, 20)}))
    assert not noisy["passed"]  # 5 points on 20 samples is within noise
    check = noisy["checks"][1]
    assert check["interval"]["low"] < 0 < check["interval"]["high"]


def test_external_evaluation_must_reproduce_the_trainers_number():
    metrics = metrics_log(100, {0: (0.40, 500), 100: (0.80, 500)})
    reproduced = samples({i: [1.0 if i < 78 else 0.0] for i in range(100)})
    assert bm.compute_verdict("workplace", "full", metrics, evaluated_samples=reproduced)["checks"][-1]["passed"]
    far = samples({i: [1.0 if i < 40 else 0.0] for i in range(100)})
    verdict = bm.compute_verdict("workplace", "full", metrics, evaluated_samples=far)
    assert not verdict["checks"][-1]["passed"] and not verdict["passed"]


def test_load_metrics_with_key_map_and_clear_errors(tmp_path):
    path = tmp_path / "nemo_rl.jsonl"
    lines = [{"step": 2, "val:accuracy": 0.6}, {"step": 1, "val:accuracy": 0.5, "token_mult_prob_error": 1.01}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    metrics = bm.load_metrics(path, {"val:accuracy": "validation/accuracy",
                                     "token_mult_prob_error": "train/token_mult_prob_error"})
    assert [m["step"] for m in metrics] == [1, 2]
    assert bm.validation_points(metrics)[1]["accuracy"] == 0.6
    assert bm.median_mult_prob_error(metrics) == 1.01
    path.write_text('{"step": 1}\nnot json\n')
    with pytest.raises(ValueError, match=":2: not JSON"):
        bm.load_metrics(path)
    path.write_text('{"iteration": 1}\n')
    with pytest.raises(ValueError, match="no 'step' key"):
        bm.load_metrics(path)
    with pytest.raises(ValueError, match="unknown benchmark"):
        bm.criteria_for("chess", "cpu")


def test_plot_has_the_four_panels_and_the_criterion_line():
    import matplotlib

    matplotlib.use("Agg")
    fig = bm.plot_training(metrics_log(10, {0: (0.3, 100), 10: (0.5, 100)}), target_accuracy=0.85)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["train reward (mean)", "validation accuracy", "token_mult_prob_error",
                      "response length (tokens)"]
    assert [line.get_ydata()[0] for line in fig.axes[1].lines[1:]] == [0.85]


def steps(num: int, error: float = 1.0002) -> list[dict]:
    out = [{"step": s, "train/token_mult_prob_error": error, "train/reward_mean": 0.1 * s} for s in range(1, num + 1)]
    out[0].update({"validation/accuracy": 0.25, "validation/num_samples": 16})
    out[-1].update({"validation/accuracy": 0.25, "validation/num_samples": 16})
    return out


def test_a_smoke_run_is_judged_on_the_loop_and_names_the_long_run():
    verdict = bm.compute_verdict("math", "cpu", steps(2), mode="smoke")
    assert verdict["passed"]  # two steps ran on-policy; no gain is expected in two steps
    improvement = next(c for c in verdict["checks"] if c["name"].startswith("validation improvement"))
    assert improvement["required"].startswith("information") and improvement["detail"] == "not met here"
    text = bm.format_verdict(verdict)
    assert text.startswith("math (cpu, mode smoke): SMOKE RUN OK") and "mode='run'" in text and "10-25 min" in text
    off_policy = bm.compute_verdict("math", "cpu", steps(2, error=1.3), mode="smoke")
    assert not off_policy["passed"] and "SMOKE RUN FAILED" in bm.format_verdict(off_policy)
    assert not bm.compute_verdict("math", "cpu", steps(2), mode="run")["passed"]  # the full criterion


def test_smoke_is_the_cpu_config_cut_short_and_the_callers_overrides_win(monkeypatch):
    seen = {}
    monkeypatch.setattr(bm, "run_training", lambda config, overrides: seen.update(config=config, o=overrides))
    bm.get_run("math", "smoke", "grpo_math_cpu.yaml", ["grpo.max_steps=3"])
    assert seen["o"][:len(bm.SMOKE["math"]["overrides"])] == bm.SMOKE["math"]["overrides"]
    assert seen["o"][-1] == "grpo.max_steps=3"  # later overrides win in load_config
    bm.get_run("math", "run", "grpo_math_cpu.yaml", [])
    assert seen["o"] == []
    with pytest.raises(ValueError, match="mode='smoke' runs the cpu config"):
        bm.check_mode("smoke", "full")


@pytest.mark.parametrize("name", ["grpo_math_cpu", "grpo_math_cpu.yaml", "configs/train/grpo_math_cpu.yaml"])
def test_a_train_config_is_a_name_or_a_path_for_the_cli_and_the_notebooks(name, monkeypatch):
    from gymnb.config import REPO_ROOT
    from gymnb.errors import ConfigError
    from gymnb.train import main as train_main

    monkeypatch.chdir(REPO_ROOT)
    assert bm.resolve_train_config(name).resolve() == REPO_ROOT / "configs" / "train" / "grpo_math_cpu.yaml"
    # the CLI reads the named file: its cross-field check fails on the override before any model loads
    with pytest.raises(ConfigError, match="group_size must be >= 2"):
        train_main(["--config", name, "grpo.group_size=1"])


def test_an_unknown_train_config_lists_the_known_names():
    from gymnb.errors import ConfigError
    from gymnb.train import main as train_main

    with pytest.raises(ConfigError, match="train config grpo_mat not found.*grpo_math_cpu"):
        train_main(["--config", "grpo_mat"])
