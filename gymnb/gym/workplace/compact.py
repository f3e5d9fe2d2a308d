"""workplace_assistant environment, compact tools: rows that offer the policy fewer than the 27 tools.

A DEPARTURE FROM NEMO GYM, for small models on a CPU: NeMo Gym's workplace rows carry all 27 tool schemas
(~4.6k prompt tokens with SmolLM2's tokenizer), which a 135M model cannot use and a 2-core CPU cannot train on
at any useful rate. A compacted row says so in `tools_subset` (mode, tool count, the note below), and so do
the configs and reports that use one. The environment itself is unchanged: every tool still answers, and
the reward is NeMo Gym's.

Modes:
- `all`: the row as it is (NeMo Gym's rows).
- `category`: the tools of the task's category (email, calendar, analytics, project management, CRM) plus the
  company directory: 5-8 tools, ~1.1k prompt tokens. The policy must still pick the tools and their order.
- `reference`: the tools the task's reference solution calls (its lookups and actions; the ground truth's for
  rows without one) plus `num_distractors` other tools drawn per row: a hint as well as a shortcut.
"""

from __future__ import annotations

import random

TOOL_MODES = ("all", "category", "reference")
DEPARTURE_NOTE = "departure from NeMo Gym: its workplace rows carry all 27 tools"
DIRECTORY_TOOL = "company_directory_find_email_address"
# category (row "category" without the "workplace_assistant_" prefix) -> tool name prefix
CATEGORY_PREFIXES = {"email": "email_", "calendar": "calendar_", "analytics": "analytics_",
                     "project_management": "project_management_",
                     "customer_relationship_manager": "customer_relationship_manager_"}


def tool_name(tool: dict) -> str:
    """A tool's name in the flat Responses shape (NeMo Gym's rows) or the chat shape."""
    return (tool.get("function") or tool)["name"]


def category_tools(category: str) -> set[str]:
    """Tool names offered for a task of `category` (`workplace_assistant_email` or `email`)."""
    key = category.removeprefix("workplace_assistant_")
    if key not in CATEGORY_PREFIXES:
        raise ValueError(f"unknown workplace category {category!r}: expected one of {sorted(CATEGORY_PREFIXES)}")
    from gymnb.gym.workplace.schemas import TOOL_NAMES

    return {name for name in TOOL_NAMES if name.startswith(CATEGORY_PREFIXES[key])} | {DIRECTORY_TOOL}


def compact_row(row: dict, mode: str, *, solution: list[list[dict]] | None = None, num_distractors: int = 0,
                seed: int = 0) -> dict:
    """A copy of `row` whose tools are cut to `mode` (see the module docstring), labelled in `tools_subset`."""
    if mode not in TOOL_MODES:
        raise ValueError(f"tools mode {mode!r}: expected one of {list(TOOL_MODES)}")
    if mode == "all":
        return row
    tools = row["responses_create_params"]["tools"]
    if mode == "category":
        keep = category_tools(row["category"])
    else:
        calls = [c for turn in solution for c in turn] if solution else row["ground_truth"]
        keep = {c["name"] for c in calls}
        others = sorted(tool_name(t) for t in tools if tool_name(t) not in keep)
        keep |= set(random.Random(f"{seed}:{row.get('id')}").sample(others, min(num_distractors, len(others))))
    kept = [t for t in tools if tool_name(t) in keep]  # NeMo Gym's order
    params = {**row["responses_create_params"], "tools": kept}
    return {**row, "responses_create_params": params,
            "tools_subset": {"mode": mode, "num_tools": len(kept), "of": len(tools),
                             "num_distractors": num_distractors if mode == "reference" else 0,
                             "note": DEPARTURE_NOTE}}


def compact_rows(rows: list[dict], mode: str, *, solutions: list | None = None, num_distractors: int = 0,
                 seed: int = 0) -> list[dict]:
    """`compact_row` of each row; `solutions[i]` (optional) is row i's reference solution."""
    return [compact_row(row, mode, solution=solutions[i] if solutions else None, num_distractors=num_distractors,
                        seed=seed) for i, row in enumerate(rows)]
