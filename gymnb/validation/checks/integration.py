"""Validation stage: the integration under test, either running already (URLs given) or embedded.

`connect()` gives the layer notebooks a policy server URL and, when they need one, a NeMo Gym head URL. Any URL
left empty is filled by starting gymnb's own component in this process: the policy server
(`gymnb.policy.server.PolicyServer`) and the environments (`gymnb.gym.start_gym`) pointed at it. With only a head URL,
the policy server is the one the head's config names as `policy_model`. What was started is stopped by
`Integration.stop()` (or when the process exits).
"""

from __future__ import annotations

import atexit
import dataclasses
import html
import json
import os
from pathlib import Path

from gymnb.core.client import request_json, root_url
from gymnb.core.config import API_KEY_ENV, REPO_ROOT
from gymnb.core.errors import ConfigError, EnvironmentServerError, ServerError
from gymnb.core.models import DEFAULT_MODEL
from gymnb.core.wire import WireError, parse_head_config

INTERACTIVE_DIR = REPO_ROOT / "outputs" / "validation" / "interactive"
ENVIRONMENTS = ("math_with_judge", "workplace_assistant")


@dataclasses.dataclass
class Integration:
    """Where the policy server and the Gym head server answer, and what this process started."""

    base_url: str  # policy server root (no /v1)
    head_url: str | None
    model_id: str
    api_key: str = dataclasses.field(default="", repr=False)  # a notebook shows repr() in a shareable file
    started: list = dataclasses.field(default_factory=list)  # objects with .stop(), last started first stopped

    @property
    def embedded(self) -> bool:
        return bool(self.started)

    def stop(self) -> None:
        while self.started:
            self.started.pop().stop()

    def _repr_html_(self) -> str:
        rows = [("policy server", self.base_url), ("model id", self.model_id),
                ("gym head", self.head_url or "(not needed)"),
                ("started here", ", ".join(type(s).__name__ for s in self.started) or "nothing (external)")]
        return "<table>" + "".join(f"<tr><td>{k}</td><td><code>{html.escape(str(v))}</code></td></tr>"
                                   for k, v in rows) + "</table>"


def served_model_id(base_url: str, api_key: str = "") -> str:
    reply = request_json("GET", f"{root_url(base_url)}/v1/models", api_key=api_key, timeout=30)
    data = reply.body.get("data") if isinstance(reply.body, dict) else None
    if not reply.ok or not data:
        raise ServerError(f"{base_url}/v1/models answered HTTP {reply.status} without models: {reply.body!r:.300}")
    return data[0]["id"]


def policy_model(model: str = "", base_url: str = "", gym_head_url: str = "", api_key: str = "") -> str:
    """The model whose tokenizer and weights layers 02, 04 and 05 load: `model` when given; else, for an
    external server, the one it serves (its model id matched to a preset, a preset's hub id, or a local
    HF-format directory); else, with no URL, the embedded default. An id that matches none is an error:
    checking another model's tokenizer would test the wrong thing and could pass or fail by accident."""
    from gymnb.core.models import get_preset, list_presets

    if model:
        return model
    if not base_url and not gym_head_url:
        return DEFAULT_MODEL
    if base_url:
        base_url, model_id = root_url(base_url), ""
    else:
        base_url, model_id, api_key = policy_from_head(gym_head_url)
    model_id = model_id or served_model_id(base_url, api_key)
    if get_preset(model_id) is not None:
        return model_id
    by_hub_id = [name for name in list_presets() if get_preset(name).path == model_id]
    if by_hub_id:
        return by_hub_id[0]
    if (Path(model_id) / "config.json").is_file():
        return model_id
    raise ConfigError(f"the policy server at {base_url} serves {model_id!r}, which is neither a gymnb preset "
                      f"({', '.join(list_presets())}), a preset's hub id, nor a local model directory. Pass the "
                      "model it runs with -p model=PATH (its HF-format directory, or a preset) so that layers 02, "
                      "04 and 05 check its own tokenizer and weights")


