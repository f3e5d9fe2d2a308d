"""Refit: after an optimizer step and `update_weights`, the server samples from the trainer's policy.

Real policy server on a loopback port, real HTTP; the trainer recomputes the log-probs of what the server
generated and token_mult_prob_error must be 1.0 within 1e-3. Without the refit the same check must fail,
so the test can tell a working refit from a no-op.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import urllib.request

import pytest
import torch

from gymnb.train.batching import Sequence, TrainBatch
from gymnb.train.config import LossSection, OptimizerSection
from gymnb.train.loss import compute_token_logprobs, logprob_error_sums
from gymnb.train.step import make_optimizer, make_scheduler, train_step

TEMPERATURE = 0.9


def chat(server, prompt: str, seed: int) -> dict:
    body = {"model": server.model_id, "messages": [{"role": "user", "content": prompt}], "max_tokens": 24,
            "temperature": TEMPERATURE, "top_p": 1.0, "seed": seed}
    request = urllib.request.Request(server.base_url + "/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())["choices"][0]["message"]


def mult_prob_error(model, messages: list[dict]) -> float:
    """token_mult_prob_error of the server's generations under `model` (the trainer's recomputation)."""
    sums, tokens = 0.0, 0
    for m in messages:
        prompt, gen = m["prompt_token_ids"], m["generation_token_ids"]
        ids = torch.tensor([prompt + gen])
        with torch.no_grad():
            train_lp = compute_token_logprobs(model, ids, torch.ones_like(ids), TEMPERATURE)
        mask = torch.zeros_like(train_lp)
        mask[0, len(prompt):] = 1
        gen_lp = torch.zeros_like(train_lp)
        gen_lp[0, len(prompt):] = torch.tensor(m["generation_log_probs"])
        sums += logprob_error_sums(train_lp, gen_lp, mask)["mult_prob_error_sum"]
        tokens += len(gen)
    return sums / tokens


def one_training_step(model, messages: list[dict]) -> None:
    """A real GRPO step on the server's own generations, big enough to move the log-probs visibly."""
    sequences = [Sequence(m["prompt_token_ids"] + m["generation_token_ids"],
                          [False] * len(m["prompt_token_ids"]) + [True] * len(m["generation_token_ids"]),
                          [0.0] * len(m["prompt_token_ids"]) + list(m["generation_log_probs"]), float(i % 2), 0)
                 for i, m in enumerate(messages)]
    batch = TrainBatch(sequences, torch.tensor([1.0 if i % 2 else -1.0 for i in range(len(sequences))]))
    opt_cfg = OptimizerSection(lr=3e-3, weight_decay=0.0)
    optimizer = make_optimizer(model, opt_cfg)
    train_step(model, optimizer, make_scheduler(optimizer, opt_cfg, 1), batch, micro_batch_size=2,
               temperature=TEMPERATURE, pad_token_id=0, loss_cfg=LossSection(), max_grad_norm=0.0)


def test_refit_makes_server_log_probs_match_the_trainer(tiny_model_dir):
    from gymnb.core.models import load_model
    from gymnb.policy.server import PolicyServer

    loaded = load_model(str(tiny_model_dir))
    trainer = loaded.model
    served = dataclasses.replace(loaded, model=copy.deepcopy(trainer).eval())
    prompts = ["What is 2 + 3?", "Name a colour.", "Count to three."]
    with PolicyServer.start(served, model_id="tiny") as server:
        before = [chat(server, p, seed=i) for i, p in enumerate(prompts)]
        assert mult_prob_error(trainer, before) == pytest.approx(1.0, abs=1e-3)

        one_training_step(trainer, before)
        stale = [chat(server, p, seed=10 + i) for i, p in enumerate(prompts)]
        stale_error = mult_prob_error(trainer, stale)
        assert stale_error > 1.01, "the step should have moved the policy away from the served weights"

        server.update_weights(trainer.state_dict())
        after = [chat(server, p, seed=20 + i) for i, p in enumerate(prompts)]
        assert mult_prob_error(trainer, after) == pytest.approx(1.0, abs=1e-3)
