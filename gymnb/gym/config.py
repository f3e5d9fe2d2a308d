"""Environment configuration in NeMo Gym's YAML shape: instances, references, dotted overrides.

Shape (NeMo Gym's): a top-level key per server instance, then its server type, then its implementation:

    math_with_judge_simple_agent:            # instance name (global)
      responses_api_agents:                  # resources_servers | responses_api_agents | responses_api_models
        simple_agent:                        # implementation
          resources_server: {type: resources_servers, name: math_with_judge}   # a reference by instance name
          max_steps: 6

plus the global keys `policy_base_url`, `policy_model_name`, `policy_api_key` and `head_server: {host, port}`.

`load_gym_config(["math_with_judge"], policy_base_url=..., overrides=[...])` merges `configs/envs/policy_model.yaml`
and each selected environment's YAML with OmegaConf, then the overrides. The merged files are the schema:
an override of a key that no file declares is an error naming it (so a typo never silently does nothing), as is
an unresolved `${...}` or `???`, a malformed instance, or a reference to an instance that is not configured.
Every implementation gets `host` (127.0.0.1) and `port` (0 = a free port chosen at start-up).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gymnb.core.config import CONFIGS_DIR, parse_overrides
from gymnb.core.errors import ConfigError

ENVS_DIR = CONFIGS_DIR / "envs"
POLICY_CONFIG = "policy_model"
# Start-up order: an instance may only reference instances of an earlier type.
SERVER_TYPES = ("responses_api_models", "resources_servers", "responses_api_agents")
GLOBAL_KEYS = ("policy_base_url", "policy_model_name", "policy_api_key", "head_server")
DEFAULT_HOST = "127.0.0.1"
DEFAULT_HEAD_PORT = 11000  # NeMo Gym's head server port


@dataclasses.dataclass(frozen=True)
class Instance:
    """One configured server: `config` is the implementation's dict (host, port, options, references)."""

    name: str
    server_type: str
    implementation: str
    config: dict


def list_envs() -> list[str]:
    """Environment names that `--env` accepts (besides a path to a YAML file)."""
    return sorted(p.stem for p in ENVS_DIR.glob("*.yaml") if p.stem != POLICY_CONFIG)


def env_config_path(env: str) -> Path:
    """`configs/envs/<env>.yaml`, or `env` itself when it is a path to a YAML file."""
    named = ENVS_DIR / f"{env}.yaml"
    if named.exists() and env != POLICY_CONFIG:
        return named
    path = Path(env)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    raise ConfigError(f"unknown environment {env!r}: choose one of {list_envs()} or give a path to a YAML file")


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must hold a mapping of instance names at the top level")
    return data


def load_gym_config(envs: Iterable[str], *, policy_base_url: str | list[str] | None = None,
                    policy_model_name: str | None = None, policy_api_key: str | None = None,
                    overrides: Iterable[str] = (), head_port: int = 0, host: str = DEFAULT_HOST) -> dict:
    """The resolved global config (plain dict) for the chosen environments; see the module docstring."""
    envs = list(envs)
    if not envs:
        raise ConfigError(f"no environment chosen: pass at least one of {list_envs()}")
    layers = [_read_yaml(ENVS_DIR / f"{POLICY_CONFIG}.yaml")]
    layers += [_read_yaml(env_config_path(env)) for env in envs]
    merged_layers = OmegaConf.to_container(OmegaConf.merge(*[OmegaConf.create(layer) for layer in layers]))
    _fill_host_port(merged_layers, host)
    base = OmegaConf.create(merged_layers)
    base.head_server = {"host": host, "port": head_port}
    given = {"policy_base_url": policy_base_url, "policy_model_name": policy_model_name,
             "policy_api_key": policy_api_key}
    for key, value in given.items():
        if value is not None:
            base[key] = list(value) if isinstance(value, (list, tuple)) else value
    OmegaConf.set_struct(base, True)
    try:
        dotlist = parse_overrides(overrides)
        merged = OmegaConf.merge(base, OmegaConf.from_dotlist(dotlist)) if dotlist else base
    except OmegaConfBaseException as exc:
        raise ConfigError(f"override: {_explain(exc)} (known keys come from {[*envs]} and policy_model)") from None
    _check_policy(merged)
    try:
        resolved = OmegaConf.to_container(merged, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"gym config: {_explain(exc)}") from None
    check_gym_config(resolved)
    return resolved


