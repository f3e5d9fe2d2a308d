"""Token continuity: is a multi-turn rollout still on-policy? (stage: rollouts -> training)

A rollout is NeMo Gym's `/run` result. The LAST output item of each model call carries that call's token fields
(`prompt_token_ids`, `generation_token_ids`, `generation_log_probs`; docs/protocol.md). The invariant that
the on-policy splice guarantees: for consecutive calls k-1, k, `prompt_token_ids[k]` starts with
`prompt_token_ids[k-1] + generation_token_ids[k-1]`. A generation cut by max_tokens has no end-of-turn token;
the template re-adds one after it, so the plain prefix test covers both cases.

When the invariant breaks, `check_continuity` reports the first divergence: which model call, which token, a
decoded window of both sides and its kind (`gymnb.tokens.divergence`). `process_rollout_for_training` turns a rollout
that passes into the message log a trainer consumes, and `audit_loss_mask` checks that exactly the generated
tokens are trained on. `gymnb check-continuity FILE` runs the check over a rollouts JSONL file.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import sys
from pathlib import Path

from gymnb.core.errors import ContinuityError, GymnbError
from gymnb.core.wire import WireError, message_bundle
from gymnb.rollouts.collect import read_rollouts
from gymnb.tokens.divergence import KIND_LABELS, Divergence, find_divergence, fix_for


@dataclasses.dataclass
class ContinuityResult:
    """Outcome of one rollout's check. `problem` is set for structural faults (missing or partial token fields),
    `divergence` for a broken prefix invariant; `ok` is True only when neither is."""

    ok: bool
    num_calls: int
    divergence: Divergence | None = None
    problem: str | None = None
    problem_kind: str | None = None  # not_a_rollout | malformed_token_fields | missing_token_fields
    rollout_index: int | None = None

    def describe(self) -> str:
        where = f"rollout {self.rollout_index}" if self.rollout_index is not None else "rollout"
        if self.ok:
            return f"{where}: continuous across {self.num_calls} model call(s)"
        if self.problem:
            return f"{where}: {self.problem}"
        return f"{where}: " + self.divergence.describe()

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["divergence"] = self.divergence.to_dict() if self.divergence else None
        return out


def output_items(rollout: dict | list) -> list[dict]:
    """The Responses-API output items of a `/run` result, a Response object, or an item list."""
    if isinstance(rollout, list):
        return rollout
    if not isinstance(rollout, dict):
        raise ContinuityError(f"a rollout must be a /run result dict, got {type(rollout).__name__}")
    response = rollout.get("response", rollout)
    if not isinstance(response, dict) or not isinstance(response.get("output"), list):
        raise ContinuityError("rollout has no response.output list: is this a NeMo Gym /run result?")
    return response["output"]


def extract_trainable_turns(rollout: dict | list) -> list[dict]:
    """One dict per model call: its three token fields and `output_index` (the item that carried them).

    Raises ContinuityError when an item carries only some of the fields, or ids and log-probs differ in length.
    """
    turns = []
    for index, item in enumerate(output_items(rollout)):
        if not isinstance(item, dict):
            raise ContinuityError(f"output item {index} is a {type(item).__name__}, not an object")
        try:
            ids = message_bundle(item, f"output item {index} ({item.get('type', '?')})")
        except WireError as exc:
            raise ContinuityError(str(exc)) from None
        if ids is not None:
            turns.append({**ids.as_fields(), "output_index": index})
    return turns


def check_continuity(rollout: dict | list, tokenizer=None, *, rollout_index: int | None = None) -> ContinuityResult:
    """Check the prefix invariant across a rollout's model calls; never raises for a bad rollout.

    Without a tokenizer the check is exact but divergences are classified from ids alone (truncated history,
    or `other`) and have no decoded window.
    """
    def broken(problem: str, kind: str, num_calls: int = 0) -> ContinuityResult:
        return ContinuityResult(False, num_calls, problem=problem, problem_kind=kind, rollout_index=rollout_index)

    try:
        items = output_items(rollout)
    except ContinuityError as exc:
        return broken(str(exc), "not_a_rollout")
    try:
        turns = extract_trainable_turns(items)
    except ContinuityError as exc:
        return broken(str(exc), "malformed_token_fields")
    if not turns:
        return broken("no output item carries token fields: the policy server does not return "
                      "prompt_token_ids / generation_token_ids / generation_log_probs", "missing_token_fields")
    untokenized = find_untokenized_output(items)
    if untokenized is not None:
        return broken(untokenized, "missing_token_fields", len(turns))
    for call in range(1, len(turns)):
        prev = turns[call - 1]
        expected = prev["prompt_token_ids"] + prev["generation_token_ids"]
        divergence = find_divergence(expected, turns[call]["prompt_token_ids"], tokenizer,
                                     generation_start=len(prev["prompt_token_ids"]))
        if divergence is not None:
            divergence.model_call = call
            divergence.rollout_index = rollout_index
            # a probe records that it sent the token fields back; a /run result cannot say
            sent = rollout.get("sent_token_fields") if isinstance(rollout, dict) else None
            divergence.fix = fix_for(divergence.kind, sent)
            return ContinuityResult(False, len(turns), divergence=divergence, rollout_index=rollout_index)
    return ContinuityResult(True, len(turns), rollout_index=rollout_index)


def find_untokenized_output(items: list[dict]) -> str | None:
    """A model call whose items carry no token fields, described; else None.

    The model's items (reasoning, message, function_call) of one or more calls run until a tool output; the
    last item of each call carries its token fields, so the last item of every such run must. Without this
    check a call that lost its fields would pass continuity and then be trained on as if it were context.
    """
    run_start = None
    for index, item in enumerate(list(items) + [{"type": "function_call_output"}]):
        if item.get("type", "message") in ("reasoning", "message", "function_call") \
                and item.get("role", "assistant") == "assistant":
            run_start = index if run_start is None else run_start
            continue
        if run_start is not None and items[index - 1].get("generation_token_ids") is None:
            return (f"output items {run_start}..{index - 1} ({items[index - 1].get('type')}) come from a model "
                    "call but carry no token fields: that generation would be trained on as context")
        run_start = None
    return None


def process_rollout_for_training(rollout: dict, tokenizer=None) -> dict:
    """Turn a continuous rollout into a trainer's message log.

    Returns `{"message_log": [{"role", "content", "token_ids": LongTensor (n,), "trainable": bool,
    "generation_logprobs"?: FloatTensor (n,)}], "input_ids": (T,), "loss_mask": (T,) bool,
    "generation_logprobs": (T,) (0 where not trainable), "reward": float, "num_trainable_tokens": int}`.
    The last call's prompt + generation is the whole sequence; each call adds the non-trainable tokens that
    came in since the previous generation (tool output, next turn header) and its own trainable generation.
    Raises ContinuityError when the rollout breaks the invariant: training on it would be off-policy.
    """
    import torch

    result = check_continuity(rollout, tokenizer)
    if not result.ok:
        raise ContinuityError("cannot build training data from an off-policy rollout: " + result.describe())
    items = output_items(rollout)
    turns = extract_trainable_turns(rollout)
    message_log, seen, prev_item = [], 0, -1
    for call, turn in enumerate(turns):
        context = turn["prompt_token_ids"][seen:]
        if context:
            between = items[prev_item + 1:turn["output_index"]]
            had_tool = any(it.get("type") == "function_call_output" for it in between)
            role = "user" if call == 0 else ("tool" if had_tool else "user")
            message_log.append(_message(role, context, False, tokenizer))
        gen = turn["generation_token_ids"]
        msg = _message("assistant", gen, True, tokenizer)
        msg["generation_logprobs"] = torch.tensor(turn["generation_log_probs"], dtype=torch.float32)
        message_log.append(msg)
        seen, prev_item = len(turn["prompt_token_ids"]) + len(gen), turn["output_index"]
    input_ids = torch.cat([m["token_ids"] for m in message_log])  # (T,)
    loss_mask = torch.cat([torch.full_like(m["token_ids"], m["trainable"], dtype=torch.bool)
                           for m in message_log])  # (T,)
    logprobs = torch.zeros(input_ids.shape, dtype=torch.float32)  # (T,)
    logprobs[loss_mask] = torch.cat([m["generation_logprobs"] for m in message_log if m["trainable"]])
    return {"message_log": message_log, "input_ids": input_ids, "loss_mask": loss_mask,
            "generation_logprobs": logprobs, "reward": float(rollout.get("reward") or 0.0),
            "num_trainable_tokens": int(loss_mask.sum())}


def _message(role: str, ids: list[int], trainable: bool, tokenizer) -> dict:
    import torch

    content = tokenizer.decode(ids, skip_special_tokens=False) if tokenizer is not None else None
    return {"role": role, "content": content, "token_ids": torch.tensor(ids, dtype=torch.long),
            "trainable": trainable}


def audit_loss_mask(processed: dict, rollout: dict) -> dict:
    """Check that exactly the generated tokens are trainable, in order, with their own log-probs.

    Returns `{"ok", "num_trainable_tokens", "num_generation_tokens", "problems": [str]}`.
    """
    turns = extract_trainable_turns(rollout)
    generated = [t for turn in turns for t in turn["generation_token_ids"]]
    gen_logprobs = [lp for turn in turns for lp in turn["generation_log_probs"]]
    mask = processed["loss_mask"]
    trained = processed["input_ids"][mask].tolist()
    problems = []
    if len(trained) != len(generated):
        problems.append(f"{len(trained)} trainable tokens but {len(generated)} generated tokens")
    elif trained != generated:
        first = next(i for i, (a, b) in enumerate(zip(trained, generated)) if a != b)
        problems.append(f"trainable token {first} is id {trained[first]}, the model generated {generated[first]}")
    logprobs = processed["generation_logprobs"][mask].tolist()
    if len(logprobs) == len(gen_logprobs) and any(abs(a - b) > 1e-6 for a, b in zip(logprobs, gen_logprobs)):
        problems.append("trainable tokens carry log-probs that differ from generation_log_probs")
    masked_out = int((~mask).sum())
    if masked_out + len(trained) != len(processed["input_ids"]):
        problems.append("loss mask and input ids differ in length")
    return {"ok": not problems, "num_trainable_tokens": len(trained), "num_generation_tokens": len(generated),
            "problems": problems}


@dataclasses.dataclass
class ContinuitySummary:
    """The check over many rollouts: counts, divergence kinds, and every broken rollout's result."""

    num_rollouts: int
    num_ok: int
    num_multi_turn: int
    broken: list[ContinuityResult]
    kinds: dict[str, int]

    @property
    def ok(self) -> bool:
        return not self.broken

    def to_dict(self) -> dict:
        return {"ok": self.ok, "num_rollouts": self.num_rollouts, "num_ok": self.num_ok,
                "num_multi_turn": self.num_multi_turn, "kinds": self.kinds,
                "broken": [r.to_dict() for r in self.broken]}


