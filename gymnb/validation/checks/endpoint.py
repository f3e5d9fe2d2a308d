"""Validation layer 01, HTTP endpoint: the OpenAI-compatible policy server answers what NeMo Gym needs.

The seed's checks (`GET /v1/models`, `POST /v1/chat/completions`, `POST /tokenize`) plus what on-policy training
needs from the same server. The chat requests are the ones real NeMo Gym sends in a training run: its
vllm_model server's token flags (`logprobs`, `top_logprobs: 0`, `return_tokens_as_token_ids`) plus vLLM's
`return_token_ids`, which newer NeMo Gym also reads. The answer is read the way NeMo Gym reads it
(gymnb.core.wire): token ids from the message bundle, vLLM's `token_ids`, or `token_id:<N>` logprobs plus
`/tokenize`, in that priority; the source used is reported, and where several are present they must agree.
A follow-up turn sends the first answer back as vllm_model does (token fields on the assistant message, tool
calls without a `content` key), and a malformed request must get a 4xx error body rather than a crash.
"""

from __future__ import annotations

from gymnb.core.client import describe, error_message, request_json, root_url
from gymnb.core.wire import (
    RETURN_TOKEN_IDS_REQUEST,
    SOURCE_LOGPROBS,
    TOKEN_FIELDS,
    VLLM_MODEL_TOKEN_REQUEST,
    TokenIds,
    WireError,
    read_token_ids,
    tokenize_body,
)
from gymnb.validation.checks.plots import plot_bars
from gymnb.validation.checks.result import LayerResult

FOLLOW_UP = "Now say it again, in capitals."
# What a NeMo Gym training run adds to every chat request (0.2.0 to 0.4.0 send the first, newer ones both).
NEMO_GYM_TOKEN_REQUEST = {**VLLM_MODEL_TOKEN_REQUEST, **RETURN_TOKEN_IDS_REQUEST}
LOGPROB_TOLERANCE = 1e-5


def check_endpoint(base_url: str, *, model_id: str = "", api_key: str = "", max_tokens: int = 16,
                   output_dir=".") -> LayerResult:
    """Layer 01 against a running server at `base_url` (root or `/v1` form)."""
    result = LayerResult("http_endpoint", output_dir=str(output_dir))
    base = root_url(base_url)
    result.figures["base_url"] = base
    model_id = check_models(result, base, model_id, api_key)
    if model_id is None:
        return result
    body = {"model": model_id, "messages": [{"role": "user", "content": "Say 'test'"}], "max_tokens": max_tokens,
            **NEMO_GYM_TOKEN_REQUEST}
    message = check_chat(result, base, body, api_key, "chat completion")
    ids = check_token_ids(result, base, body, message, api_key, max_tokens) if message is not None else None
    if ids is not None:
        plot = plot_bars([str(i) for i in range(len(ids.generation_log_probs))],
                         [-lp for lp in ids.generation_log_probs], [True] * len(ids.generation_log_probs),
                         output_dir, "generation_logprobs", title="-log p of each generated token",
                         xlabel="negative log-prob (nats)")
        result.plots.append(plot.name)
        follow = {**body, "messages": body["messages"] + [assistant_turn(message, ids),
                                                          {"role": "user", "content": FOLLOW_UP}]}
        second = check_chat(result, base, follow, api_key, "follow-up turn (history with token fields)")
        if second is not None:
            check_token_ids(result, base, follow, second, api_key, max_tokens, label="follow-up ")
    check_tokenize_text(result, base, model_id, api_key)
    check_bad_request(result, base, model_id, api_key)
    return result


def check_models(result: LayerResult, base: str, model_id: str, api_key: str) -> str | None:
    reply = request_json("GET", f"{base}/v1/models", api_key=api_key)
    data = reply.body.get("data") if isinstance(reply.body, dict) else None
    ids = [m.get("id") for m in data or [] if isinstance(m, dict)]
    if not result.add("GET /v1/models lists models", reply.ok and bool(ids),
                      f"models: {ids}" if reply.ok else describe(reply)):
        return None
    chosen = model_id or ids[0]
    result.figures["model_id"] = chosen
    if model_id and model_id not in ids:
        result.add("requested model is served", False, f"{model_id!r} is not among {ids}")
    return chosen


