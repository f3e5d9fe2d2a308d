"""Typed run configuration: a dataclass schema, a YAML file, and dotted `key=value` overrides that win.

Every run of every stage (serve, collect, train, validate) is described by one dataclass instance. The same
overrides come from the command line (`gymnb train --config f.yaml trainer.lr=1e-5`) and from a notebook's
parameters cell, so no setting needs a code change. An unknown key is an error naming the key.

The NeMo Gym environment config is a different shape (free-form instance names); it lives in
`gymnb.gym.config` and shares only `parse_overrides` with this module.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gymnb.core.errors import ConfigError

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIGS_DIR = REPO_ROOT / "configs"
# Where every gymnb command (and a validation notebook's kernel) finds the policy server's API key when it is
# not given as --api-key, which `ps` shows to every user of the machine.
API_KEY_ENV = "GYMNB_API_KEY"


def read_api_key(api_key: str | None = None, api_key_file: str | None = None) -> str | None:
    """The API key from `api_key`, else the first line of `api_key_file`, else $GYMNB_API_KEY; None if unset."""
    if api_key and api_key_file:
        raise ConfigError("give the API key once: --api-key or --api-key-file, not both")
    if api_key:
        return api_key
    if api_key_file:
        try:
            key = Path(api_key_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"cannot read the API key file {api_key_file}: {exc.strerror}") from None
        if not key:
            raise ConfigError(f"the API key file {api_key_file} is empty")
        return key
    return os.environ.get(API_KEY_ENV) or None


def split_override(item: str, *, form: str = "key.sub=value") -> tuple[str, str]:
    """`key=value` -> (key, raw value text): the one parser of overrides, from the command line, a notebook's
    parameters or a config call. ConfigError naming `form` when there is no `=` or the key is empty or padded."""
    key, sep, raw = item.partition("=")
    if not sep or not key or key.strip() != key:
        raise ConfigError(f"override {item!r} is not of the form {form}")
    return key, raw


def parse_overrides(overrides: Iterable[str]) -> list[str]:
    """Check each `dotted.key=value` override; return them unchanged (OmegaConf's dotlist types the values)."""
    checked = list(overrides)
    for item in checked:
        split_override(item)
    return checked


def load_config(schema: type[T], path: str | Path | None = None, overrides: Iterable[str] = ()) -> T:
    """Build a `schema` instance from its defaults, then the YAML file at `path`, then `overrides`.

    Unknown keys (in the file or an override) and wrongly typed values raise ConfigError naming the key.
    Cross-field checks run afterwards through the dataclass's `__post_init__`.
    """
    base = OmegaConf.structured(schema)
    layers = []
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        layers.append(OmegaConf.create(loaded))
    dotlist = parse_overrides(overrides)
    if dotlist:
        layers.append(OmegaConf.from_dotlist(dotlist))
    try:
        merged = OmegaConf.merge(base, *layers)
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{schema.__name__}: {_explain(exc)}") from None
    except (TypeError, ValueError) as exc:  # raised by __post_init__ cross-field checks
        raise ConfigError(f"{schema.__name__}: {exc}") from None
    return obj


def _explain(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None)
    msg = str(exc).splitlines()[0]
    return f"key {key!r}: {msg}" if key else msg


def config_to_dict(cfg: Any) -> dict:
    """The config as plain JSON-able data (dataclasses become dicts, Paths become strings)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def config_hash(cfg: Any) -> str:
    """A short stable hash of the resolved config, written next to results so a report names its cause."""
    blob = json.dumps(config_to_dict(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def save_resolved_config(cfg: Any, out_dir: str | Path) -> Path:
    """Write `config.yaml` (resolved values plus `config_hash`) into `out_dir` and return its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = config_to_dict(cfg)
    data["config_hash"] = config_hash(cfg)
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