def _fill_host_port(cfg: dict, host: str) -> None:
    for name, value in cfg.items():
        if name in GLOBAL_KEYS or not isinstance(value, dict):
            continue
        for impls in value.values():
            if not isinstance(impls, dict):
                continue
            for impl_cfg in impls.values():
                if isinstance(impl_cfg, dict):
                    impl_cfg.setdefault("host", host)
                    impl_cfg.setdefault("port", 0)


def _check_policy(cfg: DictConfig) -> None:
    flags = {"policy_base_url": "--policy-base-url", "policy_model_name": "--policy-model"}
    for key, flag in flags.items():
        # .keys(): `in` on a DictConfig is False for a `???` value, the very case looked for here.
        if key in cfg.keys() and OmegaConf.is_missing(cfg, key):  # noqa: SIM118
            raise ConfigError(f"{key} is not set: pass {flag} (gymnb gym up) or {key}= (start_gym)")


def _explain(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None)
    first = str(exc).splitlines()[0]
    if "not in struct" in first:
        return f"unknown key {key!r}"
    return f"key {key!r}: {first}" if key else first


def iter_instances(config: dict) -> list[Instance]:
    """All server instances of a resolved config, in start-up order (models, resources, agents)."""
    found = []
    for name, value in config.items():
        if name in GLOBAL_KEYS:
            continue
        (server_type, impls), = value.items()
        (impl, impl_cfg), = impls.items()
        found.append(Instance(name, server_type, impl, impl_cfg))
    return sorted(found, key=lambda inst: SERVER_TYPES.index(inst.server_type))


def check_gym_config(config: dict) -> None:
    """Raise ConfigError naming the first malformed instance or dangling reference."""
    types_by_name = {}
    for name, value in config.items():
        if name in GLOBAL_KEYS:
            continue
        if not isinstance(value, dict) or len(value) != 1 or next(iter(value)) not in SERVER_TYPES:
            raise ConfigError(f"instance {name!r} must map exactly one server type of {list(SERVER_TYPES)} "
                              "to its implementation")
        (server_type, impls), = value.items()
        if not isinstance(impls, dict) or len(impls) != 1 or not isinstance(next(iter(impls.values())), dict):
            raise ConfigError(f"instance {name!r}: {server_type} must map exactly one implementation name to "
                              "its settings")
        types_by_name[name] = server_type
    for inst in iter_instances(config):
        _check_references(inst.config, f"{inst.name}.{inst.server_type}.{inst.implementation}", types_by_name,
                          inst.server_type)


def _check_references(node, path: str, types_by_name: dict, own_type: str) -> None:
    if isinstance(node, dict):
        if set(node) >= {"type", "name"} and node.get("type") in SERVER_TYPES and len(node) <= 3:
            _check_reference(node, path, types_by_name, own_type)
            return
        for key, value in node.items():
            _check_references(value, f"{path}.{key}", types_by_name, own_type)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _check_references(value, f"{path}[{i}]", types_by_name, own_type)


def _check_reference(ref: dict, path: str, types_by_name: dict, own_type: str) -> None:
    name, ref_type = ref["name"], ref["type"]
    if name not in types_by_name:
        choices = sorted(n for n, t in types_by_name.items() if t == ref_type)
        raise ConfigError(f"{path} references {ref_type} instance {name!r}, which is not configured "
                          f"(configured {ref_type}: {choices})")
    if types_by_name[name] != ref_type:
        raise ConfigError(f"{path} references {name!r} as {ref_type}, but it is {types_by_name[name]}")
    if SERVER_TYPES.index(ref_type) >= SERVER_TYPES.index(own_type):
        raise ConfigError(f"{path}: a {own_type} instance cannot depend on a {ref_type} instance")


def dump_yaml(config: dict) -> str:
    """The config as YAML text, as NeMo Gym's head server serves it."""
    return OmegaConf.to_yaml(OmegaConf.create(config))
