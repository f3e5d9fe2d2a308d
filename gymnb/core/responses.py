"""Model server, conversion stage: OpenAI Responses API <-> Chat Completions, token fields carried unchanged.

Responses -> chat (the request):
- `input` as a string becomes one user message; `instructions` becomes the leading system message.
- Consecutive `reasoning`, assistant `message` and `function_call` items fold into ONE assistant chat message:
  reasoning summaries as `<think>..</think>` at the start of its content, function calls as its `tool_calls`.
  Token fields (`prompt_token_ids`, `generation_token_ids`, `generation_log_probs`) found on any of those items
  ride on that assistant message, so the policy server can splice the ids it generated (docs/protocol.md section 2).
- `function_call_output` items become `tool` messages; `max_output_tokens` becomes `max_tokens`; `n` is 1.
- `metadata` (string values, as OpenAI requires): `chat_template_kwargs` and `extra_body` hold JSON objects
  merged into the chat request, as NeMo Gym's vllm_model does (per-row template switches, extra sampling
  fields such as the per-rollout `seed` gymnb.rollouts.collect sets; the request's own fields win over `extra_body`).
  Other metadata keys are not interpreted, as in real vllm_model.

Chat -> Responses (the answer):
- `<think>..</think>` in the content (or a `reasoning_content` field) -> a `reasoning` item; the rest -> a
  `message` item with one `output_text`; each tool call -> a `function_call` item (`call_id` = the tool call id).
- The token fields of the call go on the LAST output item, covering the whole generation.
- `finish_reason == "length"` -> `status: "incomplete"`, `incomplete_details: {"reason": "max_output_tokens"}`.
"""

from __future__ import annotations

import json
import re
import time
import uuid

from gymnb.core.errors import RequestError
from gymnb.core.wire import TOKEN_FIELDS, VLLM_MODEL_TOKEN_REQUEST

THINK_RE = re.compile(r"<think>(.*?)</think>", re.DOTALL)
# Responses request fields echoed back on the Response object, as OpenAI does.
ECHOED_FIELDS = ("instructions", "max_output_tokens", "metadata", "parallel_tool_calls", "previous_response_id",
                 "reasoning", "temperature", "text", "tool_choice", "tools", "top_p", "truncation", "user")


def token_fields_of(item: dict) -> dict | None:
    """The three token fields of `item`, all or none (a partial set is a client error)."""
    present = [f for f in TOKEN_FIELDS if item.get(f) is not None]
    if not present:
        return None
    if len(present) != len(TOKEN_FIELDS):
        missing = sorted(set(TOKEN_FIELDS) - set(present))
        raise RequestError(f"an input item carries {present} but not {missing}: send all three token fields or none",
                           param=missing[0], code="partial_token_fields", status=422)
    return {f: item[f] for f in TOKEN_FIELDS}


def text_of(content) -> str:
    """Text of Responses content: a string, or a list of input_text / output_text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


def _chat_content(content):
    """Responses message content -> chat content (a string, or text parts)."""
    if isinstance(content, list):
        return [{"type": "text", "text": part.get("text", "")} for part in content if isinstance(part, dict)]
    return content if content is not None else ""


class _AssistantBuffer:
    """Collects the items of one model turn into one assistant chat message."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.active, self.content, self.tool_calls, self.tokens = False, "", [], None

    def flush(self, messages: list[dict]) -> None:
        if self.active:
            message = {"role": "assistant", "content": self.content or None}
            if self.tool_calls:  # omitted rather than empty: OpenAI rejects `tool_calls: []`
                message["tool_calls"] = self.tool_calls
            if self.tokens:
                message.update(self.tokens)
            messages.append(message)
        self.reset()


