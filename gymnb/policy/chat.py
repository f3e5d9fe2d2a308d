"""Policy server, chat stage: validate a chat-completions request, parse tool calls, shape the response.

Request (OpenAI chat completions plus the on-policy extras)::

    {"model": "smollm2-135m",
     "messages": [{"role": "user", "content": "What is 2+2?"},
                  {"role": "assistant", "content": "4", "prompt_token_ids": [...],
                   "generation_token_ids": [...], "generation_log_probs": [...]},
                  {"role": "user", "content": "And 3+3?"}],
     "tools": [{"type": "function", "function": {"name": "add", "parameters": {...}}}],
     "temperature": 1.0, "top_p": 1.0, "top_k": -1, "seed": 0, "n": 1, "max_tokens": 64, "stop": ["\\n\\n"],
     "logprobs": false, "top_logprobs": 0, "required_prefix_token_ids": null, "chat_template_kwargs": {},
     "ignore_eos": false, "return_tokens_as_token_ids": false, "return_token_ids": false}

Each `choices[i].message` of the response carries `prompt_token_ids`, `generation_token_ids` and
`generation_log_probs` next to `content` and `tool_calls`. vLLM's two ways of returning ids are served too
(gymnb.core.wire describes all three): `return_tokens_as_token_ids` writes every `logprobs.content[t].token` (and
each top alternative) as `"token_id:<N>"`, which real NeMo Gym's vllm_model parses; `return_token_ids` adds a
top-level `prompt_token_ids` and `choices[i].token_ids`. OpenAI fields that do not change sampling
(`metadata`, `parallel_tool_calls`, a tool's `strict`, `user`, ...) are accepted and ignored. Tools may come in the chat shape above or in the
flat Responses shape `{"type": "function", "name": ..., "parameters": ...}`; both render the same.
The model calls tools as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Hermes/Qwen style).
`tool_choice` is accepted but not enforced by constrained decoding ("none" turns off tool-call parsing).
Unknown top-level fields are ignored, as OpenAI-compatible servers do; values we cannot honour are refused.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
import uuid

from gymnb.core.errors import RequestError
from gymnb.core.wire import TOKEN_FIELDS, TOKEN_ID_PREFIX
from gymnb.policy.engine import Completion, SamplingParams

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_N = 128
MAX_TOP_LOGPROBS = 20
MAX_STOP_CHARS = 1024
INT32_MAX = 2**31 - 1
# torch.Generator seeds and OpenAI's `seed` are 64-bit; vLLM takes the int64 range.
SEED_RANGE = (-(2**63), 2**63 - 1)
# apply_chat_template arguments that are not template variables: they swap the template (chat_template),
# change what is returned (tokenize, return_dict, ...), or carry inputs that have request fields of their own
# (tools) or that this server does not take (documents), so a client could put unchecked text in the prompt.
# A request naming one is refused; `add_generation_prompt` is the server's to decide and is ignored.
TEMPLATE_ARGUMENTS = frozenset({
    "chat_template", "conversation", "messages", "tools", "documents", "continue_final_message", "tokenize",
    "padding", "truncation", "max_length", "return_tensors", "return_dict", "return_assistant_tokens_mask",
    "tokenizer_kwargs"})
TOOL_CALL_RE = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


@dataclasses.dataclass
class ChatRequest:
    """A validated request: what the splice needs (messages..) and what the engine needs (sampling)."""

    messages: list[dict]
    tools: list[dict] | None
    chat_template_kwargs: dict | None
    required_prefix_token_ids: list[int] | None
    sampling: SamplingParams
    parse_tools: bool
    logprobs: bool
    tokens_as_ids: bool = False  # return_tokens_as_token_ids: logprobs tokens as "token_id:<N>"
    return_token_ids: bool = False  # vLLM's top-level prompt_token_ids and choices[i].token_ids


def parse_tool_calls(text: str) -> tuple[str, list[dict]]:
    """Split model output into (content, tool_calls). Malformed `<tool_call>` blocks stay in the content.

    >>> content, calls = parse_tool_calls('Sure.<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>')
    >>> content, calls[0]["function"]
    ('Sure.', {'name': 'f', 'arguments': '{"a": 1}'})
    """
    calls, kept, pos = [], [], 0
    for match in TOOL_CALL_RE.finditer(text):
        call = decode_tool_call(match.group(1))
        if call is None:
            continue
        kept.append(text[pos:match.start()])
        pos = match.end()
        calls.append(call)
    if not calls:
        return text, []
    kept.append(text[pos:])
    return "".join(kept).strip(), calls


def decode_tool_call(payload: str) -> dict | None:
    try:
        obj = json.loads(payload)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get("arguments", {})
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": obj["name"], "arguments": arguments}}


def parse_chat_request(body, *, model_id: str, vocab_size: int | None = None) -> ChatRequest:
    """Validate a chat-completions body; every fault is a RequestError naming the field.

    `vocab_size` bounds top_k (int32 when not given). max_tokens past the context is clamped, not refused.
    """
    body = require_object(body)
    check_model(body, model_id)
    if body.get("stream"):
        raise RequestError("stream=true is not supported by this server; send stream=false", param="stream")
    messages = parse_messages(body.get("messages"))
    tools = parse_tools(body.get("tools"))
    tool_choice = body.get("tool_choice")
    if tool_choice is not None and not isinstance(tool_choice, (str, dict)):
        raise RequestError("tool_choice must be a string or an object", param="tool_choice")
    kwargs = parse_chat_template_kwargs(body.get("chat_template_kwargs"))
    logprobs, tokens_as_ids, return_token_ids = (
        read_bool(body, name) for name in ("logprobs", "return_tokens_as_token_ids", "return_token_ids"))
    sampling = parse_sampling(body, logprobs, vocab_size=vocab_size)
    return ChatRequest(messages=messages, tools=tools, chat_template_kwargs=kwargs,
                       required_prefix_token_ids=body.get("required_prefix_token_ids"), sampling=sampling,
                       parse_tools=bool(tools) and tool_choice != "none", logprobs=logprobs,
                       tokens_as_ids=tokens_as_ids, return_token_ids=return_token_ids)


def read_bool(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(f"{name} must be a boolean, got {value!r}", param=name)
    return value


def parse_chat_template_kwargs(kwargs) -> dict | None:
    """Template variables only (e.g. `enable_thinking`); see TEMPLATE_ARGUMENTS for what is refused."""
    if kwargs is None:
        return None
    if not isinstance(kwargs, dict):
        raise RequestError("chat_template_kwargs must be an object", param="chat_template_kwargs")
    refused = sorted(TEMPLATE_ARGUMENTS.intersection(kwargs))
    if refused:
        raise RequestError(
            f"chat_template_kwargs.{refused[0]} is not a template variable: chat_template_kwargs passes "
            f"variables to the server's chat template and cannot replace the template or how it is applied "
            f"(refused keys: {sorted(TEMPLATE_ARGUMENTS)}); send tools in `tools`",
            param=f"chat_template_kwargs.{refused[0]}", code="invalid_chat_template_kwargs")
    return kwargs


def require_object(body) -> dict:
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def check_model(body: dict, model_id: str) -> None:
    model = body.get("model")
    if model is None:
        return  # vLLM's behaviour: the served model
    if not isinstance(model, str):
        raise RequestError("model must be a string", param="model")
    if model != model_id:
        raise RequestError(f"the model {model!r} does not exist; this server serves {model_id!r}",
                           param="model", code="model_not_found", status=404)


def parse_messages(messages) -> list[dict]:
    if messages is None:
        raise RequestError("messages is required", param="messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of message objects", param="messages")
    return [parse_message(message, f"messages[{i}]") for i, message in enumerate(messages)]


def parse_message(message, param: str) -> dict:
    if not isinstance(message, dict):
        raise RequestError(f"{param} must be an object with `role` and `content`", param=param)
    role = message.get("role")
    if role not in ROLES:
        raise RequestError(f"{param}.role must be one of {list(ROLES)}, got {role!r}", param=f"{param}.role")
    out = {"role": "system" if role == "developer" else role,
           "content": parse_content(message.get("content"), role, f"{param}.content")}
    if role == "assistant":
        calls = message.get("tool_calls")
        if calls:
            out["tool_calls"] = parse_history_tool_calls(calls, f"{param}.tool_calls")
        if isinstance(message.get("reasoning_content"), str):
            out["reasoning_content"] = message["reasoning_content"]
    for key in ("name", "tool_call_id"):
        if isinstance(message.get(key), str):
            out[key] = message[key]
    for key in TOKEN_FIELDS:  # checked by the splice, which knows the vocabulary
        if key in message:
            out[key] = message[key]
    return out


def parse_content(content, role: str, param: str) -> str | None:
    if content is None:
        if role == "assistant":
            return None
        raise RequestError(f"{param} is required for a {role} message", param=param)
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in ("text", "input_text", "output_text") \
                    or not isinstance(part.get("text"), str):
                raise RequestError(f"{param}: only text content parts are supported ({{'type': 'text', "
                                   f"'text': ...}}), got {str(part)[:80]}", param=param)
            texts.append(part["text"])
        return "".join(texts)
    raise RequestError(f"{param} must be a string or a list of text parts", param=param)


def parse_history_tool_calls(calls, param: str) -> list[dict]:
    if not isinstance(calls, list):
        raise RequestError(f"{param} must be a list", param=param)
    out = []
    for i, call in enumerate(calls):
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise RequestError(f"{param}[{i}] needs function.name (a string)", param=f"{param}[{i}]")
        arguments = fn.get("arguments", "{}")
        if not isinstance(arguments, (str, dict)):
            raise RequestError(f"{param}[{i}].function.arguments must be a JSON string or an object",
                               param=f"{param}[{i}].function.arguments")
        out.append({"id": call.get("id") or f"call_{i}", "type": "function",
                    "function": {"name": fn["name"], "arguments": arguments}})
    return out


def parse_tools(tools) -> list[dict] | None:
    """Tools in the chat shape or the flat Responses shape -> chat shape (what templates expect)."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise RequestError("tools must be a list of tool objects", param="tools")
    out = []
    for i, tool in enumerate(tools):
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise RequestError(f"tools[{i}] needs a function name", param=f"tools[{i}]")
        if tool.get("type", "function") != "function":
            raise RequestError(f"tools[{i}].type must be 'function'", param=f"tools[{i}].type")
        parameters = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise RequestError(f"tools[{i}] parameters must be a JSON schema object", param=f"tools[{i}]")
        spec = {"name": fn["name"], "description": fn.get("description") or "", "parameters": parameters}
        out.append({"type": "function", "function": spec})
    return out or None


