"""workplace_assistant resources server over real HTTP on loopback: verify, tools, sessions, bad input."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from test_gym_workplace_env import CSV_FIXTURE, load_example_rows, write_fixture

from gymnb.core.errors import ConfigError
from gymnb.core.http import ServerLoop
from gymnb.gym.workplace.company import base_state
from gymnb.gym.workplace.data import make_rows
from gymnb.gym.workplace.server import make_app


@pytest.fixture(scope="module")
def loop():
    server_loop = ServerLoop("test-workplace")
    yield server_loop
    server_loop.stop()


@pytest.fixture(scope="module")
def url(loop):
    return loop.start_app(make_app({}))


def new_client() -> aiohttp.ClientSession:
    # One client = one rollout: its own jar (unsafe=True keeps cookies from 127.0.0.1).
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


async def post(client: aiohttp.ClientSession, url: str, body=None, *, data: bytes | None = None):
    kwargs = {"data": data} if data is not None else {"json": body}
    async with client.post(url, **kwargs) as resp:
        return resp.status, await resp.json()


def function_calls(calls: list[dict]) -> dict:
    """A Responses-API response whose output holds these calls (with their outputs, as an agent records them)."""
    output = []
    for i, call in enumerate(calls):
        output.append({"type": "function_call", "name": call["name"], "arguments": call["arguments"],
                       "call_id": f"call_{i}", "id": f"fc_{i}", "status": "completed"})
        output.append({"type": "function_call_output", "call_id": f"call_{i}", "output": '{"output": "ok"}'})
    output.append({"type": "message", "role": "assistant", "id": "msg", "status": "completed",
                   "content": [{"type": "output_text", "text": "Done.", "annotations": []}]})
    return {"id": "resp_1", "object": "response", "output": output}


def call(tool: str, **arguments) -> dict:
    return {"name": tool, "arguments": json.dumps(arguments)}


def verify_reward(url: str, row: dict, calls: list[dict]) -> float:
    async def run():
        async with new_client() as client:
            status, body = await post(client, f"{url}/verify", {**row, "response": function_calls(calls)})
            assert status == 200, body
            assert {k: body[k] for k in row} == row  # the row comes back unchanged
            return body["reward"]
    return asyncio.run(run())


def test_ground_truth_scores_one_and_read_only_calls_do_not_matter(url):
    rows = load_example_rows() + make_rows("validation", limit=10)
    reads = [call("company_directory_find_email_address", name="raj"),
             call("email_search_emails", query="report generation"),
             call("customer_relationship_manager_search_customers", status="Lead"),
             call("analytics_total_visits_count", time_min="2023-11-01")]
    for row in rows:
        assert verify_reward(url, row, row["ground_truth"]) == 1.0
        interleaved = [reads[0], *[c for gt in row["ground_truth"] for c in (gt, reads[1])], *reads[2:]]
        assert verify_reward(url, row, interleaved) == 1.0


def test_wrong_argument_or_missing_call_scores_zero(url):
    rows = {row["id"]: row for row in load_example_rows()}
    reply = json.loads(rows[0]["ground_truth"][0]["arguments"])
    other = next(e for e in base_state().emails if e["sender/recipient"] != "carlos.rivera@atlas.com")
    assert verify_reward(url, rows[0], [call("email_reply_email", email_id=other["email_id"], body=reply["body"])]) == 0.0
    assert verify_reward(url, rows[0], [call("email_reply_email", email_id=reply["email_id"], body="Sure.")]) == 0.0
    deletions = rows[3]["ground_truth"]
    assert len(deletions) == 4
    assert verify_reward(url, rows[3], deletions[:-1]) == 0.0
    assert verify_reward(url, rows[3], []) == 0.0
    assert verify_reward(url, rows[3], [*deletions, call("customer_relationship_manager_delete_customer",
                                                          customer_id="00000001")]) == 0.0  # one too many


def test_case_only_differences_in_free_text_score_one(url):
    rows = {row["id"]: row for row in load_example_rows()}
    reply = json.loads(rows[0]["ground_truth"][0]["arguments"])
    shouted = call("email_reply_email", email_id=reply["email_id"], body=reply["body"].upper())
    assert verify_reward(url, rows[0], [shouted]) == 1.0
    rename = json.loads(rows[1]["ground_truth"][0]["arguments"])
    assert verify_reward(url, rows[1], [call("calendar_update_event", **{**rename,
                                                                         "new_value": "risk MANAGEMENT forum"})]) == 1.0
    # status is an enumeration: its case matters ("lost" is not a status, so nothing changes).
    lowered = [call(c["name"], **{**json.loads(c["arguments"]), "new_value": "lost"}) for c in rows[4]["ground_truth"]]
    assert verify_reward(url, rows[4], lowered) == 0.0


def test_sessions_do_not_leak_under_32_concurrent_rollouts(url):
    async def rollout(i: int) -> tuple[list, float]:
        async with new_client() as client:
            status, _ = await post(client, f"{url}/seed_session", make_rows("validation", limit=1)[0])
            assert status == 200
            subject = f"probe {i}"
            sent = call("email_send_email", recipient="raj.patel@atlas.com", subject=subject, body=f"from {i}")
            for _ in range(2):  # interleave with the other rollouts
                await asyncio.sleep(0)
            status, body = await post(client, f"{url}/email_send_email", json.loads(sent["arguments"]))
            assert (status, body) == (200, {"output": "Email sent successfully."})
            await asyncio.sleep(0)
            _, deleted = await post(client, f"{url}/customer_relationship_manager_delete_customer",
                                    {"customer_id": "00000001"})
            assert deleted == {"output": "Customer deleted successfully."}  # every session has its own copy
            _, found = await post(client, f"{url}/email_search_emails", {"query": "probe", "page_size": 50})
            row = {**make_rows("validation", limit=1)[0], "ground_truth": [sent]}
            _, verified = await post(client, f"{url}/verify", {**row, "response": function_calls([sent])})
            return [e["subject"] for e in found["output"]["emails"]], verified["reward"]

    async def run_all():
        return await asyncio.gather(*(rollout(i) for i in range(32)))

    for i, (subjects, reward) in enumerate(asyncio.run(run_all())):
        assert subjects == [f"probe {i}"]  # each session sees its own email only
        assert reward == 1.0


def test_bad_tool_calls_answer_error_text_with_200(url):
    async def run():
        async with new_client() as client:
            await post(client, f"{url}/seed_session", load_example_rows()[0])
            results = [
                await post(client, f"{url}/email_search_emails", data=b'{"query": "budget"'),
                await post(client, f"{url}/email_search_emails", data=b"\xff\xfe"),
                await post(client, f"{url}/email_search_emails", ["budget"]),
                await post(client, f"{url}/email_search_emails", {"sender": "carlos"}),
                await post(client, f"{url}/calendar_search_events", {"page": "2"}),
            ]
            after = await post(client, f"{url}/email_delete_email", {"email_id": "00000057"})
            return results, after

    results, after = asyncio.run(run())
    for status, body in results:
        assert status == 200 and body["output"].startswith("Error executing tool '"), body
    assert "unexpected argument 'sender'" in results[3][1]["output"]
    assert "'page' must be a JSON integer" in results[4][1]["output"]
    assert after == (200, {"output": "Email deleted successfully."})  # the session survives its errors


def test_unknown_tool_and_unseeded_session(url):
    async def run():
        async with new_client() as client:
            unknown = await post(client, f"{url}/email_archive_email", {"email_id": "00000057"})
            unseeded = await post(client, f"{url}/email_search_emails", {"query": "x"})
            return unknown, unseeded

    (status, body), (status2, body2) = asyncio.run(run())
    assert status == 404 and body["error"]["code"] == "unknown_tool"
    assert "email_archive_email" in body["error"]["message"] and "email_forward_email" in body["error"]["message"]
    assert status2 == 400 and "seed_session" in body2["error"]["message"]


def test_verify_ends_the_session(url):
    row = load_example_rows()[0]

    async def run():
        async with new_client() as client:
            await post(client, f"{url}/seed_session", row)
            before = await post(client, f"{url}/email_search_emails", {"query": "carlos"})
            verified = await post(client, f"{url}/verify", {**row, "response": function_calls(row["ground_truth"])})
            after = await post(client, f"{url}/email_search_emails", {"query": "carlos"})
            return before, verified, after

    before, verified, after = asyncio.run(run())
    assert before[0] == 200 and verified == (200, {**verified[1], "reward": 1.0})
    assert after[0] == 400 and after[1]["error"]["code"] == "session_not_seeded"


@pytest.mark.parametrize(("endpoint", "mutate", "field"), [
    ("seed_session", lambda r: r.pop("responses_create_params"), "responses_create_params"),
    ("seed_session", lambda r: r["ground_truth"][0].pop("arguments"), "ground_truth[0].arguments"),
    ("seed_session", lambda r: r.update(ground_truth=[{"name": "x", "arguments": {"a": 1}}]),
     "ground_truth[0].arguments"),
    ("seed_session", lambda r: r.update(category=3), "category"),
    ("verify", lambda r: None, "response"),
    ("verify", lambda r: r.update(response={"output": []}) or r.pop("ground_truth"), "ground_truth"),
    ("verify", lambda r: r.update(response={"output": {}}), "response.output"),
])
def test_malformed_rows_get_422_naming_the_field(url, endpoint, mutate, field):
    row = load_example_rows()[0]
    mutate(row)

    async def run():
        async with new_client() as client:
            return await post(client, f"{url}/{endpoint}", row)

    status, body = asyncio.run(run())
    assert status == 422 and body["error"]["param"] == field, body
    assert field in body["error"]["message"]


def test_aggregate_metrics_by_category(url):
    responses = [{"_ng_task_index": t, "_ng_rollout_index": r, "id": t, "reward": float(t == 0 or r == 0),
                  "category": f"workplace_assistant_{'email' if t == 0 else 'calendar'}"}
                 for t in range(2) for r in range(2)]

    async def run():
        async with new_client() as client:
            return await post(client, f"{url}/aggregate_metrics", {"verify_responses": responses})

    status, body = asyncio.run(run())
    assert status == 200
    metrics = body["agent_metrics"]
    assert metrics["mean/reward"] == 0.75 and "mean/id" not in metrics
    assert metrics["mean/reward/workplace_assistant_email"] == 1.0
    assert metrics["mean/reward/workplace_assistant_calendar"] == 0.5
    assert [g["_ng_task_index"] for g in body["group_level_metrics"]] == [0, 1]


def test_server_on_a_data_dir_of_nemo_gym_csvs(loop, tmp_path):
    data_url = loop.start_app(make_app({"data_dir": str(write_fixture(tmp_path))}))
    row = {**load_example_rows()[0], "ground_truth": [call("email_reply_email", email_id="00000002", body="Noted")]}

    async def run():
        async with new_client() as client:
            await post(client, f"{data_url}/seed_session", row)
            found = await post(client, f"{data_url}/company_directory_find_email_address", {"name": "ana"})
            replied = await post(client, f"{data_url}/email_reply_email", {"email_id": "00000002", "body": "Noted"})
            return found, replied

    found, replied = asyncio.run(run())
    assert found == (200, {"output": ["ana.lima@acme.io"]})
    assert replied == (200, {"output": "Email replied successfully."})
    assert verify_reward(data_url, row, row["ground_truth"]) == 1.0
    assert verify_reward(url=data_url, row=row, calls=[]) == 0.0
    with pytest.raises(ConfigError, match="no project_tasks.csv"):
        broken = {k: v for k, v in CSV_FIXTURE.items() if "project_tasks" not in k}
        make_app({"data_dir": str(write_fixture(tmp_path / "broken", broken))})
