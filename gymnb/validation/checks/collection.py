"""Validation layer 03, rollout collection: Gym returns complete rollouts with rewards and token data.

For every row sent (times `num_repeats`): a `/run` result came back (failures are listed with their error),
with a `response.output` list, a reward in [0, 1], and at least one output item carrying the three token
fields with consistent lengths. The rollouts land in `rollouts.jsonl` for layers 04 and 05.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

from gymnb.core.errors import ConfigError, ContinuityError
from gymnb.validation.checks.integration import Integration
from gymnb.validation.checks.plots import plot_histogram
from gymnb.validation.checks.result import LayerResult


def collect_layer_rollouts(integration: Integration, env: str, *, num_rows: int, num_repeats: int,
                           temperature: float, max_output_tokens: int, concurrency: int, out_path: str | Path,
                           rows_path: str = "", split: str = "validation"):
    """Run `num_rows` rows through their agent via the Gym head server: the environment's embedded rows, or
    the NeMo Gym rows JSONL at `rows_path` (rows without `agent_ref` go to `env`'s agent)."""
    from gymnb.gym.data import ENV_AGENTS, load_nemo_gym_jsonl, load_rows
    from gymnb.rollouts.collect import collect_rollouts_sync

    if rows_path:
        rows = load_nemo_gym_jsonl(rows_path, agent_name=ENV_AGENTS.get(env), limit=num_rows)
    else:
        rows = load_rows(env, split, limit=num_rows)
    if len(rows) < num_rows:
        raise ConfigError(f"asked for {num_rows} rows but {rows_path or env} has {len(rows)}; lower num_rows")
    overrides = {"temperature": temperature, "max_output_tokens": max_output_tokens}
    return collect_rollouts_sync(rows, head_url=integration.head_url, num_repeats=num_repeats,
                                 concurrency=concurrency, overrides=overrides, out_path=out_path,
                                 agent=ENV_AGENTS.get(env))


def trainable_items(rollout: dict) -> list[dict]:
    output = (rollout.get("response") or {}).get("output") or []
    return [item for item in output if isinstance(item, dict) and item.get("generation_token_ids") is not None]


def check_rollout_collection(run, *, num_expected: int, output_dir=".") -> LayerResult:
    """Layer 03 over a `RolloutRun` (results, failures, metrics)."""
    from gymnb.tokens.continuity import extract_trainable_turns

    result = LayerResult("rollout_collection", output_dir=str(output_dir))
    results, failures = run.results, run.failures
    failed = "; ".join(f"row {f.get('_ng_task_index')} repeat {f.get('_ng_rollout_index')}: "
                       f"{f.get('error_class')}: {str(f.get('message'))[:200]}" for f in failures[:3])
    result.add("every row returned a rollout", len(results) == num_expected and not failures,
               f"{len(results)} of {num_expected} rollouts, {len(failures)} failed" + (f": {failed}" if failed else ""))
    no_output = [i for i, r in enumerate(results) if not (r.get("response") or {}).get("output")]
    result.add("each rollout has response.output", bool(results) and not no_output,
               f"rollouts without output: {no_output[:10]}" if no_output else f"{len(results)} rollouts")
    rewards = [r.get("reward") for r in results]
    bad = [(i, x) for i, x in enumerate(rewards)
           if not isinstance(x, (int, float)) or not math.isfinite(x) or not 0.0 <= x <= 1.0]
    result.add("each reward is a number in [0, 1]", bool(results) and not bad,
               f"bad rewards (rollout, value): {bad[:10]}" if bad else "")
    untrainable = [i for i, r in enumerate(results) if not trainable_items(r)]
    result.add("each rollout has trainable outputs (items with generation_token_ids)",
               bool(results) and not untrainable,
               f"rollouts without token fields: {untrainable[:10]}; the policy server must return prompt_token_ids, "
               "generation_token_ids and generation_log_probs, and the model server keep them"
               if untrainable else "")
    malformed = []
    for i, rollout in enumerate(results):
        try:
            extract_trainable_turns(rollout)
        except ContinuityError as exc:
            malformed.append(f"rollout {i}: {exc}")
    result.add("token fields complete and consistent on every model call", bool(results) and not malformed,
               "; ".join(malformed[:3]) if results else "no rollouts to check")
    calls = [len(trainable_items(r)) for r in results]
    good_rewards = [float(x) for x in rewards if isinstance(x, (int, float)) and math.isfinite(x)]
    result.figures.update(num_rollouts=len(results), num_failures=len(failures),
                          mean_reward=sum(good_rewards) / len(good_rewards) if good_rewards else float("nan"),
                          num_multi_turn=sum(c > 1 for c in calls), max_model_calls=max(calls, default=0),
                          generation_tokens=sum(len(item["generation_token_ids"]) for r in results
                                                for item in trainable_items(r)))
    for key in ("pass@1", "seconds"):
        if key in run.metrics:
            result.figures[key] = run.metrics[key]
    result.plots.append(plot_histogram(good_rewards, output_dir, "reward_histogram", title="Reward per rollout",
                                       xlabel="reward", bins=[i / 10 for i in range(12)]).name)
    result.plots.append(plot_histogram(calls, output_dir, "model_calls", title="Model calls per rollout",
                                       xlabel="model calls (trainable outputs)",
                                       bins=[x + 0.5 for x in range(max(calls, default=1) + 1)]).name)
    result.details_html = render_rollout_table(results)
    return result


def render_rollout_table(results: list[dict], limit: int = 12) -> str:
    rows = []
    for i, rollout in enumerate(results[:limit]):
        output = (rollout.get("response") or {}).get("output") or []
        kinds = ", ".join(item.get("type", "?") for item in output)
        text = " ".join(part.get("text", "") for item in output if item.get("type") == "message"
                        for part in item.get("content") or [] if isinstance(part, dict))
        rows.append(f"<tr><td>{i}</td><td>{rollout.get('reward')}</td><td>{len(trainable_items(rollout))}</td>"
                    f"<td>{html.escape(kinds)}</td><td>{html.escape(text[:160])}</td></tr>")
    more = f"<p>... and {len(results) - limit} more in rollouts.jsonl</p>" if len(results) > limit else ""
    return ("<h4>Rollouts</h4><table><tr><th>#</th><th>reward</th><th>model calls</th><th>output items</th>"
            "<th>assistant text</th></tr>" + "".join(rows) + "</table>" + more)