def parse_sampling(body: dict, logprobs: bool, *, vocab_size: int | None = None) -> SamplingParams:
    temperature = read_number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = read_number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0.0:
        raise RequestError("top_p must be in (0, 1]", param="top_p")
    # Upper bounds keep every value inside the int64 tensors the batched sampling step builds: one row's
    # overflow there would fail every row of its batch.
    top_k = read_int(body, "top_k", -1, -1, vocab_size or INT32_MAX)
    n = read_int(body, "n", 1, 1, MAX_N)
    max_tokens = read_int(body, "max_completion_tokens", None, 1, INT32_MAX)
    if max_tokens is None:
        max_tokens = read_int(body, "max_tokens", None, 1, INT32_MAX)
    seed = read_int(body, "seed", None, *SEED_RANGE)
    top_logprobs = read_int(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
    if top_logprobs and not logprobs:
        raise RequestError("top_logprobs needs logprobs=true", param="top_logprobs")
    for name in ("presence_penalty", "frequency_penalty"):
        if read_number(body, name, 0.0, -2.0, 2.0) != 0.0:
            raise RequestError(f"{name} is not supported (it would change the sampled distribution the "
                               f"log-probs describe); send 0", param=name)
    ignore_eos = body.get("ignore_eos", False)  # vLLM's extension: fixed-length outputs for benchmarks
    if not isinstance(ignore_eos, bool):
        raise RequestError("ignore_eos must be a boolean", param="ignore_eos")
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                          top_k=top_k if top_k > 0 else -1, seed=seed, stop=parse_stop(body.get("stop")), n=n,
                          top_logprobs=top_logprobs, ignore_eos=ignore_eos)


