"""Training stage, the GRPO loop: rollouts from NeMo-Gym-compatible environments -> one optimizer step -> refit.

Each step: collect `group_size` rollouts for each of `num_prompts_per_step` prompts through the environment's
agent (`collect_rollouts`, num_repeats = group size), whose model calls go to gymnb's policy server; turn them
into token sequences whose trainable tokens are exactly the sampled ids (batching.py); take one AdamW step on
the clipped, token-averaged policy-gradient loss (step.py); then refit: copy the trainer's weights into the
server, so the next rollouts are sampled from the updated policy (on-policy). The server holds its own copy of
the weights, as a separate inference engine would, so a refit that silently fails shows up as a rising
token_mult_prob_error instead of being masked by shared tensors.
"""

from __future__ import annotations

import copy
import dataclasses
import random
import shutil
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gymnb.core.config import REPO_ROOT, save_resolved_config
from gymnb.core.errors import TrainingError
from gymnb.gym.data import read_rows
from gymnb.train import checkpoint as ckpt
from gymnb.train.batching import build_train_batch
from gymnb.train.config import GRPOConfig
from gymnb.train.metrics import ForwardTimer, MetricsLog, rollout_stats
from gymnb.train.step import make_optimizer, make_scheduler, train_step

__all__ = ["GRPOConfig", "TrainResult", "resolve_run_dir", "train"]


@dataclass
class TrainState:
    """Everything the loop mutates: the policy, its optimizer and schedule, the frozen reference, the step."""

    loaded: object  # gymnb.core.models.LoadedModel (trainer copy)
    optimizer: torch.optim.Optimizer
    scheduler: object
    reference: torch.nn.Module | None
    step: int = 0
    generation_timer: object | None = None  # metrics.ForwardTimer on the server's model copy
    last_batch: object | None = None  # batching.TrainBatch of the latest step (for `gymnb bench train`)


@dataclass
class TrainResult:
    run_dir: Path
    metrics: list[dict]
    final_step: int
    resumed_from: int | None


def resolve_run_dir(cfg: GRPOConfig) -> Path:
    root = Path(cfg.output_dir)
    return (root if root.is_absolute() else REPO_ROOT / root) / cfg.run_name


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup_policy(cfg: GRPOConfig, model_name: str | None = None) -> TrainState:
    """The trainer's policy from `model_name` (default cfg.model.name; the warm-start directory if any)."""
    from gymnb.core.models import load_model

    loaded = load_model(model_name or cfg.model.name, dtype=cfg.model.dtype, device=cfg.model.device,
                        threads=cfg.model.threads, chat_template=cfg.model.chat_template)
    model = loaded.model
    model.eval()  # no dropout: trainer log-probs must match the server's on the same weights
    for p in model.parameters():
        p.requires_grad_(True)
    optimizer = make_optimizer(model, cfg.optimizer)
    scheduler = make_scheduler(optimizer, cfg.optimizer, cfg.grpo.max_steps)
    reference = None
    if cfg.loss.kl_coef > 0:
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    return TrainState(loaded, optimizer, scheduler, reference)


def maybe_resume(cfg: GRPOConfig, run_dir: Path, state: TrainState) -> int | None:
    """Load the latest checkpoint of `run_dir` when resuming is on; return its step (None = fresh run)."""
    if not cfg.checkpoint.resume:
        return None
    found = ckpt.latest_checkpoint(run_dir)
    if found is None:
        return None
    state.step = ckpt.load_checkpoint(found[1], state.loaded.model, state.optimizer, state.scheduler)
    return state.step


def clear_run_outputs(run_dir: Path) -> None:
    """A fresh run replaces an earlier run of the same name: its checkpoints would otherwise be resumed
    later, and its validation samples mixed into this run's before/after statistics."""
    for name in ("checkpoints", "validation", "final"):
        shutil.rmtree(run_dir / name, ignore_errors=True)


def rows_for_step(rows: list[dict], step: int, num_prompts: int, seed: int) -> list[dict]:
    """Prompts of step `step` (1-based): consecutive slices of per-epoch shuffles. Pure in (step, seed), so a
    resumed run sees the same prompts an uninterrupted one would."""
    start = (step - 1) * num_prompts
    picked = []
    for position in range(start, start + num_prompts):
        epoch, offset = divmod(position, len(rows))
        order = np.random.default_rng(seed + epoch).permutation(len(rows))
        picked.append(rows[int(order[offset])])
    return picked


