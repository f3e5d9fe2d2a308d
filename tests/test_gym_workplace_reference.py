"""Reference solutions (lookups, then the ground truth) through the real workplace server, and compact rows."""

from __future__ import annotations

import asyncio
import json
import random

import aiohttp
import pytest

from gymnb.core.http import ServerLoop
from gymnb.gym.workplace.compact import DEPARTURE_NOTE, category_tools, compact_row
from gymnb.gym.workplace.company import base_state
from gymnb.gym.workplace.data import build_reference_solution, build_row, make_rows, reference_solutions
from gymnb.gym.workplace.reference import check_reference_solution, replay_solution, used_facts
from gymnb.gym.workplace.schemas import TOOL_NAMES
from gymnb.gym.workplace.server import make_app
from gymnb.gym.workplace.tasks import TEMPLATES

READ_ONLY_PREFIXES = ("company_directory_", "email_search", "email_get", "calendar_search", "calendar_get",
                      "analytics_get", "analytics_total", "analytics_engaged", "analytics_traffic",
                      "project_management_search", "project_management_get", "customer_relationship_manager_search")


@pytest.fixture(scope="module")
def url():
    loop = ServerLoop("test-workplace-reference")
    yield loop.start_app(make_app({}))
    loop.stop()


def template_tasks(seeds=range(4)):
    """(template name, row, solution) for every template over several seeds (templates may decline a seed)."""
    state = base_state()
    for category, templates in TEMPLATES.items():
        for template in templates:
            for seed in seeds:
                made = template(state, random.Random(seed))
                if made is None:
                    continue
                prompt, calls, lookups = made
                yield template.__name__, build_row(0, category, prompt, calls), build_reference_solution(calls, lookups)


async def replay_over_http(url: str, row: dict, solution: list[list[dict]]) -> tuple[list[list[str]], float]:
    """What an agent does with the solution: seed a session, POST every call in order, verify."""
    outputs, items = [], []
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as client:
        async with client.post(f"{url}/seed_session", json=row) as resp:
            assert resp.status == 200
        for turn in solution:
            outputs.append([])
            for call in turn:
                async with client.post(f"{url}/{call['name']}", data=call["arguments"].encode()) as resp:
                    outputs[-1].append(await resp.text())
                items.append({"type": "function_call", "call_id": f"c{len(items)}", "name": call["name"],
                              "arguments": call["arguments"]})
        async with client.post(f"{url}/verify", json={**row, "response": {"output": items}}) as resp:
            reward = (await resp.json())["reward"]
    return outputs, reward


def test_every_template_reference_solution_earns_one_through_the_server_and_its_lookups_hold_the_facts(url):
    seen = set()
    for name, row, solution in template_tasks():
        seen.add(name)
        outputs, reward = asyncio.run(replay_over_http(url, row, solution))
        assert reward == 1.0, (name, row["responses_create_params"]["input"][1]["content"])
        *lookups, actions = solution
        assert actions == row["ground_truth"]
        assert all(call["name"].startswith(READ_ONLY_PREFIXES) for turn in lookups for call in turn), name
        request = row["responses_create_params"]["input"][1]["content"].lower()
        seen_text = " ".join(text for turn in outputs[:-1] for text in turn).lower()
        for fact in used_facts(actions):  # every id/address used: in the request or a lookup's answer
            assert fact.lower() in request or fact.lower() in seen_text, (name, fact)
        # the in-process replay a warm start trains on gives the server's bytes
        assert replay_solution(base_state(), solution) == outputs
    assert seen == {t.__name__ for templates in TEMPLATES.values() for t in templates}


def test_lookup_tasks_need_their_lookups_and_id_tasks_have_them():
    state = base_state()
    rows, solutions = make_rows("validation"), reference_solutions("validation")
    assert len(solutions) == len(rows)
    needing = 0
    for row, solution in zip(rows, solutions):
        assert check_reference_solution(state, row, solution) == []
        request = row["responses_create_params"]["input"][1]["content"].lower()
        if any(f.lower() not in request for f in used_facts(row["ground_truth"])):
            needing += 1
            # without its lookups the same actions rely on facts the model never saw: the checker says so
            problems = check_reference_solution(state, row, [row["ground_truth"]])
            assert any("neither in the request nor in a lookup" in p for p in problems)
    assert needing >= len(rows) // 2  # most tasks are lookup tasks


def test_checker_rejects_a_wrong_or_mutating_solution():
    state = base_state()
    row, solution = make_rows("validation", 1)[0], reference_solutions("validation", 1)[0]
    wrong_id = [[{**solution[-1][0], "arguments": json.dumps({**json.loads(solution[-1][0]["arguments"]),
                                                                "recipient": "nobody@atlas.com"})}]]
    assert "replaying the solution does not earn reward 1" in check_reference_solution(state, row, wrong_id)
    mutating_lookup = [solution[-1], solution[-1]]
    assert "a lookup changes the company" in check_reference_solution(state, row, mutating_lookup)


