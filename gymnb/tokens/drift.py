"""Drift audit: what naive re-tokenization would have cost (stage: continuity).

A trainer that rebuilds its training sequence by rendering the conversation through the chat template and
re-tokenizing it trains on ids the model did not sample wherever the text does not round-trip. This module
rebuilds the chat conversation of each rollout from its Responses-API items (reasoning, assistant message,
function_call, function_call_output), renders it the way the policy server renders a request
(`gymnb.policy.splice.render_ids`: same template, same tools), and compares with the ids the model generated:

- per model call: does re-rendering the call's own assistant message give back its generated ids?
- per rollout: where does the naive rendering of the whole conversation first leave the sampled sequence, and
  how many generated tokens lie past that point (trained at shifted positions or on different ids)?
The tokenizer must carry the chat template the server used (`gymnb.core.models.load_tokenizer(preset)` does).
"""

from __future__ import annotations

import collections
import dataclasses

from gymnb.core.errors import ContinuityError
from gymnb.core.responses import text_of
from gymnb.policy.splice import render_ids
from gymnb.tokens.continuity import check_continuity, extract_trainable_turns, output_items
from gymnb.tokens.divergence import KIND_LABELS, Divergence, find_divergence

ASSISTANT_ITEMS = ("reasoning", "message", "function_call")


def responses_tools_to_chat(tools: list[dict] | None) -> list[dict] | None:
    """Flat Responses tools `{"type": "function", "name", "parameters"}` -> chat `{"type", "function": {...}}`."""
    if not tools:
        return None
    out = []
    for tool in tools:
        if "function" in tool:
            out.append(tool)
            continue
        fn = {k: tool[k] for k in ("name", "description", "parameters") if k in tool}
        out.append({"type": "function", "function": fn})
    return out


def assistant_from_items(items: list[dict]) -> dict:
    """One chat assistant message from the items of one model call, folded the way the model server folds them
    (`gymnb.core.responses`): each reasoning summary becomes `<think>..</think>` in item order."""
    content, calls = "", []
    for item in items:
        if item.get("type") == "reasoning":
            content += "".join(f"<think>{part.get('text', '')}</think>" for part in item.get("summary") or [])
        elif item.get("type") == "function_call":
            calls.append({"id": item.get("call_id"), "type": "function",
                          "function": {"name": item.get("name"), "arguments": item.get("arguments") or "{}"}})
        else:
            content += text_of(item.get("content"))
    message = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = calls
    return message


def to_chat_messages(items: list[dict], call_ends: set[int] = frozenset()) -> tuple[list[dict], dict[int, int]]:
    """Responses items -> chat messages, and {item index ending a model call: its assistant message's index}.

    Assistant-side items are grouped until an item in `call_ends` (the carrier of a call's token fields) or a
    non-assistant item ends the group.
    """
    messages, pending, ends = [], [], {}

    def flush(end_index=None):
        if pending:
            messages.append(assistant_from_items(pending))
            pending.clear()
            if end_index is not None:
                ends[end_index] = len(messages) - 1

    for index, item in enumerate(items):
        kind = item.get("type", "message")
        if kind in ASSISTANT_ITEMS and item.get("role", "assistant") == "assistant":
            pending.append(item)
            if index in call_ends:
                flush(index)
            continue
        flush()
        if kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": text_of(item.get("output"))})
        elif "role" in item:
            role = "system" if item["role"] == "developer" else item["role"]
            messages.append({"role": role, "content": text_of(item.get("content"))})
    flush()
    return messages, ends


def rollout_conversation(rollout: dict) -> tuple[list[dict], list[dict] | None, list[int]]:
    """(chat messages, chat tools, index of each model call's assistant message) of a /run result."""
    params = rollout.get("responses_create_params") or {}
    source = params.get("input") or []
    input_items = [{"role": "user", "content": source}] if isinstance(source, str) else list(source)
    if params.get("instructions"):
        input_items.insert(0, {"role": "system", "content": params["instructions"]})
    turns = extract_trainable_turns(rollout)
    offset = len(input_items)
    ends = {offset + t["output_index"] for t in turns}
    messages, call_index = to_chat_messages(input_items + output_items(rollout), ends)
    return messages, responses_tools_to_chat(params.get("tools")), [call_index[e] for e in sorted(ends)]


@dataclasses.dataclass
class RolloutDrift:
    """Naive re-rendering vs generated ids for one rollout."""

    rollout_index: int
    call_divergences: list[Divergence | None]  # per model call: its own generation re-rendered
    full_divergence: Divergence | None  # whole conversation re-rendered vs the final sampled sequence
    generated_tokens: int
    off_policy_tokens: int  # generated tokens at or past the full divergence
    full_checked: bool  # False when the rollout itself breaks continuity (no single sampled sequence)


