"""Validation layer 04, token continuity: each model call's prompt continues the ids the model generated.

Checked over every rollout of layer 03 and over probe conversations sent straight to the policy server:
- `live`: a multi-turn chat with real generations, each earlier assistant turn sent back with its token fields
  (covers the splice even when the policy made no tool calls in the rollouts);
- `splice_bpe`, `splice_tool_call`: histories whose generated ids differ from what re-rendering their text
  gives, as sampled generations do: a valid but non-canonical BPE split, and a tool call in the model's own
  JSON spacing. A server that splices continues those ids; one that re-tokenizes history cannot.
The drift audit (information, not a check) shows what naive re-tokenization would have cost the rollouts.
"""

from __future__ import annotations

import html

from gymnb.core.client import describe, request_json
from gymnb.core.errors import GymnbError, ServerError
from gymnb.core.wire import TokenIds
from gymnb.validation.checks.endpoint import NEMO_GYM_TOKEN_REQUEST, assistant_turn, completion_token_ids
from gymnb.validation.checks.integration import Integration
from gymnb.validation.checks.plots import plot_bars
from gymnb.validation.checks.result import LayerResult

LIVE_PROMPTS = ["Tell me about the moon in a few sentences.", "Go on, in a new paragraph.", "And then?"]
BPE_TEXT = "Skinny jeans are back."
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
# How models often write a call (compact JSON); the template renders `{"name": "get_weather", "arguments": ...}`.
TOOL_CALL_TEXT = '<tool_call>\n{"name":"get_weather","arguments":{"city":"Paris"}}\n</tool_call>'


def chat(integration: Integration, messages: list[dict], *, max_tokens: int, temperature: float = 1.0,
         tools: list | None = None) -> tuple[dict, TokenIds]:
    """One chat completion as NeMo Gym requests it; (the completion, its token ids as NeMo Gym reads them)."""
    body = {"model": integration.model_id, "messages": messages, "max_tokens": max_tokens,
            "temperature": temperature, **NEMO_GYM_TOKEN_REQUEST}
    if tools:
        body["tools"] = tools
    reply = request_json("POST", f"{integration.base_url}/v1/chat/completions", body, api_key=integration.api_key)
    if not reply.ok:
        raise ServerError(f"probe chat completion failed: {describe(reply)}")
    sources, problem = completion_token_ids(integration.base_url, body, reply.body, integration.api_key)
    if not sources:
        raise ServerError(f"the policy server returned no token ids a trainer could use "
                          f"({problem or 'none in any shape'}), so continuity cannot be probed; layer 01 shows what it "
                          "returns")
    return reply.body, sources[0]


def served_prompt_ids(integration: Integration, messages: list[dict], tools: list | None = None) -> list[int]:
    """The prompt ids the server uses for `messages`, from a one-token completion (needs no /tokenize)."""
    return chat(integration, messages, max_tokens=1, tools=tools)[1].prompt_token_ids


def output_item(message: dict, ids: TokenIds | dict) -> dict:
    """An assistant chat message as a Responses output item carrying its token fields."""
    fields = ids.as_fields() if isinstance(ids, TokenIds) else ids
    return {"type": "message", "role": "assistant",
            "content": [{"type": "output_text", "text": message.get("content") or ""}], **fields}


def probe_rollout(name: str, items: list[dict], title: str | None = None) -> dict:
    """A probe as a rollout; it sent every assistant turn back with its token fields, so a break is the server's.
    `title` names it in the explorer (`BPE merge Sk|inny`)."""
    probe = {"probe": name, "sent_token_fields": True, "response": {"output": items}}
    return {**probe, "title": title} if title else probe


def first_word_split(tokenizer, ids: list[int], text: str) -> str:
    """The pieces of `ids` that spell the first word of `text`, joined by `|` (`Sk|inny`)."""
    word, pieces = text.split()[0], []
    for token in ids:
        pieces.append(tokenizer.decode([token]))
        if len("".join(pieces).strip()) >= len(word):
            break
    return "|".join(piece.strip() for piece in pieces)


def run_live_probe(integration: Integration, num_turns: int, max_tokens: int) -> dict:
    messages, items = [], []
    for turn in range(num_turns):
        user = {"role": "user", "content": LIVE_PROMPTS[min(turn, len(LIVE_PROMPTS) - 1)]}
        messages.append(user)
        items.append({"type": "message", **user})
        completion, ids = chat(integration, messages, max_tokens=max_tokens)
        messages.append(assistant_turn(completion, ids))
        items.append(output_item(completion["choices"][0]["message"], ids))
    return probe_rollout("live", items)


