"""Validation layer 05, gradient flow: processed rollouts give valid gradients, computed on-policy.

For up to `max_rollouts` rollouts (multi-turn ones first), the rollout is processed into the trainer's message
log (`gymnb.tokens.continuity.process_rollout_for_training`), the loss mask is audited (exactly the generated ids are
trainable, carrying their own generation log-probs), and the trainer's copy of the policy recomputes the
log-prob of every generated token at the rollout's temperature (`gymnb.train.loss.compute_token_logprobs`).
Agreement with the server's `generation_log_probs` is `token_mult_prob_error = mean(exp(|gen_lp - train_lp|))`.

The gradient is that of a unit-advantage policy-gradient loss, -mean(log p) over the generated tokens: real
GRPO advantages are zero for a batch whose rewards are all equal (common for a small model), which would hide
a broken graph. Every parameter tensor must then get a finite, non-zero gradient.
"""

from __future__ import annotations

import math

from gymnb.core.errors import ContinuityError
from gymnb.validation.checks.plots import plot_histogram
from gymnb.validation.checks.result import LayerResult


def rollout_temperature(rollout: dict) -> float:
    """The sampling temperature of the rollout's requests (0 means greedy, scored at T=1 like the server)."""
    temperature = (rollout.get("responses_create_params") or {}).get("temperature")
    return float(temperature) if temperature else 1.0


def select_rollouts(rollouts: list[dict], max_rollouts: int) -> list[tuple[int, dict]]:
    """Multi-turn rollouts first (the splice matters there), then the rest, in collection order."""
    from gymnb.validation.checks.collection import trainable_items

    indexed = list(enumerate(rollouts))
    indexed.sort(key=lambda item: len(trainable_items(item[1])) <= 1)
    return indexed[:max_rollouts]


def recompute_logprobs(model, processed: dict, temperature: float):
    """Trainer log-probs (1, T) with grad, and the trainable mask (1, T) of one processed rollout."""
    import torch

    from gymnb.train.loss import compute_token_logprobs

    input_ids = processed["input_ids"][None]  # (1, T)
    loss_mask = processed["loss_mask"][None]  # (1, T)
    attention_mask = torch.ones_like(input_ids)  # (1, T)
    return compute_token_logprobs(model, input_ids, attention_mask, temperature, loss_mask=loss_mask), loss_mask


def check_gradient_flow(rollouts: list[dict], policy, *, max_rollouts: int = 4, max_mult_prob_error: float = 1.05,
                        output_dir=".") -> LayerResult:
    """Layer 05 with `policy` a `gymnb.core.models.LoadedModel` holding the served weights."""
    from gymnb.tokens.continuity import audit_loss_mask, process_rollout_for_training

    result = LayerResult("gradient_flow", output_dir=str(output_dir))
    chosen = select_rollouts(rollouts, max_rollouts)
    processed, refused, mask_problems = [], [], []
    for index, rollout in chosen:
        try:
            item = process_rollout_for_training(rollout, policy.tokenizer)
        except ContinuityError as exc:
            refused.append(f"rollout {index}: {exc}")
            continue
        audit = audit_loss_mask(item, rollout)
        mask_problems += [f"rollout {index}: {p}" for p in audit["problems"]]
        processed.append((index, rollout, item))
    result.add("rollouts process into training data", bool(processed) and not refused,
               f"{len(refused)} of {len(chosen)} refused; first: {refused[0]}" if refused else
               f"{len(processed)} rollouts" if processed else "no rollouts: layer 03 collected none (see its report)")
    result.add("loss mask covers exactly the generated tokens, with their log-probs", not mask_problems,
               "; ".join(mask_problems[:3]))
    if not processed:
        return result
    diffs, loss_value = backward_unit_advantage(policy.model, processed)
    add_logprob_agreement(result, diffs, max_mult_prob_error, output_dir)
    add_gradient_checks(result, policy.model, loss_value)
    policy.model.zero_grad(set_to_none=True)
    return result


def backward_unit_advantage(model, processed: list[tuple[int, dict, dict]]) -> tuple[list[float], float]:
    """Accumulate the gradient of -mean(log p over generated tokens); return (gen_lp - train_lp per token, loss)."""
    from gymnb.policy.cpu_threads import adaptive_team

    model.zero_grad(set_to_none=True)
    num_tokens = sum(int(item["loss_mask"].sum()) for _, _, item in processed)
    diffs, loss_value = [], 0.0
    with adaptive_team() as team:  # a busy core must not stall every op of the backward (cpu_threads)
        for _, rollout, item in processed:
            team.adjust()
            logprobs, mask = recompute_logprobs(model, item, rollout_temperature(rollout))  # (1, T), (1, T)
            generation = item["generation_logprobs"][None]  # (1, T)
            diffs += (generation - logprobs.detach())[mask].tolist()
            loss = -(logprobs * mask).sum() / max(num_tokens, 1)  # token-level mean over the whole batch
            loss.backward()
            loss_value += float(loss.detach())
    return diffs, loss_value


def add_logprob_agreement(result: LayerResult, diffs: list[float], max_error: float, output_dir) -> None:
    error = sum(math.exp(abs(d)) for d in diffs) / len(diffs) if diffs else float("nan")
    result.add(f"token_mult_prob_error <= {max_error}", diffs and error <= max_error,
               f"{error:.6f} over {len(diffs)} generated tokens; max |gen_lp - train_lp| = "
               f"{max((abs(d) for d in diffs), default=0.0):.3g}" + (
                   "" if error <= max_error else ". The trainer scores these tokens differently from the engine: "
                   "different weights (stale refit?), temperature, or a different prompt (off-policy ids). vLLM "
                   "returns the raw logits' log-probs unless started with --logprobs-mode processed_logprobs: at "
                   "a sampling temperature other than 1 they are not the sampler's"))
    result.figures.update(token_mult_prob_error=error, max_abs_logprob_diff=max((abs(d) for d in diffs), default=0.0),
                          mean_logprob_diff=sum(diffs) / len(diffs) if diffs else float("nan"),
                          num_generated_tokens=len(diffs))
    result.plots.append(plot_histogram(diffs, output_dir, "logprob_diff", title="generation_lp - trainer_lp per token",
                                       xlabel="log-prob difference (nats)", bins=40, log_y=True).name)


def add_gradient_checks(result: LayerResult, model, loss_value: float) -> None:
    import torch

    result.add("loss is finite", math.isfinite(loss_value), f"loss = {loss_value:.4f}")
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    missing = [name for name, p in params if p.grad is None]
    nonfinite = [name for name, p in params if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
    zero = [name for name, p in params if p.grad is not None and not bool(p.grad.abs().sum() > 0)]
    bad = missing + nonfinite + zero
    result.add("every parameter tensor gets a finite, non-zero gradient", not bad,
               f"{len(missing)} without grad, {len(nonfinite)} non-finite, {len(zero)} all-zero; e.g. {bad[:3]}"
               if bad else f"{len(params)} parameter tensors")
    norms = [p.grad.detach().float().norm() for _, p in params if p.grad is not None]
    grad_norm = float(torch.stack(norms).norm()) if norms else 0.0
    result.figures.update(loss=loss_value, grad_norm=grad_norm, num_parameter_tensors=len(params))
