"""Training stage, loss pieces: GRPO advantages, per-token log-probs, the clipped policy-gradient loss.

All per-token tensors are aligned with `input_ids`: position t holds the quantity for token t (predicted
from tokens < t), position 0 is never trainable. A `loss_mask` (B, T) marks the tokens the policy
generated; everything else (prompt, tool outputs, template glue, padding) carries no loss.

Departures from the textbook, both deliberate:
- Token-level averaging over the *global* batch: every micro-batch divides its token sum by the number of
  trainable tokens in the whole optimizer step (`num_global_tokens`), so gradient accumulation gives the same
  gradient as one big batch, and long responses weigh by their tokens (as in DAPO / NeMo RL), not per sample.
- The optional importance-sampling correction reweights each token by exp(trainer_lp - generation_lp),
  truncated, to correct for an inference engine whose probabilities differ slightly from the trainer's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def compute_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    leave_one_out: bool = True,
    normalize_std: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Per-sample advantages from rewards (N,) and the prompt group of each sample (N,).

    Baseline: the mean reward of the *other* samples of the same prompt (leave-one-out), or of the whole group.
    With `normalize_std`, divide by the group's sample standard deviation (unbiased) + eps; a group whose
    rewards are all equal gets advantage 0 either way. A group of one sample has no baseline: advantage 0.
    """
    rewards = rewards.to(torch.float64)
    advantages = torch.zeros_like(rewards)
    for gid in torch.unique(group_ids):
        idx = (group_ids == gid).nonzero(as_tuple=True)[0]
        group = rewards[idx]  # (G,)
        n = group.numel()
        if n < 2:
            continue
        if leave_one_out:
            baseline = (group.sum() - group) / (n - 1)
        else:
            baseline = group.mean().expand(n)
        adv = group - baseline
        if normalize_std:
            adv = adv / (group.std(unbiased=True) + eps)
        advantages[idx] = adv
    return advantages.to(torch.float32)


def compute_token_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    temperature: float = 1.0,
    loss_mask: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """log_softmax(logits / T)[token] for every token of `input_ids` (B, T) -> (B, T); column 0 is 0.

    The same convention as the policy server's `generation_log_probs` (T = request temperature, T=0 means
    greedy and counts as 1, no top-k/top-p truncation), so the two are directly comparable.
    With `loss_mask` (B, T), only columns from the first trainable one on are computed (the rest are 0): the
    vocabulary projection of prompt positions, a large share of a short-answer batch, is skipped.
    `compute_dtype` (e.g. bfloat16, with float32 weights): the forward runs on a copy of the weights rounded to
    that dtype, as an engine loaded in it computes, while gradients flow back to the float32 weights (the
    optimizer's updates, far below bf16's resolution of a weight, would otherwise be rounded away).
    """
    temp = temperature if temperature and temperature > 0 else 1.0
    width = input_ids.shape[1]
    start = 1
    if loss_mask is not None and bool(loss_mask.any()):
        start = max(int(loss_mask.bool().any(0).nonzero()[0]), 1)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T); right padding keeps 0..n-1
    # logits_to_keep = K returns the logits of the last K positions: positions start-1 .. T-1.
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
              "use_cache": False, "logits_to_keep": width - start + 1}
    logits = forward_in_dtype(model, kwargs, compute_dtype).logits  # (B, K, V)
    logits = logits[:, :-1].float() / temp  # (B, T-start, V): position t predicts token t+1
    targets = input_ids[:, start:]  # (B, T-start)
    # logsumexp + gather instead of a full log_softmax: avoids a second (B, T, V) tensor.
    token_logits = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T-start)
    logprobs = token_logits - torch.logsumexp(logits, dim=-1)  # (B, T-start)
    return torch.cat([logprobs.new_zeros(logprobs.shape[0], start), logprobs], dim=1)  # (B, T)


def forward_in_dtype(model: torch.nn.Module, kwargs: dict, compute_dtype: torch.dtype | None):
    """`model(**kwargs)`, with the parameters cast to `compute_dtype` when they are not in it already.

    Only parameters are cast, as `from_pretrained(dtype=...)` does (rotary frequencies stay float32), so the
    forward is the one an engine holding these weights in `compute_dtype` runs; the casts are differentiable.
    """
    params = dict(model.named_parameters())
    if compute_dtype is None or all(p.dtype == compute_dtype for p in params.values()):
        return model(**kwargs)
    cast = {name: p.to(compute_dtype) for name, p in params.items()}
    return torch.func.functional_call(model, cast, args=(), kwargs=kwargs, tie_weights=True)


