"""Policy server, prompt stage: the on-policy splice that turns a chat request into the engine's prompt ids.

Re-rendering a conversation through the chat template and re-tokenizing it does not give back the ids the
model generated (BPE merges differ, tool-call whitespace is re-rendered, templates strip earlier `<think>`).
The ids the model generated are the single source of truth, so the prompt is built as (docs/protocol.md section 2):

    model_prefix    = prompt_token_ids + generation_token_ids of the last message carrying token fields
                      (or the request's `required_prefix_token_ids`)
    template_prefix = template(messages[: anchor + 1], no generation prompt)
    template_ids    = template(all messages, generation prompt)
    start           = index in template_ids of the eos whose ordinal is that of template_prefix's last eos
    prompt          = model_prefix (minus a trailing eos) + template_ids[start:]

Counting eos tokens rather than comparing positions keeps working when the template rewrites history (drops
earlier reasoning), because every turn still ends with exactly one end-of-turn token.

Example: turn 1 generated `[" Sk", "inny", <eos>]`; the template would re-tokenize it as `[" Skinny", <eos>]`.
The turn-2 prompt keeps `" Sk", "inny"` and appends `<eos> "\n" <|im_start|> user ...` from the template.
"""

from __future__ import annotations

import jinja2

from gymnb.core.errors import RequestError
from gymnb.core.wire import TOKEN_FIELDS, WireError, message_bundle


def build_prompt_ids(
    tokenizer,
    messages: list[dict],
    tools: list[dict] | None = None,
    chat_template_kwargs: dict | None = None,
    required_prefix_token_ids: list[int] | None = None,
    *,
    add_generation_prompt: bool = True,
    max_chars: int | None = None,
) -> list[int]:
    """Prompt ids for a chat request, with the model's own earlier ids spliced in (see module docstring).

    Raises RequestError (HTTP 400) for token fields that are partial, mistyped or out of vocabulary, and when
    the splice cannot find its anchor; the message then shows both id lists decoded. `max_chars`: see
    render_ids.
    """
    anchor, model_prefix = find_model_prefix(messages, required_prefix_token_ids, vocab_size=len(tokenizer))
    template_ids = render_ids(tokenizer, messages, tools, chat_template_kwargs, add_generation_prompt,
                              max_chars=max_chars)
    if model_prefix is None:
        return template_ids
    prefix_ids = render_ids(tokenizer, messages[: anchor + 1], tools, chat_template_kwargs, False)
    return splice_ids(tokenizer, model_prefix, prefix_ids, template_ids)