def load_data(cfg: GRPOConfig) -> tuple[list[dict], list[dict]]:
    train_rows = read_rows(cfg.env.name, cfg.env.train_path, cfg.env.train_split, None)
    val_rows = read_rows(cfg.env.name, cfg.env.validation_path, cfg.env.validation_split, None)
    if cfg.env.tiers is not None:
        keep = set(cfg.env.tiers)
        train_rows = [r for r in train_rows if r.get("tier") in keep]
        val_rows = [r for r in val_rows if r.get("tier") in keep]
    train_rows = train_rows[:cfg.env.train_limit] if cfg.env.train_limit else train_rows
    val_rows = val_rows[:cfg.env.validation_limit] if cfg.env.validation_limit else val_rows
    if cfg.env.tools != "all":  # compact workplace rows: a departure from NeMo Gym's, labelled in each row
        from gymnb.gym.workplace.compact import compact_rows
        from gymnb.train.warm_start import solutions_for

        for rows, split, path in ((train_rows, cfg.env.train_split, cfg.env.train_path),
                                  (val_rows, cfg.env.validation_split, cfg.env.validation_path)):
            rows[:] = compact_rows(rows, cfg.env.tools, solutions=solutions_for(rows, split, path),
                                   num_distractors=cfg.env.num_distractor_tools, seed=cfg.seed)
    if not train_rows:
        raise TrainingError(f"no training rows for env {cfg.env.name!r} "
                            f"({cfg.env.train_path or 'split ' + repr(cfg.env.train_split)})")
    return train_rows, val_rows


def start_stack(cfg: GRPOConfig, state: TrainState, stack: ExitStack):
    """The policy server (own copy of the weights) and the environment servers, on free loopback ports."""
    from gymnb.gym import start_gym
    from gymnb.policy.server import PolicyServer

    engine_opts = {}
    if cfg.generation.max_batch_size:
        engine_opts["max_batch_size"] = cfg.generation.max_batch_size
    served_model = copy.deepcopy(state.loaded.model).eval().requires_grad_(False)
    if cfg.model.compute_dtype:  # refits copy the trainer's weights in, rounded to this dtype
        served_model.to(getattr(torch, cfg.model.compute_dtype))
    served = dataclasses.replace(state.loaded, model=served_model)
    state.generation_timer = ForwardTimer(served.model)
    server = stack.enter_context(PolicyServer.start(served, model_id=cfg.model.name, **engine_opts))
    gym = stack.enter_context(start_gym([cfg.env.name], policy_base_url=server.base_url,
                                        policy_model_name=server.model_id, overrides=list(cfg.env.overrides)))
    return server, gym


def collect(rows: list[dict], gym, *, num_repeats: int, temperature: float, top_p: float, max_new_tokens: int,
            concurrency: int, seed: int, out_path: Path | None = None, progress: bool = False):
    """Rollouts through the environment's agents; each rollout samples with its own seed (seed + index)."""
    from gymnb.rollouts.collect import collect_rollouts_sync

    overrides = {"temperature": temperature, "top_p": top_p, "max_output_tokens": max_new_tokens}
    return collect_rollouts_sync(rows, head_url=gym.head_url, num_repeats=num_repeats, concurrency=concurrency,
                                 overrides=overrides, out_path=out_path, seed=seed, progress=progress)


def rollout_seed(cfg: GRPOConfig, step: int) -> int:
    """Disjoint per-step seed ranges (step 0 = validation), so a resumed run samples what a fresh one would."""
    return cfg.seed * 1_000_000_007 + step * 100_003


def validate(cfg: GRPOConfig, rows: list[dict], gym, run_dir: Path, step: int, progress: bool = False) -> dict:
    """Mean reward over the validation rollouts; per-sample rewards saved for paired before/after statistics."""
    if not rows:
        return {}
    started = time.perf_counter()
    out = run_dir / "validation" / f"step_{step:06d}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    run = collect(rows, gym, num_repeats=cfg.validation.num_repeats, temperature=cfg.validation.temperature,
                  top_p=1.0, max_new_tokens=cfg.validation.max_new_tokens or cfg.generation.max_new_tokens,
                  concurrency=cfg.generation.concurrency, seed=rollout_seed(cfg, 0), out_path=out,
                  progress=progress)
    record = rollout_stats(run.results, run.failures, "validation")
    record["timing/validation_s"] = time.perf_counter() - started
    return record


