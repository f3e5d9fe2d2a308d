"""NeMo Gym's own example rows (from the installed wheel) and a scripted model that solves some of them.

Rows are NeMo Gym's, read from the `nemo-gym` wheel at test time and never copied into the repository. One
departure, for speed: the workplace rows offer only their ground-truth tools instead of all 27 (the resources
server still serves all 27). The scripted tiny model answers the first math row right and the second wrong, and
solves each workplace row with its ground-truth call (compact JSON, which only the splice keeps on-policy)
followed by a closing message; the tool output it learns is the real workplace server's raw body.
"""

from __future__ import annotations

import http.cookiejar
import json
import urllib.request
from pathlib import Path

from gymnb.models import cache_dir
from gymnb.realstack import example_rows
from gymnb.testing import make_scripted_model

NUM_ROWS = 2  # math rows; one answered right, one wrong
NUM_WORKPLACE_ROWS = 1  # a tiny model memorises one 2-call tool conversation quickly, two barely at all
MATH_ANSWERS = ["\\boxed{32}", "\\boxed{1}"]  # row 0's expected answer is 32; row 1's is a closed form, not 1
CLOSING = "Done."


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


def ground_truth_call(row: dict) -> tuple[str, dict]:
    call = row["ground_truth"][0]
    return call["name"], json.loads(call["arguments"])


def real_tool_output(resources_url: str, row: dict, name: str, arguments: dict) -> str:
    """The raw body NeMo Gym's workplace server answers for `name(arguments)` in a fresh session of `row`."""
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))

    def post(path: str, body: dict) -> str:
        request = urllib.request.Request(resources_url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        with opener.open(request, timeout=60) as resp:
            return resp.read().decode()

    post("/seed_session", row)
    return post(f"/{name}", arguments)


def tool_call_text(name: str, arguments: dict) -> str:
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}, separators=(",", ":")) + "\n</tool_call>"


def chat_tools(params: dict) -> list[dict]:
    """The tools as the model server sends them (chat shape)."""
    return [{"type": "function", "function": {k: v for k, v in t.items() if k not in ("type", "strict")}}
            for t in params["tools"]]


def conversations(math: list[dict], workplace: list[dict], tool_outputs: list[str]) -> list[dict]:
    out = [{"messages": row["responses_create_params"]["input"], "completions": [answer]}
           for row, answer in zip(math, MATH_ANSWERS)]
    for row, output in zip(workplace, tool_outputs):
        params = row["responses_create_params"]
        out.append({"messages": params["input"], "tools": chat_tools(params),
                    "completions": [tool_call_text(*ground_truth_call(row)), CLOSING],
                    "followups": [[{"role": "tool", "tool_call_id": "x", "content": output}]]})
    return out


def scripted_nemo_gym_model(version: str, resources_url: str) -> Path:
    """The scripted model for NeMo Gym `version`'s rows (trained once per machine, cached by content hash)."""
    math, workplace = read_rows(version, "math_with_judge"), workplace_rows(version)
    outputs = [real_tool_output(resources_url, row, *ground_truth_call(row)) for row in workplace]
    # Head size 32: vLLM's CPU attention has no kernel for gymnb's default tiny head size of 16.
    return make_scripted_model(cache_dir() / "tiny" / f"scripted-nemo-gym-{version}",
                               conversations(math, workplace, outputs), num_heads=2)
