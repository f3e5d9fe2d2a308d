"""Training stage, metrics: the per-step JSONL log and the rollout statistics that feed it.

`metrics.jsonl` holds one JSON object per step (`step` plus `train/*`, `validation/*`, `timing/*` keys); the
benchmark notebooks read the same shape from any trainer (gymnb.validation.benchmarks.load_metrics), so a NeMo RL run
exported to this shape is scored the same way.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from gymnb.core.errors import ContinuityError
from gymnb.core.jsonl import read_jsonl
from gymnb.tokens.continuity import extract_trainable_turns
from gymnb.train.batching import group_rollouts


class MetricsLog:
    """Append-only JSONL of step metrics. On resume, lines past the resumed step are dropped first."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [record for record in self.read() if record.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(record) + "\n" for record in kept))

    def append(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record, sort_keys=False) + "\n")
            f.flush()

    def read(self) -> list[dict]:
        return read_jsonl(self.path, what="one step's metrics per line")


def model_calls(rollout: dict) -> list[dict]:
    """The token fields of each model call; none for a rollout whose fields are malformed (the batch builder
    names that problem, the statistics only count)."""
    try:
        return extract_trainable_turns(rollout)
    except ContinuityError:
        return []


def generated_tokens(rollout: dict) -> int:
    return sum(len(c["generation_token_ids"]) for c in model_calls(rollout))


def rollout_stats(results: list[dict], failures: list[dict], prefix: str) -> dict[str, float]:
    """Reward and length statistics of one collection; failed rollouts count as reward 0 in the accuracy."""
    rewards = [float(r.get("reward", 0.0)) for r in results]
    lengths = [generated_tokens(r) for r in results]
    calls = [len(model_calls(r)) for r in results]
    total = len(results) + len(failures)
    mean = sum(rewards) / len(rewards) if rewards else 0.0
    std = math.sqrt(sum((x - mean) ** 2 for x in rewards) / len(rewards)) if rewards else 0.0
    key = "accuracy" if prefix == "validation" else "reward_mean"
    return {
        f"{prefix}/{key}": sum(rewards) / total if total else 0.0,
        f"{prefix}/reward_std": std,
        f"{prefix}/num_samples": total,
        f"{prefix}/num_failures": len(failures),
        f"{prefix}/response_length_mean": sum(lengths) / len(lengths) if lengths else 0.0,
        f"{prefix}/model_calls_mean": sum(calls) / len(calls) if calls else 0.0,
        f"{prefix}/mixed_group_share": mixed_group_share(results),
    }


def mixed_group_share(results: list[dict]) -> float:
    """Share of prompts whose rollouts got different rewards: the groups that carry a GRPO gradient."""
    groups = group_rollouts(results).values()
    mixed = sum(len({float(r.get("reward", 0.0)) for r in group}) > 1 for group in groups)
    return mixed / len(groups) if groups else 0.0


def median(values: list[float]) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


class ForwardTimer:
    """Wall time spent inside a module's forward passes, through hooks (no change to the module's code).

    On the policy server's copy of the model this is the generation compute; rollout wall time minus it is the
    time outside the model (environment servers, agent loop, HTTP, idle engine). The engine runs forwards on
    one thread, so the hooks need no lock.
    """

    def __init__(self, module):
        import time

        self._clock = time.perf_counter
        self.seconds = 0.0
        self._started: float | None = None
        # A causal LM's pass runs from its input embedding to its output head, whether through the model's
        # forward or the engine's lean decode step (gymnb.policy.lean_decode), which skips the former.
        first = module.get_input_embeddings() if hasattr(module, "get_input_embeddings") else None
        last = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
        first, last = (first, last) if first is not None and last is not None else (module, module)
        self._handles = [first.register_forward_pre_hook(self._pre), last.register_forward_hook(self._post)]

    def _pre(self, module, args):
        self._started = self._clock()

    def _post(self, module, args, output):
        if self._started is not None:
            self.seconds += self._clock() - self._started
            self._started = None

    def take(self) -> float:
        """Seconds accumulated since the last take()."""
        value, self.seconds = self.seconds, 0.0
        return value

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
