"""Aggregate metrics of a rollout collection: mean reward, pass@k, avg@k, each with a 95% interval.

Rollouts are grouped by task (`_ng_task_index`); k samples per task come from `num_repeats`.
- pass@k: the unbiased estimator of Chen et al. (2021), 1 - C(n-c, k) / C(n, k) per task with n samples of
  which c are correct (reward >= `threshold`), averaged over tasks.
- avg@k: the mean reward of a task's k samples, averaged over tasks ("mean@32" of AIME-style evaluation).
- Intervals: normal approximation over tasks (gymnb.core.stats.normal_interval) of the per-task values. Tasks,
  not rollouts, are the independent units: the repeats of one task are correlated. With a single task there is
  no spread over tasks and the interval is null. Intervals are clipped to the range the value can take
  ([0, 1] for pass@k, the observed reward range for means): with few tasks the normal approximation is crude.
"""

from __future__ import annotations

import math
from collections import defaultdict

from gymnb.core.stats import normal_interval


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n (c correct) is correct."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per task, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def k_values(n: int) -> list[int]:
    """1, 2, 4, ... up to n, and n itself."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]


def compute_metrics(results: list[dict], failures: list[dict] = (), *, threshold: float = 1.0) -> dict:
    """Metrics of successful `results` (dicts with `reward` and `_ng_task_index`); failures are counted.

    k runs over the smallest number of successful samples any task has, so every task contributes to each k.
    """
    by_task: dict[int, list[float]] = defaultdict(list)
    for result in results:
        by_task[int(result.get("_ng_task_index", 0))].append(float(result.get("reward") or 0.0))
    total = len(results) + len(failures)
    metrics = {"num_tasks": len(by_task), "num_rollouts": len(results), "num_failures": len(failures),
               "failure_rate": len(failures) / total if total else 0.0, "correct_threshold": threshold}
    if not by_task:
        return metrics
    rewards = [r for task in by_task.values() for r in task]
    bounds = (min(rewards), max(rewards))
    metrics["mean_reward"], metrics["mean_reward_ci95"] = normal_interval([sum(t) / len(t) for t in by_task.values()],
                                                                    *bounds)
    metrics["reward_std"] = math.sqrt(sum((r - sum(rewards) / len(rewards)) ** 2 for r in rewards) / len(rewards))
    n = min(len(t) for t in by_task.values())
    metrics["samples_per_task"] = n
    for k in k_values(n):
        per_task = [pass_at_k(len(t), sum(r >= threshold for r in t), k) for t in by_task.values()]
        metrics[f"pass@{k}"], metrics[f"pass@{k}_ci95"] = normal_interval(per_task, 0.0, 1.0)
    metrics[f"avg@{n}"], metrics[f"avg@{n}_ci95"] = normal_interval([sum(t[:n]) / n for t in by_task.values()], *bounds)
    return metrics


def format_metrics(metrics: dict) -> str:
    """One line per headline figure, intervals in brackets."""
    def fmt(name):
        ci = metrics.get(f"{name}_ci95")
        return f"{metrics[name]:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")

    lines = [(f"{metrics['num_rollouts']} rollouts over {metrics['num_tasks']} tasks, "
             f"{metrics['num_failures']} failed")]
    if "mean_reward" in metrics:
        lines.append(f"mean reward {fmt('mean_reward')}")
        lines += [f"{name} {fmt(name)}" for name in metrics
                  if name.startswith(("pass@", "avg@")) and not name.endswith("_ci95")]
    return "\n".join(lines)
