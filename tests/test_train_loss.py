"""GRPO loss pieces and the optimizer step, on a tiny model: hand-computed values and invariances."""

from __future__ import annotations

import copy

import pytest
import torch

from gymnb.train.batching import Sequence, TrainBatch
from gymnb.train.config import LossSection, OptimizerSection
from gymnb.train.loss import compute_advantages, compute_token_logprobs, kl_k3, policy_loss
from gymnb.train.step import accumulate_gradients, make_optimizer, make_scheduler, train_step


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()


def make_batch(lengths=((5, 3), (9, 6), (4, 2), (12, 4)), rewards=(1.0, 0.0, 0.0, 1.0), seed=0) -> TrainBatch:
    """Sequences of different lengths (prompt, generation) so that micro-batches need padding."""
    g = torch.Generator().manual_seed(seed)
    sequences = []
    for i, ((prompt_len, gen_len), reward) in enumerate(zip(lengths, rewards)):
        ids = torch.randint(10, 2000, (prompt_len + gen_len,), generator=g).tolist()
        trainable = [False] * prompt_len + [True] * gen_len
        lps = [0.0] * prompt_len + (-torch.rand(gen_len, generator=g)).tolist()
        sequences.append(Sequence(ids, trainable, lps, reward, group_id=i // 2))
    advantages = compute_advantages(torch.tensor(rewards), torch.tensor([s.group_id for s in sequences]))
    return TrainBatch(sequences, advantages)


def test_advantages_match_hand_computed_leave_one_out_with_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    groups = torch.tensor([0] * 4 + [1] * 4 + [2] * 4)
    adv = compute_advantages(rewards, groups)
    # group 0: baselines (others' mean) 0, 1/3, 1/3, 1/3 -> 1, -1/3, -1/3, -1/3; std([1,0,0,0]) = 0.5 (unbiased)
    # group 1: baselines 2/3, 2/3, 1, 2/3 -> 1/3, 1/3, -1, 1/3; std = 0.5
    # group 2: all equal -> 0
    expected = torch.tensor([2.0, -2 / 3, -2 / 3, -2 / 3, 2 / 3, 2 / 3, -2.0, 2 / 3, 0, 0, 0, 0])
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=0)


def test_advantages_options_and_singleton_groups():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0])
    groups = torch.tensor([0, 0, 0, 0, 1])
    loo = compute_advantages(rewards, groups, normalize_std=False)
    torch.testing.assert_close(loo, torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3, 0.0]))
    plain = compute_advantages(rewards, groups, leave_one_out=False, normalize_std=False)
    torch.testing.assert_close(plain, torch.tensor([0.75, -0.25, -0.25, -0.25, 0.0]))


def test_token_logprobs_follow_server_convention_and_ignore_padding(tiny_model):
    ids = torch.tensor([[5, 17, 301, 42, 7, 99]])
    temperature = 0.7
    lp = compute_token_logprobs(tiny_model, ids, torch.ones_like(ids), temperature)
    with torch.no_grad():
        logits = tiny_model(ids).logits[0]  # (T, V)
    expected = torch.log_softmax(logits[:-1] / temperature, -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    torch.testing.assert_close(lp[0, 1:], expected, atol=1e-5, rtol=1e-5)
    assert lp[0, 0] == 0
    # The same row right-padded next to a longer one gives the same values on its real tokens.
    padded = torch.tensor([[5, 17, 301, 42, 7, 99, 0, 0], [1, 2, 3, 4, 5, 6, 7, 8]])
    mask = torch.tensor([[1] * 6 + [0, 0], [1] * 8])
    lp2 = compute_token_logprobs(tiny_model, padded, mask, temperature)
    torch.testing.assert_close(lp2[0, :6], lp[0], atol=1e-5, rtol=1e-5)
    # With a loss mask only columns from the first trainable one are computed; they equal the full pass.
    loss_mask = torch.tensor([[0, 0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1, 1, 1]])
    partial = compute_token_logprobs(tiny_model, padded, mask, temperature, loss_mask)
    torch.testing.assert_close(partial[:, 3:], lp2[:, 3:], atol=1e-5, rtol=1e-5)
    assert torch.all(partial[:, :3] == 0)
    # T = 0 (greedy) counts as T = 1.
    torch.testing.assert_close(compute_token_logprobs(tiny_model, ids, torch.ones_like(ids), 0.0),
                               compute_token_logprobs(tiny_model, ids, torch.ones_like(ids), 1.0))


def test_loss_is_token_level_average_over_the_global_batch():
    # Two sequences: 6 trainable tokens with advantage +1, 2 with advantage -1; ratio 1 everywhere.
    logprobs = torch.zeros(2, 7, requires_grad=True)
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1], [0, 1, 1, 0, 0, 0, 0]], dtype=torch.float32)
    out = policy_loss(logprobs, logprobs.detach(), torch.tensor([1.0, -1.0]), mask, num_global_tokens=8)
    assert out.loss.item() == pytest.approx(-(6 * 1 - 2 * 1) / 8)
    assert out.stats["num_tokens"] == 8
    # Same tokens in two micro-batches divided by the global count sum to the same loss.
    a = policy_loss(logprobs[:1], logprobs[:1].detach(), torch.tensor([1.0]), mask[:1], num_global_tokens=8)
    b = policy_loss(logprobs[1:], logprobs[1:].detach(), torch.tensor([-1.0]), mask[1:], num_global_tokens=8)
    assert (a.loss + b.loss).item() == pytest.approx(out.loss.item())


