"""Environment data: embedded generated math problems, and loaders for NeMo Gym JSONL and the public sets.

`load_rows(env, split, limit=None)` returns embedded rows in NeMo Gym's shape, `agent_ref` included:
- `math_with_judge`: generated problems with exact answers in DAPO-Math-17k's prompt style (the last line of
  the answer is "Answer: $Answer"), in four difficulty tiers so that a 135M model gets some right and GRPO
  has signal: 0 one-step single-digit arithmetic, 1 one-step two-digit arithmetic, 2 two-step expressions and
  word problems, 3 linear equations, fractions and percentages. Deterministic; a problem's split is fixed by a
  hash of its text, so validation never overlaps train. Rows carry `tier` and `id` besides NeMo Gym's
  `question` and `expected_answer`.
- `workplace_assistant`: `gymnb.gym.workplace.data.make_rows(split)`.

Loaders from local files (JSONL, or Parquet with pyarrow installed): `load_nemo_gym_jsonl` (rows as NeMo Gym
prepares them), `load_dapo_math_17k` and `load_aime24` (the BytedTsinghua-SIA Parquet/JSONL files, or
HuggingFaceH4/aime_2024's `problem`/`answer` rows), each converted as NeMo Gym's
prepare_bytedtsinghua_dapo17k_aime24.py does. `fetch_public_set(name)` downloads those files by name through
huggingface_hub where a hub is reachable.
"""

from __future__ import annotations

import hashlib
import random
from fractions import Fraction
from pathlib import Path

from gymnb.core.errors import ConfigError, RequestError
from gymnb.core.jsonl import read_jsonl
from gymnb.gym.common import check_row

DAPO_PROMPT = ("Solve the following math problem step by step. The last line of your response should be of the "
               "form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n{problem}\n\n"
               'Remember to put your answer on its own line after "Answer:".')
MATH_AGENT_REF = {"type": "responses_api_agents", "name": "math_with_judge_simple_agent"}
ENV_AGENTS = {"math_with_judge": "math_with_judge_simple_agent",
              "workplace_assistant": "workplace_assistant_simple_agent"}
SPLIT_SIZES = {"train": 1000, "validation": 200}
TIER_SHARES = (0.35, 0.30, 0.20, 0.15)  # tier 0 .. 3
VALIDATION_PERCENT = 20  # share of each tier's problem space that belongs to validation
PUBLIC_SETS = {  # name -> (hub dataset repo, file)
    "dapo-math-17k": ("BytedTsinghua-SIA/DAPO-Math-17k", "data/dapo-math-17k.parquet"),
    "aime-2024": ("BytedTsinghua-SIA/AIME-2024", "data/aime-2024.parquet"),
}
NAMES = ("Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo")
ITEMS = ("apples", "books", "marbles", "stickers", "pencils", "coins", "cards", "shells")