def run_step(cfg: GRPOConfig, state: TrainState, rows: list[dict], server, gym) -> dict:
    """One GRPO step: rollouts -> batch -> optimizer step -> refit. Returns the step's metrics."""
    timings = {}
    timer = state.generation_timer
    if timer is not None:
        timer.take()
    started = time.perf_counter()
    run = collect(rows, gym, num_repeats=cfg.grpo.group_size, temperature=cfg.generation.temperature,
                  top_p=cfg.generation.top_p, max_new_tokens=cfg.generation.max_new_tokens,
                  concurrency=cfg.generation.concurrency, seed=rollout_seed(cfg, state.step + 1))
    timings["timing/rollouts_s"] = time.perf_counter() - started
    if timer is not None:
        timings["timing/generation_s"] = timer.take()
        timings["timing/environment_s"] = max(timings["timing/rollouts_s"] - timings["timing/generation_s"], 0.0)
    if not run.results:
        first = run.failures[0] if run.failures else {}
        raise TrainingError(f"step {state.step + 1}: all {len(run.failures)} rollouts failed; first failure "
                            f"({first.get('error_class')}): {first.get('message', first)}")
    tokenizer = state.loaded.tokenizer
    batch = build_train_batch(run.results, tokenizer, leave_one_out=cfg.grpo.leave_one_out_baseline,
                              normalize_std=cfg.grpo.normalize_advantages_std,
                              drop_uniform_groups=cfg.grpo.drop_uniform_groups, max_seq_len=cfg.grpo.max_seq_len)
    record = rollout_stats(run.results, run.failures, "train")
    record["train/num_skipped_rollouts"] = len(batch.skipped)
    record["train/num_train_sequences"] = len(batch.sequences)
    state.last_batch = batch
    started = time.perf_counter()
    if batch.sequences:
        record.update(train_step(
            state.loaded.model, state.optimizer, state.scheduler, batch,
            micro_batch_size=cfg.optimizer.micro_batch_size, temperature=cfg.generation.temperature,
            pad_token_id=tokenizer.pad_token_id, loss_cfg=cfg.loss, max_grad_norm=cfg.optimizer.max_grad_norm,
            reference_model=state.reference,
            compute_dtype=getattr(torch, cfg.model.compute_dtype) if cfg.model.compute_dtype else None))
    else:  # every group uniform: no gradient; keep the schedule in step with the step count
        state.scheduler.step()
    timings["timing/train_s"] = time.perf_counter() - started
    started = time.perf_counter()
    if batch.sequences:  # unchanged weights need no refit (and keep the server's prefix cache warm)
        server.update_weights(state.loaded.model.state_dict())
    timings["timing/refit_s"] = time.perf_counter() - started
    state.step += 1
    return {**record, **timings}


def is_validation_step(cfg: GRPOConfig, step: int) -> bool:
    every = cfg.validation.every_steps
    return (every > 0 and step % every == 0) or (cfg.validation.at_end and step == cfg.grpo.max_steps)


def is_checkpoint_step(cfg: GRPOConfig, step: int) -> bool:
    every = cfg.checkpoint.every_steps
    return (every > 0 and step % every == 0) or step == cfg.grpo.max_steps


def train(cfg: GRPOConfig, *, progress: bool = True) -> TrainResult:
    """Run (or resume) a GRPO run; metrics, checkpoints and the resolved config go to the run directory."""
    from tqdm.auto import tqdm

    run_dir = resolve_run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_resolved_config(cfg, run_dir)
    seed_everything(cfg.seed)
    train_rows, val_rows = load_data(cfg)
    policy_name = None
    if cfg.warm_start.num_trajectories:
        from gymnb.train.warm_start import run_warm_start

        policy_name = str(run_warm_start(cfg, run_dir, train_rows, progress=progress))
        seed_everything(cfg.seed)  # GRPO starts from the same RNG state with or without a warm start
    state = setup_policy(cfg, policy_name)
    if cfg.env.name == "workplace_assistant":  # a local dir's own template may not show the tools
        from gymnb.train.warm_start import check_template_renders_tools

        check_template_renders_tools(state.loaded.tokenizer, policy_name or cfg.model.name)
    resumed = maybe_resume(cfg, run_dir, state)
    if resumed is None:
        clear_run_outputs(run_dir)
    log = MetricsLog(run_dir / "metrics.jsonl", resume_step=resumed)
    with ExitStack() as stack:
        server, gym = start_stack(cfg, state, stack)
        if resumed:
            server.update_weights(state.loaded.model.state_dict())
        if state.step == 0 and cfg.validation.at_start:
            log.append({"step": 0, **validate(cfg, val_rows, gym, run_dir, 0, progress)})
        bar = tqdm(total=cfg.grpo.max_steps, initial=state.step, desc=f"grpo {cfg.run_name}", disable=not progress)
        while state.step < cfg.grpo.max_steps:
            step_started = time.perf_counter()
            rows = rows_for_step(train_rows, state.step + 1, cfg.grpo.num_prompts_per_step, cfg.seed)
            record = {"step": state.step + 1, **run_step(cfg, state, rows, server, gym)}
            if is_validation_step(cfg, state.step):
                record.update(validate(cfg, val_rows, gym, run_dir, state.step, progress))
            if is_checkpoint_step(cfg, state.step):
                ckpt.save_checkpoint(run_dir, state.step, state.loaded.model, state.loaded.tokenizer,
                                     state.optimizer, state.scheduler, cfg.checkpoint.keep_last)
            record["timing/step_s"] = time.perf_counter() - step_started
            log.append(record)
            bar.update(1)
            bar.set_postfix(progress_postfix(record))
        bar.close()
    if cfg.checkpoint.save_final and state.step > 0:
        state.loaded.model.save_pretrained(run_dir / "final")
        state.loaded.tokenizer.save_pretrained(run_dir / "final")
    return TrainResult(run_dir, log.read(), state.step, resumed)


def progress_postfix(record: dict) -> dict:
    keys = {"train/reward_mean": "reward", "train/token_mult_prob_error": "mult_err",
            "validation/accuracy": "val_acc"}
    return {short: f"{record[k]:.3f}" for k, short in keys.items() if k in record}
