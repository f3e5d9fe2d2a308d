"""The wire contract for token ids: field names, and reading ids from every shape the ecosystem produces.

On-policy training needs, for each model call, the prompt ids the engine really used, the ids it sampled and
their log-probs. Servers hand them over in three shapes, read here in the priority NeMo Gym's `vllm_model`
server uses (newer releases state it; 0.2.0 to 0.4.0 follow it where they can):

1. `message`: a complete bundle on `choices[i].message` (NeMo RL's exposed server, `gymnb serve`)::

       {"choices": [{"message": {"content": "4", "prompt_token_ids": [1, 9690, ...],
                                 "generation_token_ids": [34, 2], "generation_log_probs": [-0.01, -0.2]}}]}

   All three or none: one or two of them is a broken server, never silently completed. Empty lists are valid
   (a zero-token generation).
2. `return_token_ids`: vLLM's own fields when the request sets `return_token_ids: true`: a top-level
   `prompt_token_ids` and `choices[i].token_ids` (eos included); log-probs from `choices[i].logprobs`.
3. `logprobs+tokenize`: with `logprobs: true, top_logprobs: 0, return_tokens_as_token_ids: true` every
   `choices[i].logprobs.content[t].token` is `"token_id:<N>"`; the prompt ids come from `POST /tokenize` with
   the request's `model`, `messages`, `tools` and `chat_template_kwargs`. A token written as text (`"x"`, or
   worse `"2"`, which NeMo Gym's int coercion turns into id 2) is a server that ignored the flag.

Real `vllm_model` (0.2.0 to 0.4.0) sends every chat request of a training run with `VLLM_MODEL_TOKEN_REQUEST`
and reads shape 3 (0.4.0 first takes shape 1 when the message carries `prompt_token_ids`); it forwards the
Responses `metadata` unchanged and merges the JSON object in `metadata.extra_body` into the chat request.
"""

from __future__ import annotations

import dataclasses
import math

from gymnb.core.errors import GymnbError

TOKEN_FIELDS = ("prompt_token_ids", "generation_token_ids", "generation_log_probs")
TOKEN_ID_PREFIX = "token_id:"
# What real NeMo Gym's vllm_model adds to each chat request when return_token_id_information is on.
VLLM_MODEL_TOKEN_REQUEST = {"logprobs": True, "top_logprobs": 0, "return_tokens_as_token_ids": True}
# vLLM's request flag for shape 2; newer NeMo Gym sends it too.
RETURN_TOKEN_IDS_REQUEST = {"return_token_ids": True}
TOKENIZE_FIELDS = ("model", "messages", "tools", "chat_template_kwargs")

SOURCE_MESSAGE = "message"
SOURCE_RETURN_TOKEN_IDS = "return_token_ids"
SOURCE_LOGPROBS = "logprobs+tokenize"
SOURCES = (SOURCE_MESSAGE, SOURCE_RETURN_TOKEN_IDS, SOURCE_LOGPROBS)


class WireError(GymnbError):
    """A server answered token ids in a shape that cannot be trained on; `field` names where."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


@dataclasses.dataclass
class TokenIds:
    """The ids of one model call and where they were read. `prompt_token_ids` is None for the logprobs source
    until `/tokenize` fills it (see `with_prompt`); `generation_log_probs` is None when the server sent none."""

    source: str
    prompt_token_ids: list[int] | None
    generation_token_ids: list[int]
    generation_log_probs: list[float] | None

    def with_prompt(self, prompt_token_ids: list[int]) -> TokenIds:
        return dataclasses.replace(self, prompt_token_ids=list(prompt_token_ids))

    def as_fields(self) -> dict:
        """The three wire fields, as they ride on a chat message or a Responses output item."""
        return {name: getattr(self, name) for name in TOKEN_FIELDS}


def message_bundle(message: dict, where: str = "choices[0].message", *, strict_log_probs: bool = True) -> TokenIds | None:
    """Source 1: the three fields on a message (or an output item), all or none, ids and log-probs alike long.

    `strict_log_probs=False` takes any numbers as log-probs: the policy server reads a request's earlier
    assistant turns for their ids only, and does not refuse a client over values it never uses.
    """
    present = [name for name in TOKEN_FIELDS if message.get(name) is not None]
    if not present:
        return None
    if len(present) != len(TOKEN_FIELDS):
        missing = [name for name in TOKEN_FIELDS if name not in present]
        raise WireError(f"{where} carries {present} but not {missing}: the three token fields come together or "
                        "not at all", field=f"{where}.{missing[0]}")
    ids = {name: message[name] for name in TOKEN_FIELDS}
    for name in ("prompt_token_ids", "generation_token_ids"):
        check_ids(ids[name], f"{where}.{name}")
    (check_log_probs if strict_log_probs else check_numbers)(ids["generation_log_probs"], f"{where}.generation_log_probs")
    if len(ids["generation_log_probs"]) != len(ids["generation_token_ids"]):
        raise WireError(f"{where}: {len(ids['generation_token_ids'])} generation_token_ids but "
                        f"{len(ids['generation_log_probs'])} generation_log_probs; they must have the same length",
                        field=f"{where}.generation_log_probs")
    return TokenIds(SOURCE_MESSAGE, **ids)


def parse_token_id(token, where: str) -> int:
    """`"token_id:123"` -> 123. Anything else means the server ignored `return_tokens_as_token_ids`."""
    if isinstance(token, str) and token.startswith(TOKEN_ID_PREFIX):
        digits = token[len(TOKEN_ID_PREFIX):]
        if digits.isdigit():
            return int(digits)
    raise WireError(f"{where} is {token!r}, not 'token_id:<N>': the server ignored return_tokens_as_token_ids=true "
                    "and wrote the token's text, so NeMo Gym's vllm_model cannot read the sampled ids (a token whose "
                    "text is a number would even pass as the wrong id)", field=where)


def logprob_entries(choice: dict, where: str = "choices[0]") -> tuple[list[int], list[float]] | None:
    """Source 3's generated ids and log-probs from `choice.logprobs.content`, or None when there is none."""
    content = (choice.get("logprobs") or {}).get("content") if isinstance(choice.get("logprobs"), dict) else None
    if content is None:
        return None
    if not isinstance(content, list):
        raise WireError(f"{where}.logprobs.content must be a list", field=f"{where}.logprobs.content")
    ids, log_probs = [], []
    for t, entry in enumerate(content):
        at = f"{where}.logprobs.content[{t}]"
        if not isinstance(entry, dict):
            raise WireError(f"{at} must be an object with token and logprob", field=at)
        ids.append(parse_token_id(entry.get("token"), f"{at}.token"))
        log_probs.append(entry.get("logprob"))
    check_log_probs(log_probs, f"{where}.logprobs.content[].logprob")
    return ids, log_probs


