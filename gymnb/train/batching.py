"""Training stage, batching: rollouts (NeMo Gym `/run` results) -> padded training tensors with loss masks.

One rollout becomes one token sequence: the last model call's prompt ids plus its generation. That sequence
contains every earlier call's generation at its original position (the on-policy splice guarantees that
`prompt_token_ids[k]` starts with `prompt_token_ids[k-1] + generation_token_ids[k-1]`), so the loss mask marks
exactly the ids the model sampled, and each is paired with the log-prob the server reported for it.
Tool outputs and template glue between calls are context, never trained on.

A rollout whose ids do not line up is not trainable on-policy: it is reported (ContinuityError), not patched.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from gymnb.core.errors import ContinuityError
from gymnb.tokens.continuity import process_rollout_for_training


@dataclass
class Sequence:
    """One rollout as a flat token sequence; the three lists have equal length."""

    token_ids: list[int]
    trainable: list[bool]
    generation_log_probs: list[float]  # 0.0 where not trainable
    reward: float
    group_id: int

    @property
    def num_generated(self) -> int:
        return sum(self.trainable)


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # (B, T) long, right-padded
    attention_mask: torch.Tensor  # (B, T) long
    loss_mask: torch.Tensor  # (B, T) float, 1 on generated tokens
    generation_logprobs: torch.Tensor  # (B, T) float, 0 off the mask
    advantages: torch.Tensor  # (B,)
    index: torch.Tensor  # (B,) position of each row in the step's batch


@dataclass
class TrainBatch:
    """All sequences of one optimizer step with their advantages."""

    sequences: list[Sequence]
    advantages: torch.Tensor  # (N,)
    skipped: list[dict] = field(default_factory=list)  # rollouts dropped, with the reason

    @property
    def num_trainable_tokens(self) -> int:
        return sum(s.num_generated for s in self.sequences)


def sequence_from_message_log(processed: dict, reward: float, group_id: int) -> Sequence:
    """Adapt `gymnb.tokens.continuity.process_rollout_for_training` output (a message log) to a Sequence."""
    token_ids: list[int] = []
    trainable: list[bool] = []
    logprobs: list[float] = []
    for message in processed["message_log"]:
        ids = [int(x) for x in message["token_ids"]]
        is_trainable = bool(message.get("trainable"))
        token_ids += ids
        trainable += [is_trainable] * len(ids)
        lps = message.get("generation_logprobs")
        logprobs += [float(x) for x in lps] if is_trainable and lps is not None else [0.0] * len(ids)
    return Sequence(token_ids, trainable, logprobs, reward, group_id)


def rollout_to_sequence(rollout: dict, group_id: int, tokenizer=None) -> Sequence:
    """One rollout as a training sequence, through the continuity toolkit (ContinuityError if off-policy)."""
    processed = process_rollout_for_training(rollout, tokenizer)
    return sequence_from_message_log(processed, float(rollout.get("reward", 0.0)), group_id)


def group_rollouts(results: list[dict]) -> dict[int, list[dict]]:
    """Rollouts by prompt (`_ng_task_index`, set by collect_rollouts for the aabbcc expansion)."""
    groups: dict[int, list[dict]] = defaultdict(list)
    for r in results:
        groups[int(r.get("_ng_task_index", 0))].append(r)
    return dict(sorted(groups.items()))


def build_train_batch(results: list[dict], tokenizer=None, *, leave_one_out: bool = True,
                      normalize_std: bool = True, drop_uniform_groups: bool = False,
                      max_seq_len: int | None = None) -> TrainBatch:
    """Rollout results -> sequences + GRPO advantages. Broken or overlong rollouts are skipped and listed.

    `drop_uniform_groups`: a group whose rewards are all equal has zero advantage everywhere and adds no
    policy gradient; dropping it saves its forward/backward (it still counts in reward metrics upstream).
    """
    from gymnb.train.loss import compute_advantages

    sequences: list[Sequence] = []
    skipped: list[dict] = []
    for gid, rollouts in group_rollouts(results).items():
        for r in rollouts:
            try:
                seq = rollout_to_sequence(r, gid, tokenizer)
            except ContinuityError as exc:
                skipped.append({"task_index": gid, "reason": str(exc)})
                continue
            if max_seq_len and len(seq.token_ids) > max_seq_len:
                skipped.append({"task_index": gid, "reason": f"{len(seq.token_ids)} tokens > {max_seq_len}"})
                continue
            if seq.num_generated:
                sequences.append(seq)
    if not sequences:
        return TrainBatch([], torch.zeros(0), skipped)
    rewards = torch.tensor([s.reward for s in sequences])
    groups = torch.tensor([s.group_id for s in sequences])
    advantages = compute_advantages(rewards, groups, leave_one_out=leave_one_out, normalize_std=normalize_std)
    if drop_uniform_groups:
        keep = [i for i, s in enumerate(sequences) if _group_varies(rewards, groups, s.group_id)]
        sequences = [sequences[i] for i in keep]
        advantages = advantages[keep] if keep else torch.zeros(0)
    return TrainBatch(sequences, advantages, skipped)


def _group_varies(rewards: torch.Tensor, groups: torch.Tensor, gid: int) -> bool:
    group = rewards[groups == gid]
    return bool(group.numel() > 1 and (group != group[0]).any())


def iter_micro_batches(batch: TrainBatch, micro_batch_size: int, pad_token_id: int) -> Iterator[MicroBatch]:
    """Pad each micro-batch only to its own longest sequence (sorted by length to waste little padding)."""
    order = sorted(range(len(batch.sequences)), key=lambda i: len(batch.sequences[i].token_ids))
    for start in range(0, len(order), micro_batch_size):
        rows = order[start:start + micro_batch_size]
        yield collate([batch.sequences[i] for i in rows], batch.advantages[rows], rows, pad_token_id)


def collate(sequences: list[Sequence], advantages: torch.Tensor, rows: list[int], pad_token_id: int) -> MicroBatch:
    width = max(len(s.token_ids) for s in sequences)
    n = len(sequences)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    loss_mask = torch.zeros((n, width), dtype=torch.float32)
    gen_lp = torch.zeros((n, width), dtype=torch.float32)
    for i, s in enumerate(sequences):
        length = len(s.token_ids)
        input_ids[i, :length] = torch.tensor(s.token_ids)
        attention_mask[i, :length] = 1
        loss_mask[i, :length] = torch.tensor(s.trainable, dtype=torch.float32)
        gen_lp[i, :length] = torch.tensor(s.generation_log_probs, dtype=torch.float32)
    # Position 0 has no prediction: a generation never starts a sequence, but keep the invariant explicit.
    loss_mask[:, 0] = 0.0
    return MicroBatch(input_ids, attention_mask, loss_mask, gen_lp, advantages.float(), torch.tensor(rows))
