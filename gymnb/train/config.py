"""Training stage, configuration: the typed GRPO run config (YAML in configs/train/, dotted overrides win).

Each field is documented here, where it is declared. Cross-field checks run at load time (`__post_init__`),
so a bad combination fails before any model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

ENVS = ("math_with_judge", "workplace_assistant")
WORKPLACE_TOOLS = ("all", "category", "reference")
LR_SCHEDULES = ("constant", "linear", "cosine")
# What the warm start's assistant says after its actions: no tool call, so the agent's loop ends (and no
# model call is spent until max_steps).
FINAL_TEXT = "Done."


@dataclass
class ModelSection:
    name: str = "smollm2-135m"  # preset (configs/models), local HF-format dir, or hub id
    dtype: str | None = None  # float32 | bfloat16 | float16; None = the preset's (the trainer's weights)
    # float32 | bfloat16; None = dtype. The dtype the policy server and the trainer's forward/backward compute
    # in: bfloat16 serves a bf16 copy of the weights (the CPU's AMX units) and scores it with the same bf16
    # forward, over float32 weights the optimizer updates (gymnb.train.loss.forward_in_dtype). Not exact:
    # bf16 rounding follows the evaluation order, so pair it with loss.importance_sampling=true.
    compute_dtype: str | None = None
    device: str | None = None  # cpu | cuda | cuda:N; None = the preset's
    threads: int | None = None  # torch intra-op threads for trainer and server; None = torch's default
    chat_template: str | None = None  # template name in configs/templates or a file; None = the preset's


@dataclass
class EnvSection:
    name: str = "math_with_judge"  # math_with_judge | workplace_assistant
    train_split: str = "train"  # split of gymnb.gym.data.load_rows
    validation_split: str = "validation"
    train_limit: int | None = None  # use only the first N training rows (None = all)
    validation_limit: int | None = None  # use only the first N validation rows (None = all)
    train_path: str | None = None  # a NeMo Gym rows JSONL to train on instead of the embedded split
    validation_path: str | None = None  # a NeMo Gym rows JSONL to validate on instead of the embedded split
    tiers: list[int] | None = None  # keep only rows whose `tier` is listed (embedded math: 0-3); None = all
    overrides: list[str] = field(default_factory=list)  # dotted NeMo Gym config overrides for start_gym
    # workplace_assistant only. all = NeMo Gym's rows (27 tools); category | reference = compact rows, a
    # DEPARTURE from NeMo Gym's rows (gymnb.gym.workplace.compact): category = the task category's tools + the
    # directory; reference = the tools of the task's reference solution + num_distractor_tools others.
    tools: str = "all"
    num_distractor_tools: int = 0  # tools=reference: extra tools drawn per row


@dataclass
class GenerationSection:
    temperature: float = 1.0  # sampling temperature of training rollouts (the trainer uses the same T)
    top_p: float = 1.0  # keep 1.0: truncated sampling makes generation log-probs differ from the trainer's
    max_new_tokens: int = 512  # max_output_tokens of each model call
    concurrency: int = 16  # rollouts in flight at once
    max_batch_size: int | None = None  # the policy server engine's batch limit (None = its default)


@dataclass
class GRPOSection:
    num_prompts_per_step: int = 8  # prompts per optimizer step
    group_size: int = 4  # rollouts per prompt (collect_rollouts num_repeats)
    max_steps: int = 25  # optimizer steps of the run
    leave_one_out_baseline: bool = True  # baseline = mean reward of the other samples of the prompt
    normalize_advantages_std: bool = True  # divide advantages by the group's reward std
    drop_uniform_groups: bool = False  # skip forward/backward of groups whose rewards are all equal
    max_seq_len: int | None = None  # skip rollouts longer than this many tokens (None = no limit)


@dataclass
class LossSection:
    clip_low: float = 0.2  # ratio clipped to [1 - clip_low, 1 + clip_high]
    clip_high: float = 0.2
    kl_coef: float = 0.0  # weight of the k3 KL to the initial policy (0 = no reference model is kept)
    importance_sampling: bool = False  # reweight tokens by exp(trainer_lp - generation_lp), truncated
    is_truncation: float = 2.0  # upper bound of the importance weight


@dataclass
class OptimizerSection:
    lr: float = 1e-6  # AdamW learning rate (peak, after warmup)
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0  # gradient clipping by global norm (0 = off)
    lr_schedule: str = "constant"  # constant | linear | cosine (decay to 0 at max_steps, after warmup)
    warmup_steps: int = 0
    micro_batch_size: int = 4  # sequences per forward/backward; gradients accumulate to one step


@dataclass
class WarmStartSection:
    """Supervised fine-tuning on reference-solution trajectories before the first GRPO step
    (gymnb.train.warm_start; embedded workplace_assistant rows only)."""

    num_trajectories: int = 0  # the first N training rows' reference solutions (0 = no warm start)
    epochs: int = 1  # passes over the trajectories
    batch_size: int = 8  # trajectories per optimizer step
    micro_batch_size: int = 2  # trajectories per forward/backward
    lr: float = 1e-4  # AdamW, constant
    max_grad_norm: float = 1.0
    final_text: str = FINAL_TEXT  # the closing assistant turn after the actions (ends the agent's loop)


@dataclass
class ValidationSection:
    every_steps: int = 10  # validate every N steps (0 = only at start and end)
    at_start: bool = True  # validate before the first step (the baseline)
    at_end: bool = True  # validate after the last step
    num_repeats: int = 1  # samples per validation prompt (mean@k)
    temperature: float = 0.0  # 0 = greedy
    max_new_tokens: int | None = None  # None = generation.max_new_tokens


@dataclass
class CheckpointSection:
    every_steps: int = 10  # save every N steps (0 = only at the end)
    keep_last: int = 2  # older step checkpoints are deleted
    resume: bool = True  # continue from the latest checkpoint in the run directory, if any
    save_final: bool = True  # also save the final weights (HF format) under <run>/final


@dataclass
class GRPOConfig:
    run_name: str = "grpo"  # outputs go to <output_dir>/<run_name>
    output_dir: str = "outputs/train"  # relative paths are relative to the repository root
    seed: int = 0
    model: ModelSection = field(default_factory=ModelSection)
    env: EnvSection = field(default_factory=EnvSection)
    generation: GenerationSection = field(default_factory=GenerationSection)
    grpo: GRPOSection = field(default_factory=GRPOSection)
    loss: LossSection = field(default_factory=LossSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    validation: ValidationSection = field(default_factory=ValidationSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    warm_start: WarmStartSection = field(default_factory=WarmStartSection)

    def __post_init__(self):
        if self.env.name not in ENVS:
            raise ValueError(f"env.name={self.env.name!r}: expected one of {list(ENVS)}")
        if self.optimizer.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"optimizer.lr_schedule={self.optimizer.lr_schedule!r}: expected {list(LR_SCHEDULES)}")
        if self.model.compute_dtype not in (None, "float32", "bfloat16"):
            raise ValueError(f"model.compute_dtype={self.model.compute_dtype!r}: expected float32 or bfloat16")
        if self.env.tools not in WORKPLACE_TOOLS:
            raise ValueError(f"env.tools={self.env.tools!r}: expected one of {list(WORKPLACE_TOOLS)}")
        workplace = self.env.name == "workplace_assistant"
        checks = [
            (workplace or self.env.tools == "all", "env.tools applies to workplace_assistant only"),
            (workplace or self.warm_start.num_trajectories == 0,
             "warm_start needs reference solutions: embedded workplace_assistant rows only"),
            (self.warm_start.num_trajectories == 0 or self.env.train_path is None,
             ("warm_start needs reference solutions, which only the embedded workplace rows carry: unset "
              "env.train_path or set warm_start.num_trajectories=0")),
            (self.env.num_distractor_tools >= 0, "env.num_distractor_tools must be >= 0"),
            (self.warm_start.num_trajectories >= 0, "warm_start.num_trajectories must be >= 0"),
            (self.warm_start.batch_size >= 1 and self.warm_start.micro_batch_size >= 1,
             "warm_start.batch_size and micro_batch_size must be >= 1"),
            (self.warm_start.epochs >= 1, "warm_start.epochs must be >= 1"),
            (self.grpo.group_size >= 2, "grpo.group_size must be >= 2 (the baseline needs other samples)"),
            (self.grpo.num_prompts_per_step >= 1, "grpo.num_prompts_per_step must be >= 1"),
            (self.grpo.max_steps >= 0, "grpo.max_steps must be >= 0"),
            (self.optimizer.micro_batch_size >= 1, "optimizer.micro_batch_size must be >= 1"),
            (self.optimizer.lr > 0, "optimizer.lr must be > 0"),
            (0 < self.generation.top_p <= 1, "generation.top_p must be in (0, 1]"),
            (self.generation.temperature >= 0, "generation.temperature must be >= 0"),
            (self.generation.max_new_tokens >= 1, "generation.max_new_tokens must be >= 1"),
            (self.loss.clip_low >= 0 and self.loss.clip_high >= 0, "loss.clip_low/clip_high must be >= 0"),
            (self.loss.kl_coef >= 0, "loss.kl_coef must be >= 0"),
            (self.validation.num_repeats >= 1, "validation.num_repeats must be >= 1"),
            (self.validation.every_steps >= 0, "validation.every_steps must be >= 0"),
            (self.checkpoint.every_steps >= 0, "checkpoint.every_steps must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


def resolve_config_path(config: str | Path) -> Path:
    """A train config given as a path, or as a name in configs/train with or without `.yaml`
    (`grpo_math_cpu`, `grpo_math_cpu.yaml`, `configs/train/grpo_math_cpu.yaml`)."""
    from gymnb.core.config import CONFIGS_DIR

    path = Path(config)
    if path.is_file():
        return path
    folder = CONFIGS_DIR / "train"
    for candidate in (folder / path.name, folder / f"{path.name}.yaml"):
        if candidate.is_file():
            return candidate
    names = ", ".join(sorted(p.stem for p in folder.glob("*.yaml")))
    raise FileNotFoundError(f"train config {config} not found: not a file, and configs/train has {names}")