def policy_from_head(head_url: str) -> tuple[str, str, str]:
    """(base_url, model name, api key) of the `policy_model` instance in the head server's resolved config."""
    reply = request_json("GET", f"{head_url.rstrip('/')}/global_config_dict_yaml", timeout=30)
    if not reply.ok:
        raise EnvironmentServerError(f"{head_url}/global_config_dict_yaml answered HTTP {reply.status}: "
                                     f"{reply.body!r:.300}. Is {head_url} a NeMo Gym head server (`gymnb gym up`)?")
    try:
        config = parse_head_config(reply.body)
    except WireError as exc:
        raise EnvironmentServerError(f"{head_url}/global_config_dict_yaml: {exc}") from None
    section = config.get("policy_model") or {}
    impl = next(iter((section.get("responses_api_models") or {}).values()), {})
    base = impl.get("base_url") or config.get("policy_base_url")
    if isinstance(base, list):  # several endpoints with per-session affinity: validate the first
        base = base[0] if base else None
    if not base:
        raise EnvironmentServerError(f"the config of {head_url} names no policy_model base_url; pass the policy "
                                     "server's URL with --base-url")
    model = impl.get("model") or config.get("policy_model_name") or ""
    return root_url(base), model, impl.get("api_key") or config.get("policy_api_key") or ""


def connect(base_url: str = "", gym_head_url: str = "", *, model: str = DEFAULT_MODEL,
            envs: list[str] | tuple[str, ...] = ("workplace_assistant",), need_gym: bool = True,
            api_key: str = "", server_options: dict | None = None) -> Integration:
    """The integration to validate; starts whatever the URLs leave out (see module docstring)."""
    for env in envs:
        if env not in ENVIRONMENTS:
            raise ConfigError(f"unknown environment {env!r}; choose from {list(ENVIRONMENTS)}")
    started = []
    api_key = api_key or os.environ.get(API_KEY_ENV, "")  # set by `gymnb validate`: never a notebook parameter
    try:
        if not base_url and gym_head_url:
            base_url, model_id, served_key = policy_from_head(gym_head_url)
            api_key = api_key or served_key  # gymnb's head serves none; a NeMo Gym head may
            model_id = model_id or served_model_id(base_url, api_key)
        elif base_url:
            base_url = root_url(base_url)
            model_id = served_model_id(base_url, api_key)
        else:
            server = start_policy_server(model or DEFAULT_MODEL, api_key=api_key, **(server_options or {}))
            started.append(server)
            base_url, model_id = root_url(server.url), server.model_id
        head_url = gym_head_url.rstrip("/") or None
        if need_gym and head_url is None:
            gym = start_environments(list(envs), base_url, model_id, api_key)
            started.append(gym)
            head_url = gym.head_url
    except BaseException:
        for item in reversed(started):
            item.stop()
        raise
    integration = Integration(base_url, head_url, model_id, api_key, started)
    if started:
        atexit.register(integration.stop)
    return integration


def start_policy_server(model: str, *, api_key: str = "", **options):
    """gymnb's policy server for `model`, on a free loopback port."""
    from gymnb.policy.server import PolicyServer

    server = PolicyServer.start(model, api_key=api_key or None, **options)
    return server


def start_environments(envs: list[str], base_url: str, model_id: str, api_key: str = ""):
    """gymnb's NeMo-Gym-compatible head, resources and agent servers for `envs`, on free loopback ports."""
    from gymnb.gym import start_gym

    stack = start_gym(envs, policy_base_url=f"{base_url}/v1", policy_model_name=model_id,
                      policy_api_key=api_key or None)
    return stack


def layer_output_dir(output_dir: str, stem: str) -> Path:
    """A notebook's output folder: `output_dir`, or `outputs/validation/interactive/<stem>` when it is empty."""
    out = Path(output_dir) if output_dir else INTERACTIVE_DIR / stem
    out.mkdir(parents=True, exist_ok=True)
    return out


def find_rollouts(rollouts_path: str, output_dir: str | Path) -> Path:
    """The rollouts JSONL that layer 03 wrote: `rollouts_path`, else the sibling `03_rollout_collection/` folder."""
    path = Path(rollouts_path) if rollouts_path else Path(output_dir).parent / "03_rollout_collection" / "rollouts.jsonl"
    if not path.exists():
        raise ConfigError(f"no rollouts at {path}: run 03_rollout_collection first (it writes rollouts.jsonl), or "
                          "set rollouts_path to a rollouts JSONL file from `gymnb collect` / ng_collect_rollouts")
    return path


def load_rollouts(path: str | Path) -> list[dict]:
    """The rollouts at `path`; an empty file gives [] (layers 04 and 05 then record a failed check, and 04 still
    probes the server) rather than stopping the notebook."""
    from gymnb.rollouts.collect import read_rollouts

    return read_rollouts(path)


def save_json(data, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(data, indent=2, default=str))
    return path