def check_chat(result: LayerResult, base: str, body: dict, api_key: str, label: str) -> dict | None:
    """POST a chat completion; record it; return the whole completion body, or None."""
    reply = request_json("POST", f"{base}/v1/chat/completions", body, api_key=api_key)
    choices = reply.body.get("choices") if isinstance(reply.body, dict) else None
    ok = reply.ok and bool(choices) and isinstance(choices[0].get("message"), dict)
    detail = describe(reply) if not ok else (
        f"{reply.seconds * 1000:.0f} ms, finish_reason={choices[0].get('finish_reason')!r}, "
        f"content={(choices[0]['message'].get('content') or '')[:80]!r}")
    if not result.add(f"POST /v1/chat/completions: {label}", ok, detail):
        return None
    if label == "chat completion":
        result.figures["completion_ms"] = round(reply.seconds * 1000, 1)
    finish = choices[0].get("finish_reason")
    result.add(f"{label}: finish_reason is stop|length|tool_calls", finish in ("stop", "length", "tool_calls"),
               f"finish_reason={finish!r}")
    return reply.body


def completion_token_ids(base: str, body: dict, completion: dict, api_key: str) -> tuple[list[TokenIds], str]:
    """Every token-id source in the completion, the logprobs one completed by `/tokenize`; and a problem text
    ("" when none). The first source is the one NeMo Gym would train on."""
    try:
        sources = read_token_ids(completion)
    except WireError as exc:
        return [], f"{exc} (field {exc.field})"
    for i, ids in enumerate(sources):
        if ids.source == SOURCE_LOGPROBS:
            reply = request_json("POST", f"{base}/tokenize", tokenize_body(body), api_key=api_key)
            tokens = reply.body.get("tokens") if isinstance(reply.body, dict) else None
            if not reply.ok or not isinstance(tokens, list):
                return sources[:i], f"POST /tokenize failed, so the logprobs' prompt ids are unknown: {describe(reply)}"
            sources[i] = ids.with_prompt(tokens)
    return sources, ""


def check_token_ids(result: LayerResult, base: str, body: dict, completion: dict, api_key: str, max_tokens: int,
                    label: str = "") -> TokenIds | None:
    """The call's token ids, read as NeMo Gym reads them, complete and agreeing across sources."""
    logprobs_ok, logprobs_detail = logprobs_as_token_ids(completion)
    result.add(f"{label}logprobs tokens are token_id:<N> (return_tokens_as_token_ids; NeMo Gym's vllm_model "
               "reads the sampled ids there)", logprobs_ok, logprobs_detail)
    sources, problem = completion_token_ids(base, body, completion, api_key)
    names = [ids.source for ids in sources]
    if not result.add(f"{label}token ids readable as NeMo Gym reads them", bool(sources) and not problem,
                      problem or (f"sources: {', '.join(names)}; NeMo Gym uses {names[0]}" if sources else
                                  f"no token ids in any shape: no {', '.join(TOKEN_FIELDS)} on the message, no "
                                  "vLLM token_ids, no logprobs. Fix the server: return the token fields (NeMo RL's "
                                  "server, gymnb serve) or honour vLLM's return_token_ids / "
                                  "return_tokens_as_token_ids")):
        return None
    ids = sources[0]
    if not label:
        result.figures.update(token_id_source=ids.source, token_id_sources=names)
    if ids.generation_log_probs is None:
        result.add(f"{label}generation log-probs present", False,
                   f"source {ids.source} carries ids but no log-probs: send logprobs=true (vLLM) so the trainer "
                   "can compare its log-probs with the sampler's")
        return None
    gen, prompt = ids.generation_token_ids, ids.prompt_token_ids
    lengths_ok = 0 < len(gen) <= max_tokens and len(prompt) > 0
    result.add(f"{label}token field lengths agree", lengths_ok,
               f"{len(prompt)} prompt ids, {len(gen)} generation ids, {len(ids.generation_log_probs)} log-probs "
               f"(max_tokens={max_tokens})")
    if not label:
        result.figures.update(prompt_tokens=len(prompt), generation_tokens=len(gen))
    if len(sources) > 1:
        disagreements = [text for other in sources[1:] for text in compare_sources(ids, other)]
        result.add(f"{label}token ids agree across sources ({', '.join(names)})", not disagreements,
                   "; ".join(disagreements[:3]) or "identical")
    else:
        check_tokenize_agreement(result, base, body, prompt, api_key, label or "single turn ")
    return ids if lengths_ok else None


