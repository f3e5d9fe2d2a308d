"""`gymnb bench rollouts` on the tiny model: the figures are consistent with each other and saved."""

from __future__ import annotations

import json

import pytest

from gymnb.bench.rollouts import level_figures, union_seconds
from gymnb.cli import main


def test_busy_time_is_the_union_of_overlapping_requests():
    intervals = [[0.0, 2.0], [1.0, 3.0], [5.0, 6.0], [5.5, 5.7], [9.0, 20.0]]
    assert union_seconds(intervals, 0.0, 10.0) == pytest.approx(3.0 + 1.0 + 1.0)
    assert union_seconds(intervals, 2.5, 5.5) == pytest.approx(0.5 + 0.5)
    assert union_seconds([], 0.0, 1.0) == 0.0


def test_level_figures_from_hand_measured_numbers():
    # 4 rollouts (1, 1, 2, 4 model calls, 120 tokens) in 30 s, the model busy 24 s of them, 18 s in forwards
    figures = level_figures([1, 1, 2, 4], 120, wall=30.0, model_busy=24.0, forward_s=18.0)
    assert figures["rollouts"] == 4 and figures["rollouts_per_minute"] == pytest.approx(8.0)
    assert figures["outside_share"] == pytest.approx(0.2) and figures["outside_ms_per_rollout"] == pytest.approx(1500)
    assert figures["forward_share"] == pytest.approx(0.6) and figures["model_calls_per_rollout"] == 2.0
    assert figures["generated_tokens_per_s"] == pytest.approx(4.0)


@pytest.mark.slow
def test_bench_rollouts_on_the_tiny_model(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", "rollouts", "--model", str(tiny_model_dir), "--limit", "2", "--concurrency", "1", "2",
            "--rollouts", "2", "--max-output-tokens", "8", "--out", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    levels = report["levels"]
    assert [lv["concurrency"] for lv in levels] == [1, 2]
    for lv in levels:
        assert lv["rollouts"] == 2 and lv["failures"] == 0
        # forwards happen while a request is inside the engine, and requests only within the level's wall time
        assert 0 < lv["forward_s"] <= lv["model_busy_s"] <= lv["wall_s"]
        assert lv["model_calls_per_rollout"] == 1  # math_with_judge: one model call per rollout
    assert "rollouts/min" in capsys.readouterr().out
