"""workplace_assistant environment, reference solutions: replay a task's lookups and ground truth, check both.

A reference solution (`data.reference_solutions`) is what a solver does: turns of read-only lookups (search
the emails, events, tasks or customers; find an address in the directory), then the ground truth's mutating
calls as one turn. Replaying it gives the exact tool outputs the agent would hand the model (the resources
server's body, `{"output": ...}` in FastAPI's compact JSON), which is what a warm start trains on.

`check_reference_solution` holds a solution to what makes it a lesson in "look up, then act":
- it earns reward 1 under the environment's own rule (final company equals the ground truth's);
- its lookups change nothing;
- every id and address the mutating calls use is either in the request or in the output of an earlier
  lookup, so the solution never relies on a fact the model could only have memorised.
"""

from __future__ import annotations

import json

from gymnb.gym.workplace.server import fastapi_dumps, run_tool
from gymnb.gym.workplace.state import CompanyState
from gymnb.gym.workplace.verify import compute_reward

# Arguments that carry a fact about the company (an id or an address) rather than the request's own words.
FACT_ARGUMENTS = frozenset({"email_id", "event_id", "task_id", "customer_id", "recipient", "participant_email",
                            "assigned_to_email"})


def replay_solution(state: CompanyState, solution: list[list[dict]]) -> list[list[str]]:
    """The tool output text of every call, turn by turn, on a fresh copy of `state` (calls run in order)."""
    scratch = state.copy()
    return [[fastapi_dumps({"output": run_tool(scratch, call["name"], call["arguments"].encode())})
             for call in turn] for turn in solution]


def used_facts(calls: list[dict]) -> list[str]:
    """Ids and addresses the calls pass: the arguments in FACT_ARGUMENTS, and a reassignment's new address."""
    facts = []
    for call in calls:
        args = json.loads(call["arguments"])
        facts += [str(v) for k, v in args.items() if k in FACT_ARGUMENTS]
        if args.get("field") == "assigned_to_email" and "new_value" in args:
            facts.append(str(args["new_value"]))
    return facts


def check_reference_solution(state: CompanyState, row: dict, solution: list[list[dict]]) -> list[str]:
    """What is wrong with `solution` for `row` (empty: it is a sound reference solution)."""
    problems = []
    *lookups, actions = solution
    if actions != row["ground_truth"]:
        problems.append("the last turn is not the row's ground truth")
    every_call = [call for turn in solution for call in turn]
    if compute_reward(state, every_call, row["ground_truth"]) != 1.0:
        problems.append("replaying the solution does not earn reward 1")
    lookup_calls = [call for turn in lookups for call in turn]
    if compute_reward(state, lookup_calls, []) != 1.0:
        problems.append("a lookup changes the company")
    outputs = " ".join(text for turn in replay_solution(state, lookups) for text in turn).lower()
    request = row["responses_create_params"]["input"][-1]["content"].lower()
    for fact in used_facts(actions):
        if fact.lower() not in request and fact.lower() not in outputs:
            problems.append(f"{fact!r} is used but neither in the request nor in a lookup's output")
    return problems