def check_rollouts(rollouts, tokenizer=None) -> ContinuitySummary:
    """`check_continuity` over an iterable of rollouts; kinds count first divergences (and `problem`s)."""
    num, num_ok, multi, broken = 0, 0, 0, []
    kinds: collections.Counter = collections.Counter()
    for index, rollout in enumerate(rollouts):
        result = check_continuity(rollout, tokenizer, rollout_index=index)
        num += 1
        multi += result.num_calls > 1
        if result.ok:
            num_ok += 1
            continue
        broken.append(result)
        kinds[result.divergence.kind if result.divergence else result.problem_kind] += 1
    return ContinuitySummary(num, num_ok, multi, broken, dict(kinds))


def _guess_tokenizer(rollouts: list[dict]):
    """The tokenizer named by the rollouts' `response.model` when that is a gymnb preset or a local model
    directory (gymnb's server names its model that way); else (None, None)."""
    from gymnb.core.models import list_presets, load_tokenizer

    names = {r["response"].get("model") for r in rollouts if isinstance(r, dict) and isinstance(r.get("response"), dict)}
    names = [n for n in names if isinstance(n, str) and (n in list_presets() or (Path(n) / "config.json").exists())]
    return (load_tokenizer(names[0]), names[0]) if len(names) == 1 else (None, None)


