"""The GRPO loop end to end on the real stack (policy server, math environment, rollouts), then resume.

A scripted tiny model that knows the answers to two questions, sampled at temperature 1, gives groups
with mixed rewards, so steps carry real gradients. Everything runs in-process on loopback ports.
"""

from __future__ import annotations

import pytest
import torch

from gymnb.core.config import load_config
from gymnb.core.errors import ConfigError
from gymnb.train.config import GRPOConfig


def make_cfg(model_dir, rows_file, out_dir, **extra) -> GRPOConfig:
    overrides = {
        "run_name": "loop", "output_dir": str(out_dir), "model.name": str(model_dir), "model.threads": 1,
        "env.train_path": str(rows_file), "env.validation_path": str(rows_file),
        "generation.temperature": 1.0, "generation.max_new_tokens": 8, "generation.concurrency": 8,
        "grpo.num_prompts_per_step": 2, "grpo.group_size": 4, "grpo.max_steps": 2,
        "optimizer.lr": 1e-3, "optimizer.micro_batch_size": 4, "validation.every_steps": 0,
        "checkpoint.every_steps": 1, "checkpoint.keep_last": 1, **extra,
    }
    return load_config(GRPOConfig, None, [f"{k}={v}" for k, v in overrides.items()])


def test_grpo_loop_trains_on_policy_and_resumes_from_the_saved_step(scripted_math_model, rows_file, tmp_path):
    from gymnb.train.grpo import train

    first = train(make_cfg(scripted_math_model, rows_file, tmp_path), progress=False)
    assert first.final_step == 2 and first.resumed_from is None
    assert [m["step"] for m in first.metrics] == [0, 1, 2]
    assert first.metrics[0]["validation/num_samples"] == 2  # baseline before any step
    trained = [m for m in first.metrics if "train/token_mult_prob_error" in m]
    assert trained, "no step had a group with mixed rewards"
    for m in trained:
        # the server samples from exactly the weights the trainer holds: refit after every step works
        assert m["train/token_mult_prob_error"] == pytest.approx(1.0, abs=1e-3)
        assert m["train/grad_norm"] > 0
        assert m["timing/generation_s"] > 0 and m["timing/refit_s"] >= 0
    assert "validation/accuracy" in first.metrics[-1]
    run_dir = first.run_dir
    assert (run_dir / "config.yaml").read_text().count("config_hash") == 1
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_000002"]  # keep_last=1
    assert (run_dir / "final" / "config.json").exists()

    resumed = train(make_cfg(scripted_math_model, rows_file, tmp_path, **{"grpo.max_steps": 3}), progress=False)
    assert resumed.resumed_from == 2 and resumed.final_step == 3
    assert [m["step"] for m in resumed.metrics] == [0, 1, 2, 3]
    assert resumed.metrics[:3] == first.metrics  # earlier steps were not re-run
    saved = torch.load(run_dir / "checkpoints" / "step_000003" / "trainer.pt", weights_only=False)
    assert saved["scheduler"]["last_epoch"] == 3  # the schedule continued from step 2, not from 0
    adam_steps = {float(s["step"]) for s in saved["optimizer"]["state"].values()}
    steps_with_batches = sum("train/grad_norm" in m for m in resumed.metrics)
    assert adam_steps == {float(steps_with_batches)}  # optimizer moments carried over the restart

    # resume off: a fresh run of the same name replaces the old one instead of mixing with it
    fresh = train(make_cfg(scripted_math_model, rows_file, tmp_path, **{"grpo.max_steps": 1,
                                                                          "checkpoint.resume": False}),
                  progress=False)
    assert fresh.resumed_from is None and [m["step"] for m in fresh.metrics] == [0, 1]
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_000001"]
    assert sorted(p.name for p in (run_dir / "validation").glob("step_??????.jsonl")) == [
        "step_000000.jsonl", "step_000001.jsonl"]


def test_checkpoint_round_trip_restores_weights_optimizer_and_rng(tiny_model_dir, tmp_path):
    from gymnb.core.models import load_model
    from gymnb.train import checkpoint as ckpt
    from gymnb.train.config import OptimizerSection
    from gymnb.train.step import make_optimizer, make_scheduler

    loaded = load_model(str(tiny_model_dir))
    model = loaded.model
    opt_cfg = OptimizerSection(lr=1e-2)
    optimizer = make_optimizer(model, opt_cfg)
    scheduler = make_scheduler(optimizer, opt_cfg, 10)
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    optimizer.step()
    scheduler.step()
    ckpt.save_checkpoint(tmp_path, 1, model, loaded.tokenizer, optimizer, scheduler)
    expected_random = torch.rand(3)

    fresh = load_model(str(tiny_model_dir)).model
    fresh_opt = make_optimizer(fresh, opt_cfg)
    fresh_sched = make_scheduler(fresh_opt, opt_cfg, 10)
    step = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path)[1], fresh, fresh_opt, fresh_sched)
    assert step == 1
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    assert fresh.lm_head.weight.data_ptr() == fresh.model.embed_tokens.weight.data_ptr()  # still tied
    assert fresh_opt.state_dict()["state"][0]["step"] == 1 and fresh_sched.last_epoch == 1
    torch.testing.assert_close(torch.rand(3), expected_random)


def test_bad_config_fails_before_loading_anything(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("grpo:\n  group_size: 1\n")
    with pytest.raises(ConfigError, match="group_size must be >= 2"):
        load_config(GRPOConfig, bad)
    with pytest.raises(ConfigError, match="'optimizer.learning_rate'"):
        load_config(GRPOConfig, None, ["optimizer.learning_rate=1e-5"])
    with pytest.raises(ConfigError, match="env.name"):
        load_config(GRPOConfig, None, ["env.name=chess"])