def splice_ids(tokenizer, model_prefix: list[int], prefix_ids: list[int],
               template_ids: list[int]) -> list[int]:
    """Steps 3-5 of the splice: model prefix (minus trailing eos) + template ids from the matching eos on."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise RequestError(
            "cannot splice token ids: the tokenizer has no eos (end-of-turn) token. Fix: serve a model whose "
            "tokenizer defines eos_token, or send the conversation without token fields.",
            param="messages", code="splice_failed")
    ordinal = prefix_ids.count(eos)
    eos_positions = [i for i, token in enumerate(template_ids) if token == eos]
    if ordinal == 0 or len(eos_positions) < ordinal:
        raise RequestError(
            f"cannot splice token ids: the template rendering of the messages up to the last assistant turn "
            f"has {ordinal} end-of-turn tokens ({tokenizer.decode([eos])!r}, id {eos}) and the full "
            f"rendering has {len(eos_positions)}; the splice needs at least one, matched by ordinal.\n"
            f"model prefix (decoded): {tail_text(tokenizer, model_prefix)}\n"
            f"template prefix (decoded): {tail_text(tokenizer, prefix_ids)}\n"
            f"template ids (decoded): {tail_text(tokenizer, template_ids)}",
            param="messages", code="splice_failed")
    start = eos_positions[ordinal - 1]
    cut = len(model_prefix) - 1 if model_prefix and model_prefix[-1] == eos else len(model_prefix)
    return list(model_prefix[:cut]) + template_ids[start:]


def find_model_prefix(
    messages: list[dict], required_prefix_token_ids: list[int] | None, *, vocab_size: int
) -> tuple[int, list[int] | None]:
    """(anchor message index, model prefix ids), or (-1, None) when the request carries no token ids.

    Every message's token fields are checked, not only the last one's: a client that mangles any of them has
    a bug worth a 400.
    """
    anchor, prefix, last_assistant = -1, None, -1
    for index, message in enumerate(messages):
        fields = read_token_fields(message, f"messages[{index}]", vocab_size)
        if message.get("role") == "assistant":
            last_assistant = index
        if fields is not None:
            anchor, prefix = index, fields[0] + fields[1]
    if required_prefix_token_ids is not None:
        check_token_ids(required_prefix_token_ids, "required_prefix_token_ids", vocab_size)
        if last_assistant < 0:
            raise RequestError(
                "required_prefix_token_ids needs an assistant message in `messages` to anchor the splice on "
                "(the prefix replaces the rendering of the conversation up to that message).",
                param="required_prefix_token_ids", code="splice_failed")
        anchor, prefix = last_assistant, list(required_prefix_token_ids)
    return anchor, prefix


def read_token_fields(message: dict, param: str, vocab_size: int) -> tuple[list[int], list[int], list] | None:
    """The message's (prompt ids, generation ids, log-probs), None if it has none; all three or none, on an
    assistant message, ids inside the vocabulary."""
    try:
        fields = message_bundle(message, param, strict_log_probs=False)
    except WireError as exc:
        raise RequestError(str(exc), param=exc.field, code="invalid_token_fields") from None
    if fields is None:
        return None
    if message.get("role") != "assistant":
        raise RequestError(f"{param}: token fields belong on assistant messages, not {message.get('role')!r}",
                           param=f"{param}.role", code="invalid_token_fields")
    check_token_ids(fields.prompt_token_ids, f"{param}.prompt_token_ids", vocab_size)
    check_token_ids(fields.generation_token_ids, f"{param}.generation_token_ids", vocab_size)
    return fields.prompt_token_ids, fields.generation_token_ids, fields.generation_log_probs


def check_token_ids(ids, param: str, vocab_size: int) -> None:
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise RequestError(f"{param} must be a list of integer token ids", param=param,
                           code="invalid_token_ids")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise RequestError(f"{param} has ids outside the vocabulary [0, {vocab_size}): {bad[:5]}",
                           param=param, code="invalid_token_ids")


def render_ids(tokenizer, messages, tools, chat_template_kwargs, add_generation_prompt: bool, *,
               max_chars: int | None = None) -> list[int]:
    """Chat template -> text -> ids, as vLLM's chat path does (the template writes the special tokens).

    `max_chars`: refuse (400, context_length_exceeded) a rendering longer than this before tokenizing it: the
    server passes the most characters its context can hold, so megabytes of text are refused at once.
    """
    kwargs = dict(chat_template_kwargs or {})
    kwargs.pop("add_generation_prompt", None)  # ours decides: the splice needs both renderings
    try:
        text = tokenizer.apply_chat_template(
            template_messages(messages), tools=tools or None, tokenize=False,
            add_generation_prompt=add_generation_prompt, **kwargs)
    except (jinja2.TemplateError, TypeError, KeyError, ValueError) as exc:
        # Templates reject some conversations on purpose (raise_exception); that is the client's fault.
        raise RequestError(f"the chat template could not render these messages: {exc}", param="messages",
                           code="template_error") from None
    if max_chars is not None and len(text) > max_chars:
        raise RequestError(
            f"the conversation renders to {len(text):,} characters, more than the model's context can hold "
            f"whatever the tokenization (at most {max_chars:,} characters); shorten the conversation",
            param="messages", code="context_length_exceeded")
    return tokenizer.encode(text, add_special_tokens=False)


def template_messages(messages: list[dict]) -> list[dict]:
    """Messages as the template sees them: token fields dropped, content parts joined into one string."""
    out = []
    for message in messages:
        clean = {k: v for k, v in message.items() if k not in TOKEN_FIELDS}
        content = clean.get("content")
        if isinstance(content, list):
            clean["content"] = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        out.append(clean)
    return out


def tail_text(tokenizer, ids: list[int], limit: int = 400) -> str:
    """The last `limit` characters of decoded ids (special tokens kept), for diagnostics."""
    text = tokenizer.decode(ids, skip_special_tokens=False)
    return repr(text if len(text) <= limit else "..." + text[-limit:])
