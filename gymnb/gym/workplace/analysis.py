"""workplace_assistant environment, analysis: what a policy's rollouts did, beyond their reward.

The company is the same in every split (as in NeMo Gym's data), so a policy can earn reward on a validation
task with facts it memorised in training (an email id, an address) instead of looking them up. For each
rollout (a `/run` result: the row, its `response` and `reward`) this module tells apart:
- `direct`: the task needs no lookup (every id and address is in the request);
- `looked_up`: the task needs facts, and every one the ground truth uses appeared in a tool output the policy
  saw during the rollout;
- `unseen_facts`: the task needs facts, and the policy used at least one it never saw in this rollout
  (memorised, or a lucky guess; on a rewarded rollout: memorised).
It also counts the format skills a warm start is for: a parsable tool call, and right tool names.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from gymnb.core.jsonl import read_jsonl
from gymnb.gym.workplace.reference import used_facts


def rollout_calls(result: dict) -> tuple[list[dict], list[str]]:
    """The rollout's function calls (`{"name", "arguments"}`) and the tool output texts it saw, in order."""
    output = (result.get("response") or {}).get("output") or []
    calls = [{"name": o.get("name"), "arguments": o.get("arguments")} for o in output
             if isinstance(o, dict) and o.get("type") == "function_call"]
    seen = [str(o.get("output")) for o in output if isinstance(o, dict) and o.get("type") == "function_call_output"]
    return calls, seen


def request_text(result: dict) -> str:
    inputs = (result.get("responses_create_params") or {}).get("input") or []
    return " ".join(str(m.get("content")) for m in inputs if isinstance(m, dict) and m.get("role") == "user")


def classify_rollout(result: dict) -> dict:
    """category, reward, kind (direct | looked_up | unseen_facts), and the format facts of one rollout."""
    calls, seen = rollout_calls(result)
    request = request_text(result).lower()
    facts = [f.lower() for f in used_facts(result.get("ground_truth") or [])]
    needed = [f for f in facts if f not in request]
    seen_text = " ".join(seen).lower()
    if not needed:
        kind = "direct"
    else:
        kind = "looked_up" if all(f in seen_text for f in needed) else "unseen_facts"
    truth_names = {c["name"] for c in result.get("ground_truth") or []}
    return {"category": str(result.get("category", "")).removeprefix("workplace_assistant_"),
            "task_index": result.get("_ng_task_index"), "reward": float(result.get("reward", 0.0)), "kind": kind,
            "parsable_call": bool(calls), "right_action_tool": bool(truth_names & {c["name"] for c in calls}),
            "num_calls": len(calls)}


def summarize_rollouts(results: list[dict]) -> dict:
    """Per category and overall: rollouts, mean reward, share with a parsable call / the right action tool,
    and the rewarded rollouts by kind (direct, looked_up, unseen_facts)."""
    rows = [classify_rollout(r) for r in results]
    groups = defaultdict(list)
    for row in rows:
        groups[row["category"]].append(row)
    groups["all"] = rows

    def summary(items: list[dict]) -> dict:
        n = len(items)
        rewarded = [i for i in items if i["reward"] >= 1.0]
        return {"rollouts": n, "mean_reward": sum(i["reward"] for i in items) / n if n else float("nan"),
                "parsable_call": sum(i["parsable_call"] for i in items) / n if n else float("nan"),
                "right_action_tool": sum(i["right_action_tool"] for i in items) / n if n else float("nan"),
                "needs_lookup": sum(i["kind"] != "direct" for i in items),
                "rewarded": {kind: sum(i["kind"] == kind for i in rewarded)
                             for kind in ("direct", "looked_up", "unseen_facts")}}

    return {category: summary(items) for category, items in sorted(groups.items())}


# ----- the workplace benchmark notebook (notebooks/benchmarks/workplace_assistant.ipynb)
def validation_files(run_dir) -> list:
    """A gymnb run's validation rollouts files, first (before training) to last (after)."""
    folder = Path(run_dir) / "validation"
    return sorted(p for p in folder.glob("step_*.jsonl") if p.stem[5:].isdigit())


def compare_validations(run_dir) -> dict:
    """`summarize_rollouts` of the first and the last validation of a run, side by side per category."""
    files = validation_files(run_dir) if run_dir else []
    if len(files) < 2:
        return {}
    before, after = (summarize_rollouts(read_jsonl(p, what="one rollout result per line"))
                     for p in (files[0], files[-1]))
    return {category: {"before": before[category], "after": after.get(category)} for category in before}


def load_warm_start(run_dir) -> dict | None:
    """The warm start's summary (`<run>/warm_start/warm_start.json`) without its per-step records."""
    path = Path(run_dir) / "warm_start" / "warm_start.json" if run_dir else None
    if path is None or not path.exists():
        return None
    summary = json.loads(path.read_text())
    summary["losses"] = [round(s["loss"], 4) for s in summary.pop("steps", [])]
    return summary


def plot_mixed_groups(metrics: list[dict], title: str = ""):
    """Per GRPO step: the share of prompts whose samples got different rewards (the ones with a gradient)."""
    import matplotlib.pyplot as plt

    points = [(m["step"], m["train/mixed_group_share"]) for m in metrics if "train/mixed_group_share" in m]
    fig, ax = plt.subplots(figsize=(6, 3))
    if points:
        ax.bar(*zip(*points))
    else:
        ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylim(0, 1)
    ax.set_xlabel("step")
    ax.set_ylabel("share of groups with mixed rewards")
    ax.set_title(title or "GRPO groups with a gradient")
    fig.tight_layout()
    return fig


def benchmark_extras(run: dict) -> dict:
    """What the workplace notebook adds to its results JSON: warm start, mixed groups, categories, kinds."""
    shares = [m["train/mixed_group_share"] for m in run["metrics"] if "train/mixed_group_share" in m]
    return {"warm_start": load_warm_start(run.get("run_dir")), "mixed_group_share_per_step": shares,
            "mixed_group_share_mean": sum(shares) / len(shares) if shares else None,
            "by_category": compare_validations(run.get("run_dir"))}