def input_to_messages(items: list[dict] | str) -> list[dict]:
    """Responses `input` -> chat `messages` (see the module docstring)."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[dict] = []
    turn = _AssistantBuffer()
    for i, item in enumerate(items):
        kind = item.get("type") or ("message" if item.get("role") else None)
        if kind == "message" and item.get("role") == "assistant":
            turn.active = True
            turn.content += text_of(item.get("content"))
            turn.tool_calls += [dict(tc) for tc in item.get("tool_calls") or []]
        elif kind == "reasoning":
            turn.active = True
            turn.content += "".join(f"<think>{s.get('text', '')}</think>" for s in item.get("summary") or [])
        elif kind == "function_call":
            turn.active = True
            turn.tool_calls.append({"id": item.get("call_id") or item.get("id"), "type": "function",
                                    "function": {"name": item.get("name"), "arguments": item.get("arguments")}})
        elif kind == "function_call_output":
            turn.flush(messages)
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": text_of(item.get("output"))})
        elif kind == "message" and item.get("role") in ("user", "system", "developer", "tool"):
            turn.flush(messages)
            message = {"role": item["role"], "content": _chat_content(item.get("content"))}
            if item["role"] == "tool":
                message["tool_call_id"] = item.get("tool_call_id")
            messages.append(message)
        else:
            raise RequestError(f"input[{i}]: item type {kind!r} (role {item.get('role')!r}) has no chat "
                               "equivalent", param=f"input[{i}]", code="unsupported_item", status=422)
        tokens = token_fields_of(item)
        if tokens is not None and turn.active:
            turn.tokens = tokens
    turn.flush(messages)
    return messages


def responses_to_chat(params: dict, *, model: str, chat_template_kwargs: dict | None = None,
                      vllm_logprobs: bool = False) -> dict:
    """A Responses create request -> the chat completions request body for the policy endpoint."""
    messages = input_to_messages(params["input"])
    if params.get("instructions"):
        messages.insert(0, {"role": "system", "content": params["instructions"]})
    body = {"model": model, "messages": messages, "n": 1}
    for key in ("temperature", "top_p"):
        if params.get(key) is not None:
            body[key] = params[key]
    if params.get("max_output_tokens") is not None:
        body["max_tokens"] = params["max_output_tokens"]
    if (params.get("reasoning") or {}).get("effort") is not None:
        body["reasoning_effort"] = params["reasoning"]["effort"]
    tools = [tool for tool in params.get("tools") or [] if tool.get("type", "function") == "function"]
    if tools:
        body["tools"] = [{"type": "function", "function": {k: v for k, v in tool.items() if k not in ("type", "strict")}}
                         for tool in tools]
        for key in ("tool_choice", "parallel_tool_calls"):
            if params.get(key) is not None:
                body[key] = params[key]
    metadata = params.get("metadata") or {}
    template_kwargs = {**(chat_template_kwargs or {}), **_metadata_json(metadata, "chat_template_kwargs")}
    if template_kwargs:
        body["chat_template_kwargs"] = template_kwargs
    body = {**_metadata_json(metadata, "extra_body"), **body}
    if vllm_logprobs:
        # What real vllm_model asks of every training request: the sampled ids as "token_id:N" logprobs.
        body.update(VLLM_MODEL_TOKEN_REQUEST)
    return body


def _metadata_json(metadata: dict, key: str) -> dict:
    """`metadata[key]`, a JSON object in a string (OpenAI metadata values are strings), or {}."""
    raw = metadata.get(key)
    if raw is None:
        return {}
    try:
        value = json.loads(raw) if isinstance(raw, str) else raw
    except json.JSONDecodeError as exc:
        raise RequestError(f"metadata.{key} is not valid JSON: {exc}", param=f"metadata.{key}", status=422) from None
    if not isinstance(value, dict):
        raise RequestError(f"metadata.{key} must hold a JSON object", param=f"metadata.{key}", status=422)
    return value


def split_reasoning(message: dict) -> tuple[list[str], str]:
    """(reasoning texts, remaining content) of an assistant chat message."""
    content = message.get("content") or ""
    reasoning = [text for text in THINK_RE.findall(content)]
    content = THINK_RE.sub("", content)
    parsed = message.get("reasoning_content") or message.get("reasoning")
    if parsed:
        reasoning.insert(0, parsed)
    return reasoning, content


def message_to_output(message: dict, *, uses_reasoning_parser: bool = True) -> list[dict]:
    """One assistant chat message -> Responses output items, token fields on the last one."""
    if uses_reasoning_parser:
        reasoning, content = split_reasoning(message)
    else:
        reasoning, content = [], message.get("content") or ""
    output = []
    if reasoning:
        output.append({"id": f"rs_{uuid.uuid4().hex}", "type": "reasoning", "status": "completed",
                       "summary": [{"type": "summary_text", "text": text} for text in reasoning]})
    tool_calls = message.get("tool_calls") or []
    if content or not (output or tool_calls):
        output.append({"id": f"msg_{uuid.uuid4().hex}", "type": "message", "role": "assistant",
                       "status": "completed",
                       "content": [{"type": "output_text", "text": content, "annotations": []}]})
    for call in tool_calls:
        call_id = call.get("id") or f"call_{uuid.uuid4().hex[:24]}"
        function = call.get("function") or {}
        output.append({"id": call_id, "type": "function_call", "call_id": call_id, "status": "completed",
                       "name": function.get("name"), "arguments": function.get("arguments") or ""})
    tokens = {f: message[f] for f in TOKEN_FIELDS if f in message}
    if tokens:
        output[-1].update(tokens)
    return output


def chat_to_response(params: dict, completion: dict, *, model: str, uses_reasoning_parser: bool = True) -> dict:
    """A chat completion (first choice) -> a Response object answering `params`."""
    choice = completion["choices"][0]
    output = message_to_output(choice.get("message") or {}, uses_reasoning_parser=uses_reasoning_parser)
    incomplete = None
    if choice.get("finish_reason") == "length":
        incomplete = {"reason": "max_output_tokens"}
    elif choice.get("finish_reason") == "content_filter":
        incomplete = {"reason": "content_filter"}
    usage = completion.get("usage") or {}
    response = {
        "id": f"resp_{uuid.uuid4().hex}", "object": "response",
        "created_at": float(completion.get("created") or time.time()), "model": params.get("model") or model,
        "status": "incomplete" if incomplete else "completed", "error": None, "incomplete_details": incomplete,
        "output": output,
        "usage": {"input_tokens": usage.get("prompt_tokens", 0), "output_tokens": usage.get("completion_tokens", 0),
                  "total_tokens": usage.get("total_tokens", 0), "input_tokens_details": {"cached_tokens": 0},
                  "output_tokens_details": {"reasoning_tokens": 0}},
    }
    response.update({key: params.get(key) for key in ECHOED_FIELDS})
    response["tool_choice"] = params.get("tool_choice") or "auto"
    response["tools"] = params.get("tools") or []
    response["parallel_tool_calls"] = params.get("parallel_tool_calls", True)
    return response
