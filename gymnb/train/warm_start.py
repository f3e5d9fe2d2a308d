"""Training stage, warm start: supervised fine-tuning on reference-solution trajectories before GRPO.

A small model samples no rewarded workplace rollout, so GRPO has no signal until the policy can call tools at
all. The warm start teaches the format and the habit "look up, then act": each training task's reference
solution (`gymnb.gym.workplace.data.reference_solutions`: read-only lookups, then the ground truth) is replayed
through the environment's tools, giving the tool outputs the agent would hand the model, and becomes one
multi-turn trajectory: assistant tool-call turns, tool results, a closing assistant message.

Token ids are built exactly as the policy server builds them at rollout time (`gymnb.policy.scripted.
build_scripted_pairs`: the server's chat template, tool normalisation and on-policy splice, each earlier turn
carrying its own ids), so the contexts trained on are the contexts served. The loss is next-token
cross-entropy on the assistant turns' ids only (each turn's text and its end-of-turn token), averaged over the
tokens of an optimizer step. The result is an HF directory whose tokenizer carries the run's chat template,
so `model.name=<that dir>` serves tool-aware prompts with no `model.chat_template` setting.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from gymnb.core.errors import TrainingError
from gymnb.train.config import FINAL_TEXT


@dataclass
class Trajectory:
    """One reference solution as a token sequence; `loss_mask[t]` marks an assistant token."""

    token_ids: list[int]
    loss_mask: list[bool]
    completions: list[str]  # the assistant turns' texts, in order
    row_id: object = None


def render_tool_calls(turn: list[dict]) -> str:
    """A turn of calls as the model writes them: the chat template's own `<tool_call>` rendering, so
    re-rendering the history gives back the same text."""
    return "\n".join("<tool_call>\n" + json.dumps({"name": call["name"], "arguments": json.loads(call["arguments"])})
                     + "\n</tool_call>" for call in turn)


def conversation_for(row: dict, solution: list[list[dict]], tool_outputs: list[list[str]],
                     final_text: str = FINAL_TEXT) -> dict:
    """A `gymnb.policy.scripted` conversation: the row's chat messages and tools as the model server sends them,
    one completion per turn of the solution plus the closing text, the tool messages after each turn."""
    from gymnb.core.responses import responses_to_chat

    body = responses_to_chat(row["responses_create_params"], model="warm-start")
    followups = [[{"role": "tool", "tool_call_id": f"call_{k}_{i}", "content": text} for i, text in enumerate(outs)]
                 for k, outs in enumerate(tool_outputs)]
    return {"messages": body["messages"], "tools": body.get("tools"),
            "completions": [render_tool_calls(turn) for turn in solution] + [final_text], "followups": followups}


def build_trajectory(tokenizer, row: dict, solution: list[list[dict]], state,
                     final_text: str = FINAL_TEXT) -> Trajectory:
    """Replay `solution` on `state` (the pristine company) and tokenize the conversation as the server would."""
    from gymnb.gym.workplace.reference import replay_solution
    from gymnb.policy.scripted import build_scripted_pairs

    conversation = conversation_for(row, solution, replay_solution(state, solution), final_text)
    pairs = build_scripted_pairs(tokenizer, conversation)
    last_prompt, last_generation = pairs[-1]
    token_ids = last_prompt + last_generation
    mask = [False] * len(token_ids)
    for prompt_ids, generation_ids in pairs:
        end = len(prompt_ids) + len(generation_ids)
        # The splice keeps every earlier turn's ids in place; a failure here is a splice bug, not bad data.
        assert token_ids[:end] == prompt_ids + generation_ids, "turn ids not a prefix of the final sequence"
        mask[len(prompt_ids):end] = [True] * len(generation_ids)
    return Trajectory(token_ids, mask, conversation["completions"], row.get("id"))


def build_trajectories(tokenizer, rows: list[dict], solutions: list, final_text: str = FINAL_TEXT,
                       data_dir: str | None = None) -> list[Trajectory]:
    from gymnb.gym.workplace.company import base_state

    state = base_state(data_dir)
    return [build_trajectory(tokenizer, row, solution, state, final_text) for row, solution in zip(rows, solutions)]


def sft_loss(model, micro_batch, num_step_tokens: int) -> torch.Tensor:
    """Summed negative log-likelihood of the micro-batch's assistant tokens / the step's assistant tokens."""
    from gymnb.train.loss import compute_token_logprobs

    logprobs = compute_token_logprobs(model, micro_batch.input_ids, micro_batch.attention_mask, 1.0,
                                      loss_mask=micro_batch.loss_mask)  # (B, T)
    return -(logprobs * micro_batch.loss_mask).sum() / num_step_tokens


def iter_steps(trajectories: list[Trajectory], batch_size: int, epochs: int, seed: int):
    """Optimizer steps as lists of trajectories: each epoch a fresh seeded shuffle, cut into batches."""
    rng = random.Random(seed)
    for _ in range(epochs):
        order = list(range(len(trajectories)))
        rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            yield [trajectories[i] for i in order[start:start + batch_size]]


def fine_tune(model, trajectories: list[Trajectory], *, lr: float, epochs: int, batch_size: int,
              micro_batch_size: int, pad_token_id: int, max_grad_norm: float = 1.0, seed: int = 0,
              progress: bool = True) -> list[dict]:
    """AdamW on the assistant tokens of `trajectories`; one record per optimizer step (loss, tokens, time)."""
    from tqdm.auto import tqdm

    from gymnb.train.batching import Sequence, TrainBatch, iter_micro_batches

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    num_steps = epochs * -(-len(trajectories) // batch_size)
    records = []
    model.train(False)  # no dropout, as in the GRPO trainer
    with tqdm(total=num_steps, desc="warm start", disable=not progress) as bar:
        for step, group in enumerate(iter_steps(trajectories, batch_size, epochs, seed), 1):
            started = time.perf_counter()
            batch = TrainBatch([Sequence(t.token_ids, t.loss_mask, [0.0] * len(t.token_ids), 0.0, i)
                                for i, t in enumerate(group)], torch.zeros(len(group)))
            num_tokens = batch.num_trainable_tokens
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for micro_batch in iter_micro_batches(batch, micro_batch_size, pad_token_id):
                loss = sft_loss(model, micro_batch, num_tokens)
                loss.backward()
                total += float(loss.detach())
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm or float("inf"))
            optimizer.step()
            records.append({"step": step, "loss": total, "num_tokens": num_tokens, "grad_norm": float(grad_norm),
                            "num_sequences": len(group), "seconds": time.perf_counter() - started})
            bar.update(1)
            bar.set_postfix(loss=f"{total:.3f}")
    return records


def save_model_dir(model, tokenizer, out_dir: Path) -> Path:
    """Write an HF directory (weights + tokenizer + its chat template), via a temporary name renamed when whole."""
    import shutil

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)  # writes tokenizer.chat_template (chat_template.jinja): the tool-aware one
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def check_template_renders_tools(tokenizer, where: str) -> None:
    """A workplace policy needs a template that shows the tools; fail with the remedy when it does not."""
    probe = [{"type": "function", "function": {"name": "probe_tool_name", "description": "", "parameters": {}}}]
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tools=probe, tokenize=False)
    if "probe_tool_name" not in text:
        raise TrainingError(f"the chat template of {where} does not render tools: set model.chat_template "
                            "(e.g. chatml_tools) so the warm start and the policy see the tool schemas")


def solutions_for(rows: list[dict], split: str, path: str | None) -> list | None:
    """Reference solutions aligned with `rows` of an embedded workplace split (row `id` = its index there);
    None for rows read from a file, which carry only their ground truth."""
    from gymnb.gym.workplace.data import SPLITS, reference_solutions

    if path is not None or split not in SPLITS:
        return None
    solutions = reference_solutions(split)
    return [solutions[int(row["id"])] for row in rows]


def run_warm_start(cfg, run_dir: Path, train_rows: list[dict], *, progress: bool = True) -> Path:
    """Fine-tune cfg.model on the first `warm_start.num_trajectories` training rows' reference solutions;
    return the HF directory `<run>/warm_start/model`. A directory written by the same settings is reused."""
    import hashlib

    from gymnb.core.config import config_to_dict
    from gymnb.core.models import load_model

    ws = cfg.warm_start
    env = {k: getattr(cfg.env, k) for k in ("name", "train_split", "train_limit", "tiers", "tools",
                                             "num_distractor_tools")}
    settings = {"model": config_to_dict(cfg.model), "env": env, "warm_start": config_to_dict(ws), "seed": cfg.seed}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    out = Path(run_dir) / "warm_start"
    summary_path = out / "warm_start.json"
    if (out / "model" / "config.json").exists() and summary_path.exists() \
            and json.loads(summary_path.read_text()).get("settings_hash") == digest:
        return out / "model"
    rows = train_rows[:ws.num_trajectories]
    solutions = solutions_for(rows, cfg.env.train_split, cfg.env.train_path)
    if solutions is None:
        raise TrainingError(f"warm_start: split {cfg.env.train_split!r} has no reference solutions (embedded "
                            "workplace_assistant train or validation split only)")
    started = time.perf_counter()
    loaded = load_model(cfg.model.name, dtype=cfg.model.dtype, device=cfg.model.device, threads=cfg.model.threads,
                        chat_template=cfg.model.chat_template)
    check_template_renders_tools(loaded.tokenizer, cfg.model.name)
    trajectories = build_trajectories(loaded.tokenizer, rows, solutions, ws.final_text)
    built = time.perf_counter()
    for p in loaded.model.parameters():
        p.requires_grad_(True)
    records = fine_tune(loaded.model, trajectories, lr=ws.lr, epochs=ws.epochs, batch_size=ws.batch_size,
                        micro_batch_size=ws.micro_batch_size, pad_token_id=loaded.tokenizer.pad_token_id,
                        max_grad_norm=ws.max_grad_norm, seed=cfg.seed, progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    save_model_dir(loaded.model, loaded.tokenizer, out / "model")
    lengths = sorted(len(t.token_ids) for t in trajectories)
    summary = {"settings_hash": digest, "num_trajectories": len(trajectories), "num_steps": len(records),
               "median_sequence_tokens": lengths[len(lengths) // 2], "max_sequence_tokens": lengths[-1],
               "assistant_tokens": sum(sum(t.loss_mask) for t in trajectories),
               "first_loss": records[0]["loss"] if records else None,
               "last_loss": records[-1]["loss"] if records else None,
               "build_s": built - started, "train_s": time.perf_counter() - built,
               "total_s": time.perf_counter() - started, "steps": records}
    summary_path.write_text(json.dumps(summary, indent=2))
    return out / "model"