def logprobs_as_token_ids(completion: dict) -> tuple[bool, str]:
    """Did the server write every logprobs token as `token_id:<N>`?"""
    choice = (completion.get("choices") or [{}])[0]
    content = (choice.get("logprobs") or {}).get("content") if isinstance(choice.get("logprobs"), dict) else None
    if content is None:
        return False, ("no choices[0].logprobs.content although the request set logprobs=true: NeMo Gym 0.2.0 reads "
                       "the generated ids only from there (its /run fails on this server)")
    bad = [(t, entry.get("token")) for t, entry in enumerate(content)
           if not (isinstance(entry, dict) and str(entry.get("token", "")).startswith("token_id:"))]
    if bad:
        t, token = bad[0]
        return False, (f"choices[0].logprobs.content[{t}].token is {token!r}: the server ignored "
                       "return_tokens_as_token_ids and wrote token text, which NeMo Gym turns into wrong ids or "
                       f"a validation error ({len(bad)} of {len(content)} entries)")
    return True, f"{len(content)} entries"


def compare_sources(ids: TokenIds, other: TokenIds) -> list[str]:
    """Differences between two sources of the same call's ids (empty when they agree)."""
    out = []
    for name in ("prompt_token_ids", "generation_token_ids"):
        a, b = getattr(ids, name), getattr(other, name)
        if a != b:
            first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            out.append(f"{name}: {ids.source} has {len(a)} ids, {other.source} {len(b)}; first difference at "
                       f"{first}: {a[first:first + 6]} vs {b[first:first + 6]}")
    if other.generation_log_probs is not None and len(other.generation_log_probs) == len(ids.generation_log_probs):
        gap = max((abs(x - y) for x, y in zip(ids.generation_log_probs, other.generation_log_probs)), default=0.0)
        if gap > LOGPROB_TOLERANCE:
            out.append(f"generation log-probs of {ids.source} and {other.source} differ by up to {gap:.2e}")
    return out


def assistant_turn(completion: dict, ids: TokenIds) -> dict:
    """The assistant message as NeMo Gym's vllm_model sends it back: the three token fields, tool calls, and no
    `content` key when the turn made tool calls."""
    message = completion["choices"][0]["message"]
    turn = {"role": "assistant"}
    if message.get("tool_calls"):
        turn["tool_calls"] = message["tool_calls"]
    else:
        turn["content"] = message.get("content") or ""
    turn.update(ids.as_fields())
    return turn


def check_tokenize_agreement(result: LayerResult, base: str, body: dict, prompt: list[int], api_key: str,
                             label: str) -> None:
    """`/tokenize` with the completion's body returns the prompt ids the completion used."""
    reply = request_json("POST", f"{base}/tokenize", tokenize_body(body), api_key=api_key)
    tokens = reply.body.get("tokens") if isinstance(reply.body, dict) else None
    if not result.add(f"POST /tokenize (messages): {label.strip()}", reply.ok and isinstance(tokens, list),
                      describe(reply) if not reply.ok else f"{len(tokens or [])} tokens"):
        return
    first = next((i for i, (a, b) in enumerate(zip(tokens, prompt)) if a != b), min(len(tokens), len(prompt)))
    result.add(f"/tokenize agrees with the completion's prompt ids: {label.strip()}", tokens == prompt,
               "identical" if tokens == prompt else
               f"/tokenize gave {len(tokens)} ids, the completion used {len(prompt)}; first difference at "
               f"position {first}: {tokens[first:first + 8]} vs {prompt[first:first + 8]}")


def check_tokenize_text(result: LayerResult, base: str, model_id: str, api_key: str) -> None:
    reply = request_json("POST", f"{base}/tokenize", {"model": model_id, "prompt": "Hello world"}, api_key=api_key)
    tokens = reply.body.get("tokens") if isinstance(reply.body, dict) else None
    ok = reply.ok and isinstance(tokens, list) and len(tokens) > 0
    result.add("POST /tokenize (plain prompt)", ok, describe(reply) if not ok else f"'Hello world' -> {tokens}")


def check_bad_request(result: LayerResult, base: str, model_id: str, api_key: str) -> None:
    """A malformed request gets a 4xx with an error message, and the server keeps serving."""
    reply = request_json("POST", f"{base}/v1/chat/completions", {"model": model_id, "messages": "not a list"},
                         api_key=api_key)
    message = error_message(reply)
    result.add("malformed request gets a 4xx error body", 400 <= reply.status < 500 and bool(message),
               describe(reply))
    alive = request_json("GET", f"{base}/v1/models", api_key=api_key)
    result.add("server still answers after the bad request", alive.ok, describe(alive) if not alive.ok else "")
