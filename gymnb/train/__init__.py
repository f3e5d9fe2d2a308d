"""Training stage: the reference GRPO loop (`gymnb train --config configs/train/NAME.yaml [key=value ...]`).

Modules: config (typed GRPOConfig), loss (advantages, token log-probs, clipped loss), batching (rollouts ->
tensors), step (one optimizer step), grpo (the loop with on-policy refit), checkpoint, metrics.
"""

from __future__ import annotations

import argparse
import json


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gymnb train",
        description="Train with gymnb's GRPO loop: rollouts from NeMo-Gym-compatible environments through the "
                    "in-process policy server, one optimizer step per batch, refit after every step.")
    parser.add_argument("--config", required=True,
                        help="YAML run config: a path, or a name in configs/train (grpo_math_cpu); see "
                             "gymnb/train/config.py")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides that win over the file, e.g. grpo.max_steps=5 optimizer.lr=1e-5")
    return parser


def main(argv: list[str]) -> int:
    from gymnb.core.config import load_config
    from gymnb.core.errors import ConfigError
    from gymnb.train.config import GRPOConfig, resolve_config_path
    from gymnb.train.grpo import train

    args = build_parser().parse_args(argv)
    try:
        path = resolve_config_path(args.config)
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from None
    cfg = load_config(GRPOConfig, path, args.overrides)
    result = train(cfg, progress=not args.no_progress)
    summary = summarize_run(result.metrics)
    print(json.dumps({"run_dir": str(result.run_dir), "final_step": result.final_step,
                      "resumed_from": result.resumed_from, **summary}, indent=2))
    return 0


def summarize_run(metrics: list[dict]) -> dict:
    """First and last validation accuracy and the median token_mult_prob_error of a run's metrics."""
    from gymnb.train.metrics import median

    validations = [m for m in metrics if "validation/accuracy" in m]
    errors = [m["train/token_mult_prob_error"] for m in metrics if "train/token_mult_prob_error" in m]
    summary = {"median_token_mult_prob_error": median(errors) if errors else None}
    if validations:
        summary["validation_first"] = {"step": validations[0]["step"],
                                       "accuracy": validations[0]["validation/accuracy"]}
        summary["validation_last"] = {"step": validations[-1]["step"],
                                      "accuracy": validations[-1]["validation/accuracy"]}
    return summary