@dataclasses.dataclass
class DriftReport:
    rollouts: list[RolloutDrift]

    def to_dict(self) -> dict:
        calls = [d for r in self.rollouts for d in r.call_divergences]
        drifted = [r for r in self.rollouts if r.full_divergence is not None]
        generated = sum(r.generated_tokens for r in self.rollouts)
        off = sum(r.off_policy_tokens for r in self.rollouts)
        return {
            "num_rollouts": len(self.rollouts),
            "num_rollouts_drifted": len(drifted),
            "num_rollouts_unchecked": sum(not r.full_checked for r in self.rollouts),
            "rollout_kinds": dict(collections.Counter(r.full_divergence.kind for r in drifted)),
            "num_calls": len(calls),
            "num_calls_drifted": sum(d is not None for d in calls),
            "call_kinds": dict(collections.Counter(d.kind for d in calls if d is not None)),
            "generated_tokens": generated,
            "off_policy_tokens": off,
            "off_policy_share": off / generated if generated else 0.0,
            "examples": [dict(d.to_dict(), rollout_index=r.rollout_index) for r in drifted[:5]
                         for d in [r.full_divergence]],
        }

    def describe(self) -> str:
        s = self.to_dict()
        lines = [(f"naive re-tokenization: {s['num_rollouts_drifted']}/{s['num_rollouts']} rollouts and "
                 f"{s['num_calls_drifted']}/{s['num_calls']} model calls would go off-policy; "
                 f"{s['off_policy_tokens']}/{s['generated_tokens']} generated tokens "
                 f"({100 * s['off_policy_share']:.1f}%) trained on ids or positions the model did not sample")]
        if s["num_rollouts_unchecked"]:
            lines.append(f"  ({s['num_rollouts_unchecked']} rollout(s) break continuity: "
                         "only their calls were audited)")
        for kind, count in sorted(s["rollout_kinds"].items(), key=lambda kv: -kv[1]):
            lines.append(f"  whole conversation, {KIND_LABELS.get(kind, kind)}: {count} rollout(s)")
        for kind, count in sorted(s["call_kinds"].items(), key=lambda kv: -kv[1]):
            lines.append(f"  own generation, {KIND_LABELS.get(kind, kind)}: {count} call(s)")
        return "\n".join(lines)


def audit_rollout(rollout: dict, tokenizer, *, rollout_index: int = 0, chat_template_kwargs=None) -> RolloutDrift:
    messages, tools, call_messages = rollout_conversation(rollout)
    turns = extract_trainable_turns(rollout)

    def render(msgs, add_generation_prompt):
        return render_ids(tokenizer, msgs, tools, chat_template_kwargs, add_generation_prompt)

    call_divergences = []
    for turn, at in zip(turns, call_messages):
        naive_prompt, naive = render(messages[:at], True), render(messages[:at + 1], False)
        gen = turn["generation_token_ids"]
        if naive[:len(naive_prompt)] == naive_prompt:
            div = find_divergence(gen, naive[len(naive_prompt):], tokenizer, generation_start=0)
        else:  # a template that rewrites history when a turn is appended: compare whole sequences
            div = find_divergence(turn["prompt_token_ids"] + gen, naive, tokenizer,
                                  generation_start=len(turn["prompt_token_ids"]))
        if div is not None:
            div.model_call, div.rollout_index = len(call_divergences), rollout_index
        call_divergences.append(div)
    generated = sum(len(t["generation_token_ids"]) for t in turns)
    if not turns or not check_continuity(rollout).ok:
        return RolloutDrift(rollout_index, call_divergences, None, generated, 0, False)
    last = turns[-1]
    sampled = last["prompt_token_ids"] + last["generation_token_ids"]
    full = find_divergence(sampled, render(messages[:call_messages[-1] + 1], False), tokenizer,
                           generation_start=len(last["prompt_token_ids"]))
    off = 0
    if full is not None:
        full.rollout_index = rollout_index
        for turn in turns:
            start = len(turn["prompt_token_ids"])
            end = start + len(turn["generation_token_ids"])
            off += max(0, end - max(start, full.token_index))
    return RolloutDrift(rollout_index, call_divergences, full, generated, off, True)


def audit_drift(rollouts, tokenizer, *, chat_template_kwargs=None) -> DriftReport:
    """Audit every rollout that carries token fields (others are skipped)."""
    results = []
    for index, rollout in enumerate(rollouts):
        try:
            if not extract_trainable_turns(rollout):
                continue
        except ContinuityError:  # structurally broken rollouts are the continuity check's business
            continue
        results.append(audit_rollout(rollout, tokenizer, rollout_index=index,
                                     chat_template_kwargs=chat_template_kwargs))
    return DriftReport(results)
