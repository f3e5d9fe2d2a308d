"""Constructed NeMo Gym rollouts for continuity tests: real tokenizer, real chat template, chosen client faults.

A conversation is a list of input messages plus assistant turns. Each turn says what the model generated
(text, optionally non-canonical ids) and what the environment answered. A *client* decides how each next prompt
is built: `splice_client` follows docs/protocol.md section 2 (the ids stay on-policy); the others reproduce the
faults an integration makes (re-rendering text, dropping the eos, cutting history).
"""

from __future__ import annotations

import json

from gymnb.tokens.drift import responses_tools_to_chat


def render_ids(tokenizer, messages, tools=None, add_generation_prompt=False) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
    return tokenizer.encode(text, add_special_tokens=False)


def splice_client(tokenizer, prev_prompt, prev_gen, messages, tools):
    """The protocol's splice: generated ids as the prefix, the template's tail from the matching eos on."""
    eos = tokenizer.eos_token_id
    prefix = prev_prompt + prev_gen
    if prefix[-1] == eos:
        prefix = prefix[:-1]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    count = render_ids(tokenizer, messages[:last + 1], tools).count(eos)
    template_ids = render_ids(tokenizer, messages, tools, add_generation_prompt=True)
    start = [i for i, t in enumerate(template_ids) if t == eos][count - 1]
    return prefix + template_ids[start:]


def naive_client(tokenizer, prev_prompt, prev_gen, messages, tools):
    """Re-render the whole conversation as text and re-tokenize it: the classic off-policy fault."""
    return render_ids(tokenizer, messages, tools, add_generation_prompt=True)


def drop_eos_client(tokenizer, prev_prompt, prev_gen, messages, tools):
    """A splice that cuts one token too many: the end-of-turn token disappears from the history."""
    spliced = splice_client(tokenizer, prev_prompt, prev_gen, messages, tools)
    at = len(prev_prompt) + len(prev_gen) - 1
    return spliced[:at] + spliced[at + 1:]


def make_dropping_client(drop: int, from_message: int = 1):
    """Splice correctly, except once the conversation is long: then re-render it without `drop` messages after
    the first `from_message` ones (context management that forgets the ids are the source of truth)."""
    def client(tokenizer, prev_prompt, prev_gen, messages, tools):
        if len(messages) <= from_message + drop + 1:
            return splice_client(tokenizer, prev_prompt, prev_gen, messages, tools)
        kept = messages[:from_message] + messages[from_message + drop:]
        return render_ids(tokenizer, kept, tools, add_generation_prompt=True)
    return client


def make_left_truncating_client(keep: int):
    """Splice, then keep only the last `keep` ids (a server cutting an overlong prompt on the left)."""
    def client(tokenizer, prev_prompt, prev_gen, messages, tools):
        return splice_client(tokenizer, prev_prompt, prev_gen, messages, tools)[-keep:]
    return client


def generation_ids(tokenizer, turn) -> list[int]:
    ids = turn.get("gen_ids") or tokenizer.encode(turn["text"], add_special_tokens=False)
    return ids + ([] if turn.get("cut") else [tokenizer.eos_token_id])


def assistant_message(turn) -> dict:
    """What a model server parses out of the generated text (the client re-renders this)."""
    content = turn.get("content", turn["text"] if not turn.get("tool_calls") else "")
    if turn.get("reasoning") is not None:
        content = f"<think>{turn['reasoning']}</think>{content}"
    msg = {"role": "assistant", "content": content}
    if turn.get("tool_calls"):
        msg["tool_calls"] = [{"id": f"call_{i}", "type": "function", "function": {"name": n, "arguments": a}}
                             for i, (n, a) in enumerate(turn["tool_calls"])]
    return msg


def turn_items(turn, fields) -> list[dict]:
    """The Responses-API output items of one model call; the last one carries the token fields."""
    items = []
    if turn.get("reasoning") is not None:
        items.append({"type": "reasoning", "id": "rs", "summary": [{"type": "summary_text",
                                                                      "text": turn["reasoning"]}]})
    content = assistant_message(turn)["content"]
    if turn.get("reasoning") is not None:
        content = content.split("</think>", 1)[1]
    if content or not turn.get("tool_calls"):
        items.append({"type": "message", "role": "assistant", "id": "msg", "status": "completed",
                      "content": [{"type": "output_text", "text": content, "annotations": []}]})
    for i, (name, args) in enumerate(turn.get("tool_calls") or []):
        items.append({"type": "function_call", "name": name, "arguments": args, "call_id": f"call_{i}",
                      "id": f"fc_{i}", "status": "completed"})
    items[-1].update(fields)
    return items


def build_rollout(tokenizer, input_messages, turns, *, tools=None, client=splice_client, reward=1.0) -> dict:
    """A /run result for `turns` (dicts: text, gen_ids?, cut?, content?, reasoning?, tool_calls?: [(name, json)],
    tool_outputs?: [str], user_after?: str), with prompts built by `client`."""
    chat_tools = responses_tools_to_chat(tools) if tools else None
    messages = [dict(m) for m in input_messages]
    output, prompt, gen = [], None, None
    for turn in turns:
        if prompt is None:
            prompt = render_ids(tokenizer, messages, chat_tools, add_generation_prompt=True)
        else:
            prompt = client(tokenizer, prompt, gen, messages, chat_tools)
        gen = generation_ids(tokenizer, turn)
        logprobs = [-0.5 - 0.01 * i for i in range(len(gen))]
        output += turn_items(turn, {"prompt_token_ids": prompt, "generation_token_ids": gen,
                                    "generation_log_probs": logprobs})
        messages.append(assistant_message(turn))
        for i, text in enumerate(turn.get("tool_outputs") or []):
            output.append({"type": "function_call_output", "call_id": f"call_{i}", "output": text})
            messages.append({"role": "tool", "tool_call_id": f"call_{i}", "content": text})
        if turn.get("user_after"):
            output.append({"type": "message", "role": "user",
                           "content": [{"type": "input_text", "text": turn["user_after"]}]})
            messages.append({"role": "user", "content": turn["user_after"]})
    params = {"input": input_messages}
    if tools:
        params["tools"] = tools
    return {"responses_create_params": params, "response": {"id": "resp", "object": "response",
                                                            "model": "tiny", "output": output},
            "reward": reward}


def tool(name: str, **props) -> dict:
    """A Responses-API function tool with string parameters."""
    return {"type": "function", "name": name, "description": f"{name} tool", "strict": False,
            "parameters": {"type": "object", "properties": {k: {"type": "string", "description": v}
                                                            for k, v in props.items()},
                           "required": list(props), "additionalProperties": False}}


def call_text(name: str, args: dict, *, compact: bool = False) -> str:
    """Generated text of a tool call: pretty as the template renders it, or compact (re-renders differently)."""
    sep = (",", ":") if compact else (", ", ": ")
    body = json.dumps({"name": name, "arguments": args}, separators=sep)
    return f"<tool_call>\n{body}\n</tool_call>"