def read_token_ids(completion: dict, index: int = 0) -> list[TokenIds]:
    """Every source present in choice `index` of a chat completion, in NeMo Gym's priority order.

    Raises WireError when a present source is malformed (partial bundle, token text instead of ids).
    """
    choices = completion.get("choices") if isinstance(completion, dict) else None
    if not isinstance(choices, list) or len(choices) <= index or not isinstance(choices[index], dict):
        raise WireError(f"the chat completion has no choices[{index}]", field="choices")
    choice, where = choices[index], f"choices[{index}]"
    found = []
    bundle = message_bundle(choice.get("message") or {}, f"{where}.message")
    if bundle is not None:
        found.append(bundle)
    entries = logprob_entries(choice, where)
    if choice.get("token_ids") is not None:
        gen = choice["token_ids"]
        check_ids(gen, f"{where}.token_ids")
        prompt = completion.get("prompt_token_ids")
        if prompt is None:
            raise WireError(f"{where}.token_ids is set but the completion has no top-level prompt_token_ids",
                            field="prompt_token_ids")
        check_ids(prompt, "prompt_token_ids")
        found.append(TokenIds(SOURCE_RETURN_TOKEN_IDS, list(prompt), list(gen), entries[1] if entries else None))
    if entries is not None:
        found.append(TokenIds(SOURCE_LOGPROBS, None, *entries))
    return found


def tokenize_body(chat_body: dict) -> dict:
    """The `/tokenize` body vllm_model derives from a chat request: only what shapes the prompt."""
    return {key: chat_body[key] for key in TOKENIZE_FIELDS if key in chat_body}


def check_ids(ids, where: str) -> None:
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise WireError(f"{where} must be a list of non-negative integer token ids, got {str(ids)[:120]}", field=where)


def check_numbers(values, where: str) -> None:
    if not isinstance(values, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise WireError(f"{where} must be a list of numbers, got {str(values)[:120]}", field=where)


def check_log_probs(values, where: str) -> None:
    if not isinstance(values, list) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v <= 1e-4 for v in values):
        raise WireError(f"{where} must be a list of finite log-probs <= 0, got {str(values)[:120]}", field=where)


def parse_head_config(body) -> dict:
    """A head server's `GET /global_config_dict_yaml` answer -> the config as a plain, resolved dict.

    The answer is a JSON string of YAML. Real NeMo Gym's head returns it WITHOUT resolving OmegaConf
    interpolations (`base_url: ${policy_base_url}` stays literal), gymnb's head resolved; both are resolved here,
    so a policy URL is never the text `${policy_base_url}`.
    """
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    config = yaml.safe_load(body) if isinstance(body, str) else body
    if not isinstance(config, dict):
        raise WireError(f"the head server's config is a {type(config).__name__}, not a mapping", field="config")
    try:
        return OmegaConf.to_container(OmegaConf.create(config), resolve=True)
    except OmegaConfBaseException as exc:
        raise WireError(f"the head server's config has an interpolation that does not resolve: {exc}",
                        field="config") from None