def _tier0(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    op = rng.choice("+-*")
    if op == "-":
        a, b = max(a, b), min(a, b)
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    return f"What is {a} {op.replace('*', '×')} {b}?", str(value)


def _tier1(rng: random.Random) -> tuple[str, str]:
    op = rng.choice("+-*/")
    if op in "+-":
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        a, b = (max(a, b), min(a, b)) if op == "-" else (a, b)
        return f"What is {a} {op} {b}?", str(a + b if op == "+" else a - b)
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    if op == "*":
        return f"What is {a} × {b}?", str(a * b)
    return f"What is {a * b} ÷ {b}?", str(a)


def _tier2(rng: random.Random) -> tuple[str, str]:
    a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(2, 9)
    kind = rng.randrange(3)
    if kind == 0:
        return f"What is ({a} + {b}) × {c}?", str((a + b) * c)
    if kind == 1:
        return f"What is {a} × {b} + {c}?", str(a * b + c)
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    problem = (f"{name} has {a} {item} and buys {b} bags with {c} {item} in each bag. How many {item} does {name} "
               "have now?")
    return problem, str(a + b * c)


def _tier3(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(3)
    if kind == 0:
        x, a, b = rng.randint(1, 12), rng.randint(2, 9), rng.randint(1, 20)
        return f"Solve for $x$: ${a}x + {b} = {a * x + b}$.", str(x)
    if kind == 1:
        p, q, r, s = rng.randint(1, 5), rng.randint(2, 9), rng.randint(1, 5), rng.randint(2, 9)
        value = Fraction(p, q) + Fraction(r, s)
        answer = str(value.numerator) if value.denominator == 1 else f"\\frac{{{value.numerator}}}{{{value.denominator}}}"
        return f"What is $\\frac{{{p}}}{{{q}}} + \\frac{{{r}}}{{{s}}}$? Give the answer as a fraction in lowest terms.", answer
    pct, base = rng.choice((10, 20, 25, 50, 75)), rng.randint(1, 20) * 20  # a multiple of 20: whole answers
    return f"What is {pct}% of {base}?", str(pct * base // 100)


TIERS = (_tier0, _tier1, _tier2, _tier3)


def _in_validation(problem: str) -> bool:
    return int(hashlib.sha256(problem.encode()).hexdigest(), 16) % 100 < VALIDATION_PERCENT


def make_math_rows(split: str, size: int | None = None, *, seed: int = 0,
                   tier_shares: tuple[float, ...] = TIER_SHARES, max_output_tokens: int | None = 256) -> list[dict]:
    """`size` distinct generated problems of `split`, tiers mixed by `tier_shares` and interleaved.

    A tier whose problem space is too small for its share (tier 0 has ~250 problems) gives what it has.
    `max_output_tokens` goes into each row's responses_create_params (None leaves it to the caller).
    """
    if split not in SPLIT_SIZES:
        raise ConfigError(f"unknown split {split!r}: choose one of {list(SPLIT_SIZES)}")
    size = SPLIT_SIZES[split] if size is None else size
    rng = random.Random(f"gymnb-math-{seed}-{split}")
    per_tier, seen = [], set()  # seen across tiers: "What is 3 × 4?" is tier 0 and tier 1
    for tier, share in enumerate(tier_shares):
        want, found = round(size * share), []
        for _ in range(max(200, want * 50)):
            if len(found) >= want:
                break
            problem, answer = TIERS[tier](rng)
            if problem not in seen and _in_validation(problem) == (split == "validation"):
                seen.add(problem)
                found.append((tier, problem, answer))
        per_tier.append(found)
    mixed = [p for group in _interleave(per_tier) for p in group]
    return [_math_row(split, i, *p, max_output_tokens) for i, p in enumerate(mixed)]


def _interleave(groups: list[list]) -> list[list]:
    """Round-robin over tiers so any prefix (`limit`) holds every tier."""
    longest = max((len(g) for g in groups), default=0)
    return [[g[i] for g in groups if i < len(g)] for i in range(longest)]


def _math_row(split: str, index: int, tier: int, problem: str, answer: str, max_output_tokens: int | None) -> dict:
    prompt = DAPO_PROMPT.format(problem=problem)
    params = {"input": [{"role": "user", "content": prompt}]}
    if max_output_tokens is not None:
        params["max_output_tokens"] = max_output_tokens
    return {"responses_create_params": params, "question": prompt, "expected_answer": answer,
            "agent_ref": dict(MATH_AGENT_REF), "id": f"math-{split}-{index:05d}", "tier": tier}


def load_rows(env: str, split: str, limit: int | None = None) -> list[dict]:
    """Embedded rows of `env` (`math_with_judge` | `workplace_assistant`), `split` (`train` | `validation`)."""
    if env == "math_with_judge":
        rows = make_math_rows(split)
    elif env == "workplace_assistant":
        from gymnb.gym.workplace.data import make_rows

        rows = make_rows(split)
    else:
        raise ConfigError(f"no embedded data for environment {env!r}: choose one of {list(ENV_AGENTS)}")
    for row in rows:
        row.setdefault("agent_ref", {"type": "responses_api_agents", "name": ENV_AGENTS[env]})
    return rows[:limit] if limit is not None else rows


def read_records(path: str | Path) -> list[dict]:
    """Records of a JSONL (one JSON object per line) or Parquet file."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"data file {path} does not exist")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ConfigError(f"reading {path} needs pyarrow: pip install pyarrow (or convert it to JSONL)") from None
        return pq.read_table(path).to_pylist()
    return read_jsonl(path, what="one dataset row (a JSON object) per line")


def load_nemo_gym_jsonl(path: str | Path, *, agent_name: str | None = None, limit: int | None = None) -> list[dict]:
    """NeMo Gym dataset rows from `path`, each checked; `agent_ref` set to `agent_name` where a row has none."""
    rows = read_records(path)[:limit]
    for i, row in enumerate(rows, 1):
        try:
            check_row(row)
        except RequestError as exc:
            raise ConfigError(f"{path}: row {i}: {exc}") from None
        if agent_name and "agent_ref" not in row:
            row["agent_ref"] = {"type": "responses_api_agents", "name": agent_name}
    return rows


def dapo_record_to_row(record: dict, *, where: str = "") -> dict:
    """One DAPO-Math-17k / BytedTsinghua AIME-2024 record (or an HuggingFaceH4/aime_2024 one) -> a math row."""
    if "responses_create_params" in record:
        return record
    if "prompt" in record and "reward_model" in record:
        prompt = record["prompt"][0]["content"]
        answer = record["reward_model"]["ground_truth"]
    elif "problem" in record and "answer" in record:
        prompt, answer = DAPO_PROMPT.format(problem=record["problem"]), record["answer"]
    else:
        raise ConfigError(f"{where}: not a DAPO-Math-17k or AIME 2024 record (keys {sorted(record)})")
    return {"responses_create_params": {"input": prompt}, "question": prompt, "expected_answer": str(answer),
            "agent_ref": dict(MATH_AGENT_REF)}


def load_dapo_math_17k(path: str | Path, limit: int | None = None) -> list[dict]:
    """DAPO-Math-17k train rows from a local Parquet or JSONL file (the prompt keeps DAPO's own wording)."""
    return [dapo_record_to_row(r, where=f"{path} record {i}") for i, r in enumerate(read_records(path)[:limit])]


def load_aime24(path: str | Path, limit: int | None = None) -> list[dict]:
    """AIME 2024 validation rows (30 problems; NeMo Gym scores them as mean@32) from a local file."""
    return load_dapo_math_17k(path, limit)


def fetch_public_set(name: str) -> Path:
    """Download a public set by name (`dapo-math-17k` | `aime-2024`) through huggingface_hub; its local path."""
    if name not in PUBLIC_SETS:
        raise ConfigError(f"unknown public set {name!r}: choose one of {list(PUBLIC_SETS)}")
    repo_id, filename = PUBLIC_SETS[name]
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id, filename, repo_type="dataset"))
    except Exception as exc:  # noqa: BLE001  no network, no hub access, no huggingface_hub: all mean "use a local file"
        raise ConfigError(f"could not download {repo_id}/{filename} ({type(exc).__name__}: {exc}); download it "
                          "elsewhere and pass its local path") from None


def read_rows(env: str, path: str | None, split: str, limit: int | None = None) -> list[dict]:
    """Rows for `env` from, in order of preference: a local file (`path`: NeMo Gym rows JSONL, or for math
    also DAPO-Math-17k / AIME 2024 records in JSONL or Parquet), a public set by name (`split` =
    `dapo-math-17k` | `aime-2024`, downloaded through the hub), or the embedded split. Rows without an
    `agent_ref` go to the environment's simple agent."""
    if path is None and split in PUBLIC_SETS:
        path = str(fetch_public_set(split))
    if path is None:
        return load_rows(env, split, limit=limit)
    if not Path(path).exists():
        raise ConfigError(f"rows file {path} does not exist (a training config's env.train_path / env.validation_path)")
    if env == "math_with_judge":  # NeMo Gym rows pass through unchanged; DAPO/AIME records are converted
        rows = load_dapo_math_17k(path, limit)
    else:
        rows = load_nemo_gym_jsonl(path, limit=limit)
    agent = {"type": "responses_api_agents", "name": ENV_AGENTS[env]}
    return [row if "agent_ref" in row else {**row, "agent_ref": dict(agent)} for row in rows]
