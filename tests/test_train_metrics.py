"""Training stage, metrics: the share of GRPO groups with a gradient, on hand-built rollouts."""

from __future__ import annotations

from gymnb.train.metrics import mixed_group_share, rollout_stats


def rollout(task: int, reward: float) -> dict:
    return {"_ng_task_index": task, "reward": reward}


def test_mixed_group_share_counts_prompts_whose_rewards_differ():
    results = [rollout(0, 0.0), rollout(0, 1.0), rollout(1, 1.0), rollout(1, 1.0), rollout(2, 0.0), rollout(2, 0.0),
               rollout(3, 0.5), rollout(3, 0.0), rollout(3, 0.5)]
    assert mixed_group_share(results) == 2 / 4  # prompts 0 and 3 differ; 1 (all 1) and 2 (all 0) do not
    assert mixed_group_share([rollout(7, 1.0)]) == 0.0  # one sample: nothing to compare
    assert mixed_group_share([]) == 0.0


def test_rollout_stats_logs_the_share_under_its_prefix():
    stats = rollout_stats([rollout(0, 0.0), rollout(0, 1.0), rollout(1, 0.0), rollout(1, 0.0)], [], "train")
    assert stats["train/mixed_group_share"] == 0.5