def run_splice_probe(integration: Integration, tokenizer, *, tool_call: bool) -> dict:
    """Send back a history whose generated ids are not what re-tokenizing its text gives; ask for one more turn."""
    from gymnb.validation.checks.roundtrip import noncanonical_ids

    tools = [WEATHER_TOOL] if tool_call else None
    user = {"role": "user", "content": "What is the weather in Paris?" if tool_call else "Say something about jeans."}
    prompt_ids = served_prompt_ids(integration, [user], tools)
    if tool_call:
        generated = tokenizer.encode(TOOL_CALL_TEXT, add_special_tokens=False) + [tokenizer.eos_token_id]
        assistant = {"role": "assistant", "content": "", "tool_calls": [{
            "id": "call_probe", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}
        follow = {"role": "tool", "tool_call_id": "call_probe", "content": '{"temperature_c": 18}'}
    else:
        generated = noncanonical_ids(tokenizer, BPE_TEXT)
        if generated is None:
            raise GymnbError(f"the tokenizer encodes every split of {BPE_TEXT!r} canonically: no BPE probe possible")
        assistant = {"role": "assistant", "content": BPE_TEXT}  # as if cut by max_tokens: no eos
        follow = {"role": "user", "content": "Why?"}
    fields = {"prompt_token_ids": prompt_ids, "generation_token_ids": generated,
              "generation_log_probs": [-1.0] * len(generated)}
    assistant.update(fields)
    completion, ids = chat(integration, [user, assistant, follow], max_tokens=4, tools=tools)
    items = [{"type": "message", **user}, {**output_item(assistant, fields), "tool_calls": assistant.get("tool_calls")},
             {"type": "message", **follow}, output_item(completion["choices"][0]["message"], ids)]
    if tool_call:
        return probe_rollout("splice_tool_call", items, "tool call in compact JSON")
    return probe_rollout("splice_bpe", items, f"BPE merge {first_word_split(tokenizer, generated, BPE_TEXT)}")


def run_multiturn_probe(integration: Integration, tokenizer, *, num_turns: int = 2,
                        max_tokens: int = 32) -> list[dict]:
    """The probe conversations (see module docstring), each shaped as a rollout for `check_continuity`.

    A probe the server cannot answer with token ids comes back as `{"probe": name, "error": reason}`, so the
    layer records a failed check instead of stopping.
    """
    runs = [("live", lambda: run_live_probe(integration, num_turns, max_tokens))] if num_turns >= 2 else []
    runs += [("splice_bpe", lambda: run_splice_probe(integration, tokenizer, tool_call=False)),
             ("splice_tool_call", lambda: run_splice_probe(integration, tokenizer, tool_call=True))]
    probes = []
    for name, run in runs:
        try:
            probes.append(run())
        except ServerError as exc:
            probes.append({"probe": name, "error": str(exc)})
    return probes


def check_token_continuity(rollouts: list[dict], tokenizer, *, probes: list[dict] = (), output_dir=".") -> LayerResult:
    """Layer 04: continuity of every rollout and probe, the first divergence as a token view, the drift audit."""
    from gymnb.tokens.continuity import check_continuity, check_rollouts

    result = LayerResult("token_continuity", output_dir=str(output_dir))
    failed_probes = [p for p in probes if "error" in p]
    probes = [p for p in probes if "error" not in p]
    verdicts = [check_continuity(probe, tokenizer) for probe in probes]
    summary = check_rollouts(rollouts, tokenizer)
    blame_rollouts(summary.broken, probes_ok=all(v.ok for v in verdicts) if probes else None)
    first_broken = summary.broken[0] if summary.broken else None
    result.add("every rollout is continuous across its model calls", summary.ok and summary.num_rollouts > 0,
               f"{len(summary.broken)} of {summary.num_rollouts} rollouts broken; first: {first_broken.describe()}"
               if first_broken else f"{summary.num_rollouts} rollouts, {summary.num_multi_turn} multi-turn"
               if summary.num_rollouts else "no rollouts to check: layer 03 collected none (see its report)")
    for probe in failed_probes:
        result.add(f"probe {probe['probe']}: answered with token ids", False, probe["error"])
    broken_probes = [(probe, verdict) for probe, verdict in zip(probes, verdicts) if not verdict.ok]
    for probe, verdict in zip(probes, verdicts):
        result.add(f"probe {probe['probe']}: continuous over {verdict.num_calls} model calls", verdict.ok,
                   verdict.describe().replace("rollout: ", "", 1))
    multi_probes = sum(v.num_calls > 1 for v in verdicts)
    result.add("at least one multi-turn sequence was checked", summary.num_multi_turn + multi_probes > 0,
               f"{summary.num_multi_turn} multi-turn rollouts, {multi_probes} multi-turn probes")
    num_broken_probes = sum(not v.ok for v in verdicts)
    result.figures.update(num_rollouts=summary.num_rollouts, num_multi_turn=summary.num_multi_turn,
                          num_broken=len(summary.broken) + num_broken_probes,
                          num_broken_rollouts=len(summary.broken), num_probes=len(probes),
                          num_broken_probes=num_broken_probes, **summary.kinds)
    if first_broken is not None and first_broken.divergence is not None:
        result.figures["first_divergence"] = short_divergence(first_broken.divergence, f"rollout {first_broken.rollout_index}")
    elif broken_probes and broken_probes[0][1].divergence is not None:
        probe, verdict = broken_probes[0]
        result.figures["first_divergence"] = short_divergence(verdict.divergence, f"probe {probe['probe']}")
    add_drift_audit(result, rollouts, tokenizer)
    result.plots.append(plot_sequences(rollouts, probes, output_dir).name)
    if first_broken is not None:
        example, fix = rollouts[first_broken.rollout_index], getattr(first_broken.divergence, "fix", None)
    else:
        example, fix = (broken_probes[0][0], None) if broken_probes else (None, None)
    result.details_html = render_example(example, rollouts, probes, tokenizer, fix=fix)
    return result


def blame_rollouts(broken: list, *, probes_ok: bool | None) -> None:
    """Name the side at fault in each broken rollout's fix, from the probes' evidence: probes send the token
    fields, so probes that stay continuous clear the server (the client dropped the fields), and a broken probe
    convicts it. Without probes the fix names both sides."""
    from gymnb.tokens.divergence import fix_for

    for verdict in broken:
        if verdict.divergence is not None:
            sent = None if probes_ok is None else not probes_ok
            verdict.divergence.fix = fix_for(verdict.divergence.kind, sent)


def short_divergence(div, where: str) -> str:
    from gymnb.tokens.divergence import KIND_LABELS

    return f"{where}, model call {div.model_call}, token {div.token_index}: {KIND_LABELS.get(div.kind, div.kind)}"


def add_drift_audit(result: LayerResult, rollouts: list[dict], tokenizer) -> None:
    """What training on naively re-tokenized conversations would have cost (figures, not a check)."""
    from gymnb.tokens.drift import audit_drift

    report = audit_drift(rollouts, tokenizer)
    stats = report.to_dict()
    result.figures.update(naive_drifted_rollouts=stats["num_rollouts_drifted"],
                          naive_drifted_calls=stats["num_calls_drifted"],
                          naive_off_policy_tokens=stats["off_policy_tokens"],
                          naive_off_policy_share=round(stats["off_policy_share"], 4))
    result.details_html += f"<h4>Drift audit (naive re-tokenization)</h4><pre>{html.escape(report.describe())}</pre>"


def plot_sequences(rollouts: list[dict], probes: list[dict], output_dir, limit: int = 30):
    """Model calls of each probe and multi-turn rollout, red where continuity breaks."""
    from gymnb.tokens.continuity import check_continuity

    labels, calls, ok = [], [], []
    for probe in probes:
        verdict = check_continuity(probe)
        labels.append(f"probe {probe['probe']}"), calls.append(verdict.num_calls), ok.append(verdict.ok)
    for index, rollout in enumerate(rollouts):
        verdict = check_continuity(rollout)
        if (verdict.num_calls > 1 or not verdict.ok) and len(labels) < limit:
            labels.append(f"rollout {index}"), calls.append(verdict.num_calls), ok.append(verdict.ok)
    return plot_bars(labels, calls, ok, output_dir, "continuity", title="Multi-turn sequences (red = broken)",
                     xlabel="model calls")


def render_example(example: dict | None, rollouts: list[dict], probes: list[dict], tokenizer, *,
                   fix: str | None = None) -> str:
    """Token view of the first broken sequence; else of one continuous multi-turn sequence."""
    from gymnb.tokens.continuity import check_continuity
    from gymnb.tokens.tokenview import render_rollout_html

    if example is None:
        multi = [r for r in list(rollouts) + list(probes) if check_continuity(r).num_calls > 1]
        if not multi:
            return ""
        example = multi[0]
        title = "Token view of a continuous multi-turn sequence"
    else:
        title = "Token view of the first divergence"
    name = f"probe {example['probe']}" if "probe" in example else "rollout"
    return f"<h4>{title} ({html.escape(name)})</h4>" + render_rollout_html(example, tokenizer, fix=fix)