def read_number(body: dict, name: str, default, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"{name} must be a number, got {value!r}", param=name)
    if not low <= value <= high:
        raise RequestError(f"{name} must be between {low} and {high}, got {value}", param=name)
    return float(value)


def read_int(body: dict, name: str, default, low: int | None, high: int | None):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{name} must be an integer, got {value!r}", param=name)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"between {low} and {high}"
        raise RequestError(f"{name} must be {bounds}, got {value}", param=name)
    return value


def parse_stop(stop) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > 16 or \
            not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops):
        raise RequestError(f"stop must be a non-empty string or a list of up to 16 non-empty strings of at "
                           f"most {MAX_STOP_CHARS} characters", param="stop")
    return stops


def build_chat_response(request: ChatRequest, model_id: str, prompt_ids: list[int],
                        completions: list[Completion], tokenizer) -> dict:
    """The chat.completion object, with the three token fields on every choice's message."""
    choices = [build_choice(i, request, prompt_ids, c, tokenizer) for i, c in enumerate(completions)]
    completion_tokens = sum(len(c.token_ids) for c in completions)
    response = {
        "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
        "model": model_id, "choices": choices,
        "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": completion_tokens,
                  "total_tokens": len(prompt_ids) + completion_tokens},
    }
    if request.return_token_ids:
        response["prompt_token_ids"] = list(prompt_ids)
        for choice, completion in zip(choices, completions):
            choice["token_ids"] = list(completion.token_ids)
    return response


