"""Training stage, checkpoints: save and resume a GRPO run (weights, optimizer, schedule, RNG, step).

Layout under the run directory:
    checkpoints/step_000010/model/      HF format (servable: `gymnb serve --model <dir>`)
    checkpoints/step_000010/trainer.pt  optimizer + scheduler state, RNG state, step
A checkpoint directory is written under a temporary name and renamed when complete, so a run killed while
saving never resumes from half a checkpoint.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from gymnb.core.errors import TrainingError

STEP_DIR = re.compile(r"^step_(\d{6,})$")


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:06d}"


def save_checkpoint(run_dir: Path, step: int, model, tokenizer, optimizer, scheduler, keep_last: int = 2) -> Path:
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp / "model")
    tokenizer.save_pretrained(tmp / "model")
    torch.save({
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
    }, tmp / "trainer.pt")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    prune_checkpoints(run_dir, keep_last)
    return final


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    root = Path(run_dir) / "checkpoints"
    if not root.exists():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> tuple[int, Path] | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for _, path in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(path: Path, model, optimizer, scheduler) -> int:
    """Restore weights, optimizer, scheduler and RNG from `path` into the given objects; return the step."""
    from safetensors.torch import load_file

    weights = sorted((Path(path) / "model").glob("*.safetensors"))
    trainer_file = Path(path) / "trainer.pt"
    if not weights or not trainer_file.exists():
        raise TrainingError(f"checkpoint {path} is incomplete (no weights or no trainer.pt); delete it to resume "
                            "from the previous one")
    state: dict = {}
    for file in weights:
        state.update(load_file(str(file)))
    # Tied embeddings are saved once; strict=False lets the tied head be rebuilt from the embedding.
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise TrainingError(f"checkpoint {path} does not match the model: missing {sorted(set(missing) - tied)}, "
                            f"unexpected {sorted(unexpected)}")
    if tied:
        model.tie_weights()
    saved = torch.load(trainer_file, weights_only=False)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    rng = saved["rng"]
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    return int(saved["step"])
