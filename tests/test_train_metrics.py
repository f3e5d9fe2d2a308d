"""Training stage, metrics: the share of GRPO groups with a gradient, on hand-built rollouts; the generation
timer on a real engine."""

from __future__ import annotations

from gymnb.train.metrics import mixed_group_share, rollout_stats


def rollout(task: int, reward: float) -> dict:
    return {"_ng_task_index": task, "reward": reward}


def test_mixed_group_share_counts_prompts_whose_rewards_differ():
    results = [rollout(0, 0.0), rollout(0, 1.0), rollout(1, 1.0), rollout(1, 1.0), rollout(2, 0.0), rollout(2, 0.0),
               rollout(3, 0.5), rollout(3, 0.0), rollout(3, 0.5)]
    assert mixed_group_share(results) == 2 / 4  # prompts 0 and 3 differ; 1 (all 1) and 2 (all 0) do not
    assert mixed_group_share([rollout(7, 1.0)]) == 0.0  # one sample: nothing to compare
    assert mixed_group_share([]) == 0.0


def test_rollout_stats_logs_the_share_under_its_prefix():
    stats = rollout_stats([rollout(0, 0.0), rollout(0, 1.0), rollout(1, 0.0), rollout(1, 0.0)], [], "train")
    assert stats["train/mixed_group_share"] == 0.5


def test_forward_timer_sees_every_pass_of_the_engine_lean_decode_included(tiny_model_dir):
    """A clock that ticks once per reading: the timer's seconds then count the passes it saw, which must be
    every prefill and every decode step (the lean decode step bypasses the model's own forward)."""
    import itertools

    from gymnb.core.models import load_model
    from gymnb.policy.engine import GenerationEngine, SamplingParams
    from gymnb.train.metrics import ForwardTimer

    loaded = load_model(str(tiny_model_dir), max_model_len=512)
    engine = GenerationEngine(loaded, prefix_cache_bytes=0)
    timer = ForwardTimer(engine.model)
    ticks = itertools.count()
    timer._clock = lambda: float(next(ticks))
    try:
        assert engine.lean is not None
        params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
        engine.generate_batch([[1, 2, 3], [4, 5]], params)
    finally:
        engine.close()
        timer.remove()
    assert timer.take() == engine.stats["prefills"] + engine.stats["decode_steps"] > 2