def kl_k3(logprobs: torch.Tensor, reference_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(policy || reference) on samples of the policy: r - 1 - log r, r = p_ref/p."""
    log_ratio = (reference_logprobs - logprobs).clamp(-20.0, 20.0)
    return torch.exp(log_ratio) - 1.0 - log_ratio


@dataclass
class LossOutput:
    """The micro-batch's contribution to the step loss, plus per-token sums for step metrics."""

    loss: torch.Tensor  # scalar, already divided by the global token count: sum over micro-batches = step loss
    stats: dict[str, float]  # sums over this micro-batch's trainable tokens (divide by tokens for means)


def policy_loss(
    logprobs: torch.Tensor,
    prev_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    num_global_tokens: int,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    generation_logprobs: torch.Tensor | None = None,
    importance_sampling: bool = False,
    is_truncation: float = 2.0,
    reference_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> LossOutput:
    """Clipped policy-gradient loss of one micro-batch, token-level averaged over the global batch.

    logprobs (B, T): current policy, with grad. prev_logprobs (B, T): the policy the ratio is taken against
    (detached). advantages (B,) or (B, T). loss_mask (B, T) float/bool: 1 on generated tokens.
    generation_logprobs (B, T): the server's log-probs; used for the importance-sampling weight and metrics.

    `clip_fraction_sum` (with generation_logprobs only) counts the tokens whose ratio to the behaviour policy,
    exp(logprobs - generation_logprobs), leaves [1 - clip_low, 1 + clip_high]: how far the batch is off-policy,
    in units of the trust region. The ratio to `prev_logprobs` is no measure: in the one-step-per-batch loop
    they are this same forward pass, so it is 1 everywhere and its clip fraction always 0.
    """
    mask = loss_mask.to(logprobs.dtype)
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(logprobs)  # (B, T)
    ratio = torch.exp(logprobs - prev_logprobs)  # (B, T)
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = -torch.minimum(ratio * advantages, clipped * advantages)  # (B, T)
    if importance_sampling:
        if generation_logprobs is None:
            raise ValueError("importance_sampling needs generation_logprobs")
        # Trainer/engine mismatch correction: weights from the detached trainer log-probs, truncated.
        weight = torch.exp((prev_logprobs - generation_logprobs).clamp(max=20.0)).clamp(max=is_truncation)
        per_token = per_token * weight.detach()
    kl = None
    if kl_coef > 0.0:
        if reference_logprobs is None:
            raise ValueError("kl_coef > 0 needs reference_logprobs")
        kl = kl_k3(logprobs, reference_logprobs)
        per_token = per_token + kl_coef * kl
    denom = max(int(num_global_tokens), 1)
    loss = (per_token * mask).sum() / denom
    with torch.no_grad():
        stats = {"num_tokens": float(mask.sum())}
        if kl is not None:
            stats["kl_ref_sum"] = float((kl * mask).sum())
        if generation_logprobs is not None:
            stats.update(logprob_error_sums(prev_logprobs, generation_logprobs, mask))
            behaviour_ratio = torch.exp((logprobs - generation_logprobs).clamp(-20.0, 20.0))  # (B, T)
            outside = (behaviour_ratio < 1 - clip_low) | (behaviour_ratio > 1 + clip_high)
            stats["clip_fraction_sum"] = float((outside.to(mask.dtype) * mask).sum())
    return LossOutput(loss=loss, stats=stats)


def logprob_error_sums(train_logprobs: torch.Tensor, generation_logprobs: torch.Tensor,
                       mask: torch.Tensor) -> dict[str, float]:
    """Token sums behind the on-policy health metrics (divide by the token count for the means).

    token_mult_prob_error = mean(exp(|gen_lp - train_lp|)): 1.0 when the engine and the trainer agree exactly.
    gen_kl_error = mean k3 estimate of KL(generation || trainer) on the generated tokens.
    """
    mask = mask.to(torch.float64)
    diff = (generation_logprobs.double() - train_logprobs.double()) * mask
    return {
        "mult_prob_error_sum": float((torch.exp(diff.abs()) * mask).sum()),
        "gen_kl_error_sum": float((kl_k3(generation_logprobs.double(), train_logprobs.double()) * mask).sum()),
        "abs_logprob_diff_max": float((diff.abs()).max()) if mask.any() else 0.0,
    }