def build_choice(index: int, request: ChatRequest, prompt_ids: list[int], completion: Completion,
                 tokenizer) -> dict:
    content, tool_calls = completion.text, []
    if request.parse_tools:
        content, tool_calls = parse_tool_calls(content)
    finish_reason = completion.finish_reason
    if tool_calls and finish_reason == "stop":
        finish_reason = "tool_calls"
    message = {"role": "assistant", "content": content if (content or not tool_calls) else None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    message.update(prompt_token_ids=list(prompt_ids), generation_token_ids=completion.token_ids,
                   generation_log_probs=completion.log_probs)
    logprobs = build_logprobs(completion, tokenizer, request.tokens_as_ids) if request.logprobs else None
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}


def build_logprobs(completion: Completion, tokenizer, tokens_as_ids: bool = False) -> dict:
    """OpenAI's `choices[i].logprobs` shape: one entry per generated token, with top alternatives.

    `tokens_as_ids` (vLLM's return_tokens_as_token_ids) names each token `"token_id:<N>"`: a token's text is
    ambiguous (many ids decode to the same string, or to nothing printable), its id is not.
    """

    def entry(token_id: int, logprob: float) -> dict:
        text = tokenizer.decode([token_id])
        token = f"{TOKEN_ID_PREFIX}{token_id}" if tokens_as_ids else text
        return {"token": token, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    content = []
    for t, (token_id, logprob) in enumerate(zip(completion.token_ids, completion.log_probs)):
        item = entry(token_id, logprob)
        top = completion.top_logprobs[t] if completion.top_logprobs else []
        item["top_logprobs"] = [entry(i, lp) for i, lp in top]
        content.append(item)
    return {"content": content}
