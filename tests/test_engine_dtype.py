"""bf16: a bf16 engine agrees with a trainer computing in bf16 within a tolerance; float32 stays exact.

The trainer keeps float32 weights and runs its forward on their bf16 rounding (`compute_dtype`), which is what
an engine loaded in bf16 holds, so the two see the same weights and kernels and differ only by the engine's
incremental (KV-cached, batched) evaluation order. On a 2-layer model that leaves the bf16 pairing closer than
bf16 vs float32; 30 layers deep (SmolLM2-135M) it does not (see the README), which is why float32 is the default.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
import torch

from gymnb.bench.http_load import busy_core
from gymnb.core.models import load_model
from gymnb.policy.cpu_threads import (
    ThreadBudget,
    adaptive_team,
    single_team_for_engine,
    threads_for,
    usable_cpus,
)
from gymnb.policy.engine import GenerationEngine, SamplingParams
from gymnb.train.batching import Sequence, TrainBatch
from gymnb.train.config import GRPOConfig, LossSection, ModelSection, OptimizerSection
from gymnb.train.step import make_optimizer, make_scheduler, train_step

PROMPTS = ["Hi", "Tell me a story about a cat", "2+2=", "Why is the sky blue?", "List three fruits", "Bye"]


@pytest.fixture(scope="module")
def trainer(tiny_model_dir):
    return load_model(str(tiny_model_dir), max_model_len=512)  # float32 weights


def generate(tiny_model_dir, dtype: str) -> list[tuple[list[int], list[int], list[float]]]:
    """(prompt ids, generated ids, generation log-probs) of every prompt, sampled by an engine in `dtype`."""
    loaded = load_model(str(tiny_model_dir), dtype=dtype, max_model_len=512)
    engine = GenerationEngine(loaded, max_batch_size=8)
    try:
        prompts = [loaded.tokenizer.encode(p) for p in PROMPTS]
        results = engine.generate_batch(prompts, SamplingParams(max_tokens=24, temperature=1.0, seed=3,
                                                                ignore_eos=True))
    finally:
        engine.close()
    return [(p, g[0].token_ids, g[0].log_probs) for p, g in zip(prompts, results, strict=True)]


def mult_prob_error(model, generations, compute_dtype=None) -> float:
    """The figure `gymnb bench logprobs` reports, so the test and the bench measure the same thing."""
    from gymnb.bench.logprobs import mult_prob_error as bench_error

    return bench_error(model, generations, compute_dtype)["token_mult_prob_error"]


def test_bf16_engine_matches_a_bf16_trainer_and_float32_stays_exact(tiny_model_dir, trainer):
    bf16 = generate(tiny_model_dir, "bfloat16")
    same_dtype = mult_prob_error(trainer.model, bf16, compute_dtype=torch.bfloat16)
    cross_dtype = mult_prob_error(trainer.model, bf16)
    assert same_dtype <= 1.002
    assert same_dtype < cross_dtype  # the bf16 trainer is the closer match, not merely a loose tolerance
    f32 = generate(tiny_model_dir, "float32")
    assert mult_prob_error(trainer.model, f32) <= 1.0 + 1e-4


def test_bf16_compute_trains_the_float32_weights(tiny_model_dir):
    """Updates far below bf16's resolution of a weight still land: the optimizer steps float32 weights."""
    model = load_model(str(tiny_model_dir)).model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = list(range(20, 40))
    batch = TrainBatch([Sequence(ids, [False] * 10 + [True] * 10, [0.0] * 20, 1.0, 0),
                        Sequence(ids[::-1], [False] * 10 + [True] * 10, [0.0] * 20, 0.0, 0)],
                       torch.tensor([1.0, -1.0]))
    opt_cfg = OptimizerSection(lr=1e-5, weight_decay=0.0)
    optimizer = make_optimizer(model, opt_cfg)
    train_step(model, optimizer, make_scheduler(optimizer, opt_cfg, 1), batch, micro_batch_size=2,
               temperature=1.0, pad_token_id=0, loss_cfg=LossSection(), max_grad_norm=0.0,
               compute_dtype=torch.bfloat16)
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32
        assert not torch.equal(p.detach(), before[name]), name


def test_compute_dtype_is_checked_at_config_load():
    with pytest.raises(ValueError, match="model.compute_dtype"):
        GRPOConfig(model=ModelSection(compute_dtype="int8"))


def test_thread_team_leaves_busy_cores_to_other_processes():
    assert threads_for(others_cpus=1.0, cpus=2, max_threads=2) == 1  # a CPU-bound neighbour on one core
    assert threads_for(others_cpus=0.15, cpus=2, max_threads=2) == 2  # an HTTP client's share: keep both
    assert threads_for(others_cpus=9.0, cpus=2, max_threads=2) == 1  # never below one thread
    assert threads_for(others_cpus=0.0, cpus=8, max_threads=4) == 4  # never above the configured team