def test_clip_stops_gradient_past_the_trust_region():
    prev = torch.zeros(1, 3)
    # ratios e^0.5 ~ 1.65 (outside 1.2), e^0.1 ~ 1.105 (inside), e^-0.5 ~ 0.61 (outside 0.8)
    logprobs = torch.tensor([[0.5, 0.1, -0.5]], requires_grad=True)
    out = policy_loss(logprobs, prev, torch.tensor([1.0]), torch.ones(1, 3), num_global_tokens=3)
    out.loss.backward()
    grad = logprobs.grad[0]
    assert grad[0] == 0  # positive advantage, ratio above 1+eps: clipped
    assert grad[1] < 0  # inside: pushes the log-prob up
    assert grad[2] < 0  # positive advantage below 1-eps: min() keeps the unclipped term


def test_clip_fraction_counts_tokens_off_the_behaviour_policy():
    """Measured against the generation log-probs: 0 on-policy, the share of tokens past the clip range off it."""
    logprobs = torch.full((1, 5), -1.0)
    # trainer/generation ratios: e^0 = 1, e^0.1 = 1.105 (inside 1.2), e^0.5 = 1.65, e^-0.5 = 0.61, e^-0.1
    generation = logprobs - torch.tensor([[0.0, 0.1, 0.5, -0.5, -0.1]])
    mask = torch.ones(1, 5)
    on_policy = policy_loss(logprobs, logprobs, torch.tensor([1.0]), mask, 5, generation_logprobs=logprobs)
    assert on_policy.stats["clip_fraction_sum"] == 0
    off_policy = policy_loss(logprobs, logprobs, torch.tensor([1.0]), mask, 5, generation_logprobs=generation)
    assert off_policy.stats["clip_fraction_sum"] == 2
    # only generated tokens count
    masked = policy_loss(logprobs, logprobs, torch.tensor([1.0]), torch.tensor([[1.0, 1, 1, 0, 0]]), 3,
                         generation_logprobs=generation)
    assert masked.stats["clip_fraction_sum"] == 1


def test_kl_k3_and_importance_weights():
    lp = torch.log(torch.tensor([[0.5, 0.2]]))
    assert torch.all(kl_k3(lp, lp) == 0)
    assert torch.all(kl_k3(lp, lp - 0.3) > 0)
    # importance weight = exp(prev - gen), truncated at 2
    prev = torch.zeros(1, 2)
    gen = torch.tensor([[-0.1, -3.0]])
    logprobs = prev.clone().requires_grad_(True)
    out = policy_loss(logprobs, prev, torch.tensor([1.0]), torch.ones(1, 2), 2, generation_logprobs=gen,
                      importance_sampling=True, is_truncation=2.0)
    out.loss.backward()
    torch.testing.assert_close(logprobs.grad[0], -torch.tensor([torch.exp(torch.tensor(0.1)), 2.0]) / 2)


