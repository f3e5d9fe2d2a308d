"""NeMo Gym's own example rows (from the installed wheel) and the tiny model every conformance stack serves.

Rows are NeMo Gym's, read from the `nemo-gym` wheel at test time and never copied into the repository. One
departure, for speed: the workplace rows offer only their ground-truth tools instead of all 27 (the resources
server still serves all 27), which keeps a CPU prefill short.
"""

from __future__ import annotations

import json
from pathlib import Path

from gymnb.core.models import cache_dir
from gymnb.realstack import example_rows

NUM_ROWS = 2
NUM_WORKPLACE_ROWS = 1


def read_rows(version: str, env: str, limit: int = NUM_ROWS) -> list[dict]:
    lines = example_rows(version, env).read_text().splitlines()
    return [json.loads(line) for line in lines[:limit]]


def workplace_rows(version: str) -> list[dict]:
    rows = read_rows(version, "workplace_assistant", NUM_WORKPLACE_ROWS)
    for row in rows:
        params = row["responses_create_params"]
        names = {call["name"] for call in row["ground_truth"]}
        params["tools"] = [tool for tool in params["tools"] if tool["name"] in names]
    return rows


def write_rows(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def vllm_tiny_model() -> Path:
    """A random tiny model vLLM can serve: its CPU attention has no kernel for head size 16, the size of
    gymnb's default tiny models (the tier checks the wire, not answers, so a random model serves)."""
    from gymnb.core.models import make_tiny_model

    return make_tiny_model(cache_dir() / "tiny" / "llama-2x64h2-seed0", num_heads=2)
