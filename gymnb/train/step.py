"""Training stage, one optimizer step: micro-batched forward/backward with accumulation, clipping, AdamW.

One optimizer step per batch of rollouts keeps GRPO on-policy: the policy that produced the rollouts is the
policy at the start of the step, so the PPO ratio's denominator is the trainer's own detached log-probs from
the same forward pass (value 1, gradient of plain REINFORCE with a baseline); the clip only matters for
callers that take several steps on one batch. The server's generation log-probs are compared with those same
trainer log-probs to measure how on-policy the run really is (token_mult_prob_error, and clip_fraction: the
share of tokens whose ratio to the generation log-probs leaves the clip range).
"""

from __future__ import annotations

import math
import time

import torch

from gymnb.policy.cpu_threads import adaptive_team
from gymnb.train.batching import TrainBatch, iter_micro_batches
from gymnb.train.loss import compute_token_logprobs, policy_loss


def make_optimizer(model: torch.nn.Module, opt_cfg) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=opt_cfg.lr, betas=(opt_cfg.beta1, opt_cfg.beta2), eps=opt_cfg.eps,
                             weight_decay=opt_cfg.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, opt_cfg, max_steps: int):
    """Linear warmup, then constant, linear decay or cosine decay to 0 at `max_steps`."""
    warmup = max(int(opt_cfg.warmup_steps), 0)
    kind = opt_cfg.lr_schedule

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min((step - warmup) / max(max_steps - warmup, 1), 1.0)
        if kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def accumulate_gradients(model, batch: TrainBatch, *, micro_batch_size: int, temperature: float,
                         pad_token_id: int, loss_cfg, reference_model=None,
                         compute_dtype: torch.dtype | None = None) -> dict[str, float]:
    """Forward/backward every micro-batch of `batch`; gradients sum to the step's gradient. Returns sums.

    `compute_dtype`: the dtype the forward runs in (the serving engine's), over `model`'s own weights."""
    num_global_tokens = batch.num_trainable_tokens
    use_kl = loss_cfg.kl_coef > 0 and reference_model is not None
    totals: dict[str, float] = {"loss": 0.0}
    with adaptive_team() as team:  # a busy core must not stall every op of the backward (cpu_threads)
        for mb in iter_micro_batches(batch, micro_batch_size, pad_token_id):
            team.adjust()
            logprobs = compute_token_logprobs(model, mb.input_ids, mb.attention_mask, temperature,
                                              mb.loss_mask, compute_dtype)  # (B, T)
            reference = None
            if use_kl:
                with torch.no_grad():
                    reference = compute_token_logprobs(reference_model, mb.input_ids, mb.attention_mask,
                                                       temperature, mb.loss_mask, compute_dtype)
            out = policy_loss(
                logprobs, logprobs.detach(), mb.advantages, mb.loss_mask, num_global_tokens,
                clip_low=loss_cfg.clip_low, clip_high=loss_cfg.clip_high,
                generation_logprobs=mb.generation_logprobs, importance_sampling=loss_cfg.importance_sampling,
                is_truncation=loss_cfg.is_truncation, reference_logprobs=reference,
                kl_coef=loss_cfg.kl_coef if use_kl else 0.0,
            )
            out.loss.backward()
            totals["loss"] += float(out.loss.detach())
            for key, value in out.stats.items():
                if key.endswith("_max"):
                    totals[key] = max(totals.get(key, 0.0), value)
                else:
                    totals[key] = totals.get(key, 0.0) + value
    return totals


def train_step(model, optimizer, scheduler, batch: TrainBatch, *, micro_batch_size: int, temperature: float,
               pad_token_id: int, loss_cfg, max_grad_norm: float, reference_model=None,
               compute_dtype: torch.dtype | None = None) -> dict[str, float]:
    """One optimizer step on `batch`; returns step metrics (token means, grad norm, lr).

    The loss is computed in eval mode (dropout off), as the server computes generation log-probs: with
    dropout on, the trainer's log-probs differ from the policy that sampled, and token_mult_prob_error
    reads above 1 at learning rate 0. Gradients flow the same in either mode.
    """
    model.eval()
    optimizer.zero_grad(set_to_none=True)
    started = time.perf_counter()
    sums = accumulate_gradients(model, batch, micro_batch_size=micro_batch_size, temperature=temperature,
                                pad_token_id=pad_token_id, loss_cfg=loss_cfg, reference_model=reference_model,
                                compute_dtype=compute_dtype)
    forward_backward_s = time.perf_counter() - started
    params = [p for p in model.parameters() if p.requires_grad]
    # clip_grad_norm_ with an infinite limit still returns the norm, so the metric exists with clipping off.
    limit = max_grad_norm if max_grad_norm and max_grad_norm > 0 else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, limit))
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    metrics = summarize_step(sums, grad_norm, lr)
    metrics["timing/forward_backward_s"] = forward_backward_s
    metrics["timing/optimizer_s"] = time.perf_counter() - started - forward_backward_s  # clip + AdamW
    return metrics


def summarize_step(sums: dict[str, float], grad_norm: float, lr: float) -> dict[str, float]:
    tokens = max(sums.get("num_tokens", 0.0), 1.0)
    metrics = {
        "train/loss": sums["loss"],
        "train/grad_norm": grad_norm,
        "train/lr": lr,
        "train/num_trainable_tokens": sums.get("num_tokens", 0.0),
    }
    if "mult_prob_error_sum" in sums:
        metrics["train/clip_fraction"] = sums["clip_fraction_sum"] / tokens  # ratio to the behaviour policy
        metrics["train/token_mult_prob_error"] = sums["mult_prob_error_sum"] / tokens
        metrics["train/gen_kl_error"] = sums["gen_kl_error_sum"] / tokens
        metrics["train/max_abs_logprob_diff"] = sums.get("abs_logprob_diff_max", 0.0)
    if "kl_ref_sum" in sums:
        metrics["train/kl_to_reference"] = sums["kl_ref_sum"] / tokens
    return metrics