def test_one_step_changes_every_trainable_parameter(tiny_model):
    model = copy.deepcopy(tiny_model)
    opt_cfg = OptimizerSection(lr=1e-3, weight_decay=0.0, micro_batch_size=2)
    optimizer = make_optimizer(model, opt_cfg)
    scheduler = make_scheduler(optimizer, opt_cfg, max_steps=10)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    metrics = train_step(model, optimizer, scheduler, make_batch(), micro_batch_size=2, temperature=1.0,
                         pad_token_id=0, loss_cfg=LossSection(), max_grad_norm=1.0)
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p.detach(), before[n])]
    assert not unchanged, f"parameters not updated by one step: {unchanged}"
    assert metrics["train/grad_norm"] > 0
    assert metrics["train/num_trainable_tokens"] == 3 + 6 + 2 + 4


@pytest.mark.parametrize("kl_coef", [0.0, 0.1])
def test_micro_batch_1x4_equals_4x1(tiny_model, kl_coef):
    batch = make_batch()
    loss_cfg = LossSection(kl_coef=kl_coef)
    reference = copy.deepcopy(tiny_model)
    with torch.no_grad():  # a reference that differs from the policy, so the KL term has a gradient
        for p in reference.parameters():
            p.add_(0.01 * torch.randn_like(p))
    grads = []
    for micro_batch_size in (1, 4):
        model = copy.deepcopy(tiny_model)
        sums = accumulate_gradients(model, batch, micro_batch_size=micro_batch_size, temperature=0.8,
                                    pad_token_id=0, loss_cfg=loss_cfg, reference_model=reference)
        grads.append(({n: p.grad.clone() for n, p in model.named_parameters()}, sums))
    (g1, s1), (g4, s4) = grads
    for name in g1:
        torch.testing.assert_close(g1[name], g4[name], atol=1e-6, rtol=1e-4, msg=name)
    assert s1["loss"] == pytest.approx(s4["loss"], rel=1e-5, abs=1e-7)
    assert s1["num_tokens"] == s4["num_tokens"] == batch.num_trainable_tokens


def test_lr_schedule_warmup_then_decay():
    model = torch.nn.Linear(2, 2)
    cfg = OptimizerSection(lr=1.0, warmup_steps=2, lr_schedule="linear")
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, max_steps=6)
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25])


def test_step_at_lr_0_reproduces_the_servers_log_probs_with_dropout_in_the_model(tokenizer):
    """The server samples in eval mode; a trainer left in train mode would see dropout's noise instead."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.3)
    model = LlamaForCausalLM(config).eval()
    batch = make_batch()
    with torch.no_grad():  # the server's generation_log_probs: the same weights, eval mode
        for seq in batch.sequences:
            ids = torch.tensor([seq.token_ids])
            served = compute_token_logprobs(model, ids, torch.ones_like(ids), 1.0)[0]
            seq.generation_log_probs = [lp if t else 0.0 for lp, t in zip(served.tolist(), seq.trainable)]
    opt_cfg = OptimizerSection(lr=0.0, micro_batch_size=2)
    optimizer = make_optimizer(model, opt_cfg)
    metrics = train_step(model, optimizer, make_scheduler(optimizer, opt_cfg, max_steps=1), batch,
                         micro_batch_size=2, temperature=1.0, pad_token_id=0, loss_cfg=LossSection(),
                         max_grad_norm=1.0)
    assert metrics["train/token_mult_prob_error"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["train/max_abs_logprob_diff"] < 1e-4
    assert metrics["train/clip_fraction"] == 0.0
    assert metrics["train/grad_norm"] > 0
    # an engine whose probabilities sit 0.5 nats off on every other generated token: half of them clip
    shifted = 0
    for seq in batch.sequences:
        for t in [i for i, trainable in enumerate(seq.trainable) if trainable][::2]:
            seq.generation_log_probs[t] -= 0.5
            shifted += 1
    metrics = train_step(model, optimizer, make_scheduler(optimizer, opt_cfg, max_steps=1), batch,
                         micro_batch_size=2, temperature=1.0, pad_token_id=0, loss_cfg=LossSection(),
                         max_grad_norm=1.0)
    assert metrics["train/clip_fraction"] == pytest.approx(shifted / batch.num_trainable_tokens)