def test_thread_budget_resizes_only_the_calling_thread():
    """The engine's worker resizes its own team; a trainer on another thread keeps its thread count."""
    caller_threads = torch.get_num_threads()
    torch.set_num_threads(caller_threads)  # as load_model(threads=) and a trainer's own setting do
    seen = {}

    def worker():
        budget = ThreadBudget(max_threads=1)
        seen["team"] = budget.adjust()
        seen["torch"] = torch.get_num_threads()

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == {"team": 1, "torch": 1}
    assert torch.get_num_threads() == caller_threads


def test_a_trainers_team_gives_a_busy_core_back_from_its_first_op_and_is_restored_after():
    """Layer 05 and the GRPO step start computing at once: the team is sized from a reading taken on entry,
    with a real CPU-bound process on one core, not after the first interval."""
    caller_threads = torch.get_num_threads()
    cpus = usable_cpus()
    try:
        torch.set_num_threads(cpus)
        with busy_core(0), adaptive_team() as team:
            sizes = [team.threads, torch.get_num_threads()]
        assert team.others_cpus >= 0.7  # the neighbour's core, seen in the first 0.1 s
        assert sizes[0] == sizes[1] <= max(cpus - 1, 1)
        assert torch.get_num_threads() == cpus  # the caller's own size, restored
    finally:
        torch.set_num_threads(caller_threads)


BURN_FOR_1_5_S = """
import time
start = time.monotonic()
while time.monotonic() - start < 1.5:
    pass
"""


def test_after_an_idle_gap_the_team_follows_what_others_use_now_not_during_the_gap():
    """An idle server's first reading would span the gap; a neighbour that computed then and stopped (the
    previous server of a benchmark) must not take a core from the first step after it."""
    cpus = usable_cpus()
    if cpus < 2:
        pytest.skip("needs two CPUs: one for the neighbour, one left")  # CI and dev machines have 2
    caller_threads = torch.get_num_threads()
    try:
        budget = ThreadBudget(max_threads=2, interval=0.2)
        assert budget.adjust() == 2
        neighbour = subprocess.Popen([sys.executable, "-c", BURN_FOR_1_5_S])
        neighbour.wait()  # it used a whole core for 1.5 s (over 2 intervals), then ended
        assert budget.adjust() == 2 and budget.others_cpus < 0.3
        with busy_core(0):  # and a neighbour that is there now still takes its core
            time.sleep(1.0)
            assert budget.adjust() == 1 and budget.others_cpus >= 0.7
    finally:
        torch.set_num_threads(caller_threads)


@pytest.mark.parametrize("adapt", [True, False])
def test_a_serving_process_keeps_one_thread_and_gives_the_engine_its_team(tiny_model_dir, adapt):
    """`gymnb serve`'s arrangement: the main thread keeps to one thread, the engine decodes with the team it was
    given (observed inside the model's forward, which runs on the engine's worker)."""
    caller_threads = torch.get_num_threads()
    try:
        team = single_team_for_engine(2)
        assert (team, torch.get_num_threads()) == (2, 1)
        loaded = load_model(str(tiny_model_dir), max_model_len=512)
        seen = []
        loaded.model.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
        engine = GenerationEngine(loaded, threads=team, adapt_threads=adapt)
        try:
            engine.generate_batch([[1, 2, 3]], SamplingParams(max_tokens=3, temperature=0))
        finally:
            engine.close()
        # A budget may give a core back to a busy neighbour, never take more than the team it was given.
        assert seen and (set(seen) <= {1, 2} if adapt else set(seen) == {2})
        assert torch.get_num_threads() == 1  # the caller's own setting is untouched by the worker
    finally:
        torch.set_num_threads(caller_threads)


def test_two_level_sampler_picks_what_one_full_cdf_picks():
    """The sampler's block-wise inverse CDF against a plain cumsum + searchsorted, zero-mass runs included."""
    from gymnb.policy.engine import inverse_cdf

    generator = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(32, 1000, generator=generator), dim=-1)  # 1000: not a block multiple
    probs[0, 10:] = 0  # all mass in the first block
    probs[1, :-1] = 0  # all mass on the last token
    probs[2, 100:900] = 0  # a long zero run across blocks
    uniforms = torch.rand(32, generator=generator)
    uniforms[3], uniforms[4] = 0.0, 1.0 - 1e-7
    cdf = probs.cumsum(dim=-1)
    expected = torch.searchsorted(cdf, (uniforms * cdf[:, -1])[:, None], right=True).squeeze(1)
    picks = inverse_cdf(probs, uniforms)
    assert torch.equal(picks, expected.clamp(max=999))
    assert bool((probs.gather(1, picks[:, None]) > 0).all())  # never a token without mass