def test_category_rows_keep_their_category_tools_and_say_they_depart_from_nemo_gym():
    rows, solutions = make_rows("validation", 10), reference_solutions("validation", 10)
    for row, solution in zip(rows, solutions):
        compact = compact_row(row, "category", solution=solution)
        names = [t["name"] for t in compact["responses_create_params"]["tools"]]
        category = row["category"].removeprefix("workplace_assistant_")
        assert set(names) == category_tools(category) and 3 <= len(names) < len(TOOL_NAMES)
        assert names == [n for n in TOOL_NAMES if n in names]  # NeMo Gym's order
        assert {c["name"] for turn in solution for c in turn} <= set(names)  # the task stays solvable
        assert compact["tools_subset"]["mode"] == "category" and compact["tools_subset"]["note"] == DEPARTURE_NOTE
        assert compact["tools_subset"]["of"] == len(TOOL_NAMES) == len(row["responses_create_params"]["tools"])
        rest = ("responses_create_params", "tools_subset")
        assert {k: v for k, v in compact.items() if k not in rest} == {k: v for k, v in row.items() if k not in rest}
        assert len(row["responses_create_params"]["tools"]) == len(TOOL_NAMES)  # the input row is not modified
    assert compact_row(rows[0], "all") == rows[0]
    with pytest.raises(ValueError, match="tools mode 'some'"):
        compact_row(rows[0], "some")


def test_reference_rows_offer_the_solution_tools_plus_k_distractors():
    rows, solutions = make_rows("validation", 10), reference_solutions("validation", 10)
    for k in (0, 2):
        for row, solution in zip(rows, solutions):
            compact = compact_row(row, "reference", solution=solution, num_distractors=k, seed=3)
            names = {t["name"] for t in compact["responses_create_params"]["tools"]}
            needed = {c["name"] for turn in solution for c in turn}
            assert needed <= names and len(names) == len(needed) + k
            assert compact == compact_row(row, "reference", solution=solution, num_distractors=k, seed=3)
            assert compact["tools_subset"] == {"mode": "reference", "num_tools": len(names), "of": len(TOOL_NAMES),
                                               "num_distractors": k, "note": DEPARTURE_NOTE}
    # a row without a reference solution (NeMo Gym's own) gets its ground truth's tools
    plain = compact_row(rows[1], "reference")
    assert {t["name"] for t in plain["responses_create_params"]["tools"]} == {c["name"] for c in rows[1]["ground_truth"]}


def as_result(row: dict, turns: list[list[dict]], reward: float) -> dict:
    """A /run result whose response holds `turns`' calls and the outputs the tools gave them."""
    output = []
    for turn, texts in zip(turns, replay_solution(base_state(), turns)):
        for i, (call, text) in enumerate(zip(turn, texts)):
            output += [{"type": "function_call", "call_id": f"c{len(output)}", **call},
                       {"type": "function_call_output", "call_id": f"c{len(output)}", "output": text}]
    return {**row, "response": {"output": output}, "reward": reward, "_ng_task_index": row["id"]}


def test_analysis_tells_looked_up_facts_from_unseen_ones():
    from gymnb.gym.workplace.analysis import classify_rollout, summarize_rollouts

    rows, solutions = make_rows("validation", 10), reference_solutions("validation", 10)
    lookup = next(i for i, s in enumerate(solutions) if len(s) > 1 and used_facts(s[-1]))
    direct = next(i for i, s in enumerate(solutions) if len(s) == 1)
    looked = as_result(rows[lookup], solutions[lookup], 1.0)
    memorised = as_result(rows[lookup], [solutions[lookup][-1]], 1.0)  # right ids, never looked up
    plain = as_result(rows[direct], solutions[direct], 1.0)
    silent = {**rows[direct], "response": {"output": []}, "reward": 0.0}
    assert [classify_rollout(r)["kind"] for r in (looked, memorised, plain)] == ["looked_up", "unseen_facts", "direct"]
    assert classify_rollout(looked)["parsable_call"] and classify_rollout(looked)["right_action_tool"]
    assert not classify_rollout(silent)["parsable_call"]
    summary = summarize_rollouts([looked, memorised, plain, silent])["all"]
    assert summary["rewarded"] == {"direct": 1, "looked_up": 1, "unseen_facts": 1}
    assert summary["rollouts"] == 4 and summary["mean_reward"] == 0.75 and summary["parsable_call"] == 0.75


def test_compare_validations_reads_the_first_and_last_validation_of_a_run(tmp_path):
    from gymnb.gym.workplace.analysis import compare_validations

    rows, solutions = make_rows("validation", 10), reference_solutions("validation", 10)
    direct = next(i for i, s in enumerate(solutions) if len(s) == 1)
    solved = as_result(rows[direct], solutions[direct], 1.0)
    failed = {**rows[direct], "response": {"output": []}, "reward": 0.0, "_ng_task_index": rows[direct]["id"]}
    folder = tmp_path / "validation"
    folder.mkdir()
    for step, results in ((0, [failed, failed]), (5, [failed, solved]), (10, [solved, solved])):
        (folder / f"step_{step:06d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))
    (folder / "step_000010.failures.jsonl").write_text(json.dumps({"error": "timeout"}) + "\n")  # not a rollout
    compared = compare_validations(tmp_path)["all"]
    assert compared["before"]["mean_reward"] == 0.0 and compared["before"]["parsable_call"] == 0.0
    assert compared["after"]["mean_reward"] == 1.0 and compared["after"]["rewarded"]["direct"] == 2
    assert compare_validations(tmp_path / "no-such-run") == {}
