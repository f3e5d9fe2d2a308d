"""Rollouts (NeMo Gym /run results) -> training sequences, masks and padded micro-batches."""

from __future__ import annotations

import pytest
import torch

from gymnb.core.errors import ContinuityError
from gymnb.tokens.continuity import extract_trainable_turns
from gymnb.train.batching import build_train_batch, iter_micro_batches, rollout_to_sequence


def make_rollout(calls, reward=1.0, task_index=0, tool_between=True):
    """A /run result: each model call's LAST output item carries the token fields; tool outputs carry none."""
    output = []
    for k, (prompt, gen, lps) in enumerate(calls):
        output.append({"type": "reasoning", "id": f"r{k}", "summary": []})
        output.append({"type": "function_call", "name": "f", "arguments": "{}", "call_id": f"c{k}",
                       "prompt_token_ids": prompt, "generation_token_ids": gen, "generation_log_probs": lps})
        if tool_between and k < len(calls) - 1:
            output.append({"type": "function_call_output", "call_id": f"c{k}", "output": "{}"})
    return {"response": {"output": output}, "reward": reward, "_ng_task_index": task_index}


def test_multi_turn_rollout_flattens_with_generation_masked_in_place():
    p0, g0 = [1, 2, 3], [10, 11, 2]
    p1 = p0 + g0 + [7, 8, 9]  # tool output + template glue between the calls
    g1 = [12, 2]
    rollout = make_rollout([(p0, g0, [-0.1, -0.2, -0.3]), (p1, g1, [-0.4, -0.5])])
    assert [c["generation_token_ids"] for c in extract_trainable_turns(rollout)] == [g0, g1]
    seq = rollout_to_sequence(rollout, group_id=0)
    assert seq.token_ids == p1 + g1
    assert seq.trainable == [False] * 3 + [True] * 3 + [False] * 3 + [True] * 2
    assert seq.generation_log_probs == pytest.approx([0, 0, 0, -0.1, -0.2, -0.3, 0, 0, 0, -0.4, -0.5])
    assert seq.num_generated == len(g0) + len(g1)


def test_turn_cut_by_max_tokens_keeps_continuity():
    # The first call has no end-of-turn token; the template adds one (id 2) in the next prompt.
    p0, g0 = [1, 2, 3], [10, 11]
    p1 = p0 + g0 + [2, 7]
    seq = rollout_to_sequence(make_rollout([(p0, g0, [-1.0, -1.0]), (p1, [5], [-0.5])]), group_id=0)
    assert seq.token_ids == p1 + [5]
    assert sum(seq.trainable) == 3


def test_broken_continuity_and_missing_fields_are_reported():
    p0, g0 = [1, 2, 3], [10, 11]
    retokenized = [1, 2, 3, 99, 7]  # generation re-tokenized differently: off-policy
    with pytest.raises(ContinuityError, match="model call 1, token 3"):
        rollout_to_sequence(make_rollout([(p0, g0, [-1.0, -1.0]), (retokenized, [5], [-0.5])]), group_id=0)
    with pytest.raises(ContinuityError, match="2 generation_token_ids but 1 generation_log_probs"):
        rollout_to_sequence(make_rollout([(p0, g0, [-1.0])]), group_id=0)
    with pytest.raises(ContinuityError, match="generation_token_ids"):
        rollout_to_sequence({"response": {"output": [{"type": "message", "content": []}]}, "reward": 0}, group_id=0)


def test_train_batch_groups_by_task_and_skips_broken_rollouts():
    good = lambda reward, task: make_rollout([([1, 2], [3, 4], [-0.1, -0.2])], reward, task)
    broken = make_rollout([([1, 2], [3], [-0.1]), ([9, 9, 9], [5], [-0.1])], 1.0, 1)
    results = [good(1.0, 0), good(0.0, 0), good(1.0, 1), broken, good(0.0, 1), good(1.0, 2), good(1.0, 2)]
    batch = build_train_batch(results)
    assert len(batch.sequences) == 6 and len(batch.skipped) == 1
    assert batch.skipped[0]["task_index"] == 1
    # task 0: [1, 0] -> LOO (+1, -1) / std(0.707); task 1 keeps its two good rollouts; task 2 uniform -> 0
    assert batch.advantages.tolist() == pytest.approx([1.4142, -1.4142, 1.4142, -1.4142, 0.0, 0.0], abs=1e-3)
    dropped = build_train_batch(results, drop_uniform_groups=True)
    assert [s.group_id for s in dropped.sequences] == [0, 0, 1, 1]
    assert build_train_batch(results, max_seq_len=3).sequences == []


def test_micro_batches_pad_right_and_cover_every_row_once():
    rollouts = [make_rollout([(list(range(1, 1 + n)), [50, 51], [-0.5, -0.25])], float(i % 2), i // 2)
                for i, n in enumerate([3, 7, 2, 5])]
    batch = build_train_batch(rollouts)
    seen = []
    for mb in iter_micro_batches(batch, micro_batch_size=3, pad_token_id=0):
        b, t = mb.input_ids.shape
        assert mb.attention_mask.shape == mb.loss_mask.shape == mb.generation_logprobs.shape == (b, t)
        lengths = mb.attention_mask.sum(1)
        for row in range(b):
            n = int(lengths[row])
            assert torch.all(mb.attention_mask[row, :n] == 1) and torch.all(mb.attention_mask[row, n:] == 0)
            assert torch.all(mb.input_ids[row, n:] == 0)
            assert mb.loss_mask[row].tolist()[n - 2:n] == [1.0, 1.0] and mb.loss_mask[row].sum() == 2
            assert mb.generation_logprobs[row, n - 2:n].tolist() == [-0.5, -0.25]
        torch.testing.assert_close(mb.advantages, batch.advantages[mb.index])
        seen += mb.index.tolist()
    assert sorted(seen) == [0, 1, 2, 3]
