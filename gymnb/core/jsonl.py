"""JSON Lines files, the format the stages hand each other: dataset rows, rollouts, metrics, validation samples.

`read_jsonl` is the one reader: blank lines skipped, each line a JSON object, and a bad line an error that
names the file, the line and what the file was expected to hold. (Resuming a rollout collection reads its
own output differently, in gymnb.rollouts.collect, because a torn last line is expected there.)
"""

from __future__ import annotations

import json
from pathlib import Path

from gymnb.core.errors import ConfigError


def read_jsonl(path: str | Path, *, what: str = "one JSON object per line", kind: str = "JSONL") -> list[dict]:
    """The objects of a JSONL file, in order. ConfigError for a missing file or a bad line, naming `what`;
    `kind` names the file a directory was given for ("rollouts JSONL")."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a directory: pass the {kind} file inside it (e.g. {path}/rollouts.jsonl); "
                          f"expected {what}")
    if not path.is_file():
        raise ConfigError(f"{path} does not exist (expected a JSONL file: {what})")
    records = []
    try:
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"{path}:{number}: not valid JSON ({exc.msg}); expected {what}") from None
                if not isinstance(record, dict):
                    raise ConfigError(f"{path}:{number}: a JSON {type(record).__name__}, not an object; "
                                      f"expected {what}")
                records.append(record)
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a text file (not UTF-8): expected a JSONL file, {what}") from None
    return records
