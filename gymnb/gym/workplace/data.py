"""workplace_assistant environment, embedded data: generated tasks as NeMo Gym dataset rows.

`make_rows(split)` turns the templates of `tasks` over the synthetic company into rows shaped exactly like
NeMo Gym's workplace_assistant rows (system prompt, the 27 tool schemas, `parallel_tool_calls: false`,
`temperature: 1.0`, `ground_truth` calls with JSON-string arguments, `id`, `category`, `environment_name`),
plus the `agent_ref` that routes them to the simple agent. Deterministic: a fixed seed per split; validation
prompts never appear in train. Categories are interleaved, so any prefix (`limit`) is balanced.

Every ground-truth call is replayed at generation time and must take effect (no "not found", no rejected
value), so a row's ground truth changes the company and doing nothing scores 0.

`reference_solutions(split)` gives, aligned with `make_rows(split)`, each task's reference solution: the
template's read-only lookups followed by the ground truth, as turns of calls (gymnb's own addition: NeMo Gym's
rows carry only the ground truth, so the rows themselves stay in its shape).
"""

from __future__ import annotations

import copy
import datetime as dt
import functools
import json
import random

from gymnb.gym.workplace.company import base_state
from gymnb.gym.workplace.schemas import tool_schemas
from gymnb.gym.workplace.state import NOW, CompanyState
from gymnb.gym.workplace.tasks import TEMPLATES, Calls, Lookups
from gymnb.gym.workplace.tools import call_tool

_NOW = dt.datetime.fromisoformat(NOW)
SYSTEM_PROMPT = (f"Today's date is {_NOW:%A}, {_NOW.date()} and the current time is {_NOW.time()}. Remember the "
                 "current date and time when answering queries. Meetings must not start before 9am or end after 6pm.")
ENVIRONMENT_NAME = "workplace_assistant"
AGENT_REF = {"type": "responses_api_agents", "name": "workplace_assistant_simple_agent"}
# split -> (seed, rows per category)
SPLITS = {"train": (1, 100), "validation": (2, 20)}


def call_took_effect(output: object) -> bool:
    """Whether a mutating tool's output says it acted (its id, plot path or "... successfully.")."""
    if not isinstance(output, str):
        return False
    return output.endswith("successfully.") or (len(output) == 8 and output.isdigit()) or output.startswith("plots/")


def check_ground_truth(state: CompanyState, calls: Calls) -> bool:
    """Replay `calls` on a copy of `state`; True iff every one of them took effect."""
    scratch = state.copy()
    return all(call_took_effect(call_tool(scratch, name, args)) for name, args in calls)


def generate_tasks(state: CompanyState, seed: int, per_category: int,
                   exclude: frozenset[str] = frozenset()) -> list[tuple[str, str, Calls, Lookups]]:
    """`per_category` (category, prompt, calls, lookups) per category, categories interleaved, prompts unique."""
    rng = random.Random(seed)
    by_category: dict[str, list[tuple[str, str, Calls, Lookups]]] = {}
    seen = set(exclude)
    for category, templates in TEMPLATES.items():
        found: list[tuple[str, str, Calls, Lookups]] = []
        for attempt in range(per_category * 50):
            if len(found) == per_category:
                break
            made = templates[attempt % len(templates)](state, rng)  # round robin keeps the tiers mixed
            if made is None or made[0] in seen or not check_ground_truth(state, made[1]):
                continue
            seen.add(made[0])
            found.append((category, *made))
        if len(found) < per_category:
            raise RuntimeError(f"workplace task generation found only {len(found)} {category} tasks "
                               f"(wanted {per_category}); the templates need more variety")
        by_category[category] = found
    return [task for group in zip(*by_category.values()) for task in group]


def build_row(index: int, category: str, prompt: str, calls: Calls) -> dict:
    """One dataset row in NeMo Gym's workplace_assistant shape."""
    return {
        "id": index,
        "responses_create_params": {
            "input": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}],
            "tools": tool_schemas(),
            "parallel_tool_calls": False,
            "temperature": 1.0,
        },
        "ground_truth": [{"name": name, "arguments": json.dumps(args)} for name, args in calls],
        "category": f"workplace_assistant_{category}",
        "environment_name": ENVIRONMENT_NAME,
        "agent_ref": dict(AGENT_REF),
    }


def build_reference_solution(calls: Calls, lookups: Lookups) -> list[list[dict]]:
    """Turns of `{"name", "arguments"}` calls (JSON-string arguments, as on the wire): lookups, then the
    ground truth as one turn."""
    return [[{"name": name, "arguments": json.dumps(args)} for name, args in turn] for turn in [*lookups, calls]]


@functools.cache
def _split_tasks(split: str) -> tuple[tuple[str, str, Calls, Lookups], ...]:
    seed, per_category = SPLITS[split]
    exclude = frozenset()
    if split != "validation":
        exclude = frozenset(prompt for _, prompt, _, _ in _split_tasks("validation"))
    return tuple(generate_tasks(base_state(), seed, per_category, exclude))


@functools.cache
def _split_rows(split: str) -> tuple[dict, ...]:
    return tuple(build_row(i, category, prompt, calls) for i, (category, prompt, calls, _) in
                 enumerate(_split_tasks(split)))


def _check_split(split: str, limit: int | None) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown workplace_assistant split {split!r}; choose one of {sorted(SPLITS)}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")


def make_rows(split: str, limit: int | None = None) -> list[dict]:
    """Rows of the embedded `train` (500) or `validation` (100) split; the first `limit` if given."""
    _check_split(split, limit)
    rows = _split_rows(split)
    return copy.deepcopy(list(rows[:limit] if limit is not None else rows))


def reference_solutions(split: str, limit: int | None = None) -> list[list[list[dict]]]:
    """The reference solution of each row of `make_rows(split, limit)`, in the same order (row `id` = index)."""
    _check_split(split, limit)
    tasks = _split_tasks(split)[:limit] if limit is not None else _split_tasks(split)
    return [build_reference_solution(calls, lookups) for _, _, calls, lookups in tasks]
