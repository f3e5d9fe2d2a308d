"""Benchmarks stage, `gymnb bench train`: where a GRPO step's time goes, against a bare forward/backward floor.

Runs a few real GRPO steps (server, environments, rollouts, optimizer step, refit) and splits each step into
generation (time inside the served model's forward), environment (rollout wall time outside it: environment
servers, agent loop, HTTP), forward/backward (the GRPO loss over all micro-batches), optimizer (gradient
clipping + AdamW) and refit. The floor is a bare forward/backward (cross-entropy on the same trainable tokens,
same micro-batches, no GRPO bookkeeping) on the step's own batch: `forward_backward / floor` is the loss
machinery's overhead, `step / floor` what the whole loop costs per unit of unavoidable training compute.
Results go to outputs/bench/train.json.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import ExitStack
from pathlib import Path

import torch

BENCH_OVERRIDES = ["validation.at_start=false", "validation.at_end=false", "validation.every_steps=0",
                   "checkpoint.every_steps=0", "checkpoint.save_final=false", "checkpoint.resume=false"]
PHASES = ("generation_s", "environment_s", "forward_backward_s", "optimizer_s", "refit_s")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gymnb bench train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/train/grpo_math_cpu.yaml", help="GRPO run config (YAML)")
    parser.add_argument("--steps", type=int, default=3, help="GRPO steps to time (default 3)")
    parser.add_argument("--out", default=None, help="JSON output (default outputs/bench/train.json)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return parser


def time_floor(model, batch, *, micro_batch_size: int, pad_token_id: int) -> float:
    """Seconds of a plain forward/backward (masked cross-entropy) over `batch`, gradients discarded.

    Like the trainer, it projects onto the vocabulary only from the first trainable column on, so the ratio
    to the floor measures the GRPO bookkeeping, not that shortcut. Eval mode (no dropout), as the trainer."""
    from gymnb.train.batching import iter_micro_batches

    model.eval()
    started = time.perf_counter()
    for mb in iter_micro_batches(batch, micro_batch_size, pad_token_id):
        start = max(int(mb.loss_mask.bool().any(0).nonzero()[0]), 1)
        keep = mb.input_ids.shape[1] - start + 1
        logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False,
                       logits_to_keep=keep).logits  # (B, keep, V)
        logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, mb.input_ids[:, start:, None]).squeeze(-1)
        loss = -(logp * mb.loss_mask[:, start:]).sum() / max(batch.num_trainable_tokens, 1)
        loss.backward()
    elapsed = time.perf_counter() - started
    model.zero_grad(set_to_none=True)
    return elapsed


def run_bench(cfg, steps: int) -> dict:
    from gymnb.train.grpo import (
        load_data,
        rows_for_step,
        run_step,
        seed_everything,
        setup_policy,
        start_stack,
    )

    seed_everything(cfg.seed)
    state = setup_policy(cfg)
    train_rows, _ = load_data(cfg)
    per_step = []
    with ExitStack() as stack:
        server, gym = start_stack(cfg, state, stack)
        for step in range(1, steps + 1):
            started = time.perf_counter()
            record = run_step(cfg, state, rows_for_step(train_rows, step, cfg.grpo.num_prompts_per_step, cfg.seed),
                              server, gym)
            step_s = time.perf_counter() - started
            floor = time_floor(state.loaded.model, state.last_batch, micro_batch_size=cfg.optimizer.micro_batch_size,
                               pad_token_id=state.loaded.tokenizer.pad_token_id) if state.last_batch.sequences else None
            per_step.append({"step": step, "step_s": step_s, "floor_s": floor,
                             **{p: record.get(f"timing/{p}") for p in PHASES},
                             "num_train_sequences": record.get("train/num_train_sequences"),
                             "num_trainable_tokens": record.get("train/num_trainable_tokens"),
                             "reward_mean": record.get("train/reward_mean")})
    return summarize(per_step)


def summarize(per_step: list[dict]) -> dict:
    """Means per phase, each phase's share of the step, and ratios to the floor (steps with a batch only)."""
    timed = [s for s in per_step if s["floor_s"]]
    mean = {k: sum(s[k] or 0.0 for s in timed) / len(timed) for k in ("step_s", "floor_s", *PHASES)} if timed else {}
    summary = {"steps": per_step, "mean": mean}
    if timed:
        summary["share_of_step"] = {p: mean[p] / mean["step_s"] for p in PHASES}
        summary["ratio_to_floor"] = {p: mean[p] / mean["floor_s"] for p in (*PHASES, "step_s")}
    return summary


def format_summary(summary: dict) -> str:
    if not summary.get("mean"):
        return "no step produced a training batch (every group had equal rewards); nothing to compare"
    mean, share, ratio = summary["mean"], summary["share_of_step"], summary["ratio_to_floor"]
    lines = [f"{'phase':<18}{'s/step':>10}{'share':>9}{'x floor':>10}"]
    for phase in PHASES:
        lines.append(f"{phase[:-2]:<18}{mean[phase]:>10.2f}{share[phase]:>9.1%}{ratio[phase]:>10.2f}")
    lines.append(f"{'whole step':<18}{mean['step_s']:>10.2f}{1:>9.1%}{ratio['step_s']:>10.2f}")
    lines.append(f"{'floor (bare fwd/bwd on the same batch)'}: {mean['floor_s']:.2f} s")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    from gymnb.core.config import REPO_ROOT, config_hash, config_to_dict, load_config
    from gymnb.train.config import GRPOConfig, resolve_config_path

    args = build_parser().parse_args(argv)
    if args.steps < 1:
        raise SystemExit("gymnb bench train: --steps must be >= 1")
    cfg = load_config(GRPOConfig, resolve_config_path(args.config),
                      BENCH_OVERRIDES + ["run_name=bench_train"] + list(args.overrides))
    summary = run_bench(cfg, args.steps)
    summary["config"] = config_to_dict(cfg)
    summary["config_hash"] = config_hash(cfg)
    out = Path(args.out) if args.out else REPO_ROOT / "outputs" / "bench" / "train.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    print(format_summary(summary))
    print(f"\nwritten: {out}")
    return 0