def format_summary(summary: ContinuitySummary, max_shown: int = 20) -> str:
    lines = [(f"{summary.num_rollouts} rollouts, {summary.num_multi_turn} multi-turn: {summary.num_ok} continuous, "
             f"{len(summary.broken)} broken")]
    for kind, count in sorted(summary.kinds.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {KIND_LABELS.get(kind, kind)}: {count}")
    for result in summary.broken[:max_shown]:
        lines.append("")
        lines.append(result.describe())
    if len(summary.broken) > max_shown:
        lines.append(f"... and {len(summary.broken) - max_shown} more broken rollouts (see --json)")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="gymnb check-continuity",
                                     description="Check token continuity of every rollout in a JSONL file "
                                                 "(gymnb collect or NeMo Gym ng_collect_rollouts output).",
                                     epilog="Exit code 0: every multi-turn rollout is continuous; 1: a rollout "
                                            "is broken, or nothing multi-turn was there to check.")
    parser.add_argument("file", help="rollouts JSONL, one /run result per line")
    parser.add_argument("--tokenizer", help="preset name or local HF dir, to classify and decode divergences "
                                            "(default: the rollouts' response.model when it is a preset)")
    parser.add_argument("--json", dest="json_out", help="also write the full summary as JSON here")
    parser.add_argument("--max-shown", type=int, default=20, help="broken rollouts to print (default 20)")
    args = parser.parse_args(argv)
    rollouts = read_rollouts(args.file)
    if not rollouts:
        raise GymnbError(f"{args.file} holds no rollouts (empty file): nothing was checked")
    if args.tokenizer:
        from gymnb.core.models import load_tokenizer

        tokenizer, name = load_tokenizer(args.tokenizer), args.tokenizer
    else:
        tokenizer, name = _guess_tokenizer(rollouts)
    if tokenizer is None:
        print("note: no tokenizer (pass --tokenizer PRESET|PATH): divergences are located but not decoded or "
              "classified", file=sys.stderr)
    summary = check_rollouts(rollouts, tokenizer)
    print(format_summary(summary, args.max_shown))
    if args.json_out:
        payload = {"file": str(args.file), "tokenizer": name, **summary.to_dict()}
        Path(args.json_out).write_text(json.dumps(payload, indent=2))
    if summary.ok and not summary.num_multi_turn:
        print(f"nothing was checked: none of the {summary.num_rollouts} rollouts has two or more model calls, and "
              "continuity is about what one call passes to the next. Collect multi-turn rollouts (e.g. --env "
              "workplace_assistant) or run layer 04 of `gymnb validate`, whose probes are multi-turn.", file=sys.stderr)
        return 1
    return 0 if summary.ok else 1
