"""The scripted workplace conversation shared by the rollout, training and notebook tests.

A real embedded workplace row ("Email Diego about ..."), offered only the two tools its script uses (a short
prompt keeps the scripted model quick to train; the resources server still serves all 27 tools). The model
looks Diego up (compact JSON, as many models write it: the template re-renders it with spaces, so only the
splice keeps that turn on-policy), emails him (pretty JSON, round-trips), and confirms. One definition means
the scripted model is trained once per machine for every suite that uses it.
"""

from __future__ import annotations

import json

from gymnb.core.models import cache_dir

TOOL_NAMES = ("company_directory_find_email_address", "email_send_email")


def workplace_rows() -> list[dict]:
    from gymnb.gym.data import load_rows

    row = load_rows("workplace_assistant", "validation", 6)[5]
    params = row["responses_create_params"]
    params["tools"] = [t for t in params["tools"] if t["name"] in TOOL_NAMES]
    return [row]


def tool_output(name: str, arguments: dict) -> str:
    """The raw body the workplace server answers for a call, as the agent hands it to the model."""
    from gymnb.gym.workplace.company import base_state
    from gymnb.gym.workplace.server import fastapi_dumps, run_tool

    return fastapi_dumps({"output": run_tool(base_state(None), name, json.dumps(arguments).encode())})


def call(name: str, arguments: dict, *, compact: bool = False) -> str:
    sep = (",", ":") if compact else (", ", ": ")
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}, separators=sep) + "\n</tool_call>"


def scripts(rows: list[dict]) -> list[dict]:
    """What the model says for rows[0]: three model calls with two tool outputs in between."""
    params = rows[0]["responses_create_params"]
    find, email = {"name": "Diego"}, json.loads(rows[0]["ground_truth"][0]["arguments"])
    plan = [(call(TOOL_NAMES[0], find, compact=True), (TOOL_NAMES[0], find)),
            (call(TOOL_NAMES[1], email), (TOOL_NAMES[1], email))]
    tools = [{"type": "function", "function": {k: v for k, v in t.items() if k not in ("type", "strict")}}
             for t in params["tools"]]  # the chat shape the model server sends
    return [{"messages": params["input"], "tools": tools,
             "completions": [text for text, _ in plan] + ["Done: the email is sent."],
             "followups": [[{"role": "tool", "tool_call_id": "x", "content": tool_output(*c)}] for _, c in plan]}]


def scripted_workplace_model(rows: list[dict]):
    """The scripted tiny model for `rows` (trained on first use, then cached under ~/.cache/gymnb/tiny)."""
    from gymnb.policy.scripted import make_scripted_model

    return make_scripted_model(cache_dir() / "tiny" / "scripted-workplace-rollouts", scripts(rows))
