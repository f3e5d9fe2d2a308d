"""workplace_assistant without HTTP: schemas, CSV loading, tool semantics, the reward, the synthetic company, rows.

NeMo Gym's example rows and its real company data (csv_data) are read from the installed nemo-gym wheel
(tests/nemo_gym_data.py); they are never copied into the repository. The example rows are replayed against both
gymnb's synthetic company and NeMo Gym's real one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gymnb.core.errors import ConfigError
from gymnb.gym.workplace.company import STALE_CUTOFF, base_state, generate_company
from gymnb.gym.workplace.data import SPLITS, check_ground_truth, generate_tasks, make_rows
from gymnb.gym.workplace.schemas import TOOL_SCHEMAS
from gymnb.gym.workplace.state import TABLE_FILES, load_state, write_state
from gymnb.gym.workplace.tools import ToolError, call_tool
from gymnb.gym.workplace.verify import compute_reward, diff_tables, replay_calls


def load_example_rows() -> list[dict]:
    from nemo_gym_data import example_file

    return [json.loads(line) for line in example_file("workplace_assistant").read_text().splitlines() if line.strip()]


def user_prompts(rows: list[dict]) -> set[str]:
    return {r["responses_create_params"]["input"][1]["content"] for r in rows}


def as_calls(row: dict) -> list[tuple[str, dict]]:
    return [(c["name"], json.loads(c["arguments"])) for c in row["ground_truth"]]


# --- schemas and rows ------------------------------------------------------------------------------------------

def test_tool_schemas_render_exactly_as_in_nemo_gym_rows():
    for row in load_example_rows():
        assert json.dumps(row["responses_create_params"]["tools"]) == json.dumps(TOOL_SCHEMAS)


def test_generated_rows_have_nemo_gym_shape():
    example = load_example_rows()[0]
    rows = make_rows("validation")
    assert len(rows) == SPLITS["validation"][1] * 5
    for i, row in enumerate(rows):
        assert list(row) == [*example, "agent_ref"]
        assert row["id"] == i
        params = row["responses_create_params"]
        assert set(params) == set(example["responses_create_params"])
        assert params["input"][0] == example["responses_create_params"]["input"][0]  # same system prompt
        assert params["input"][1]["role"] == "user" and params["tools"] == TOOL_SCHEMAS
        assert (params["parallel_tool_calls"], params["temperature"]) == (False, 1.0)
        assert row["environment_name"] == "workplace_assistant"
        assert row["agent_ref"] == {"type": "responses_api_agents", "name": "workplace_assistant_simple_agent"}
        assert all(set(c) == {"name", "arguments"} and isinstance(json.loads(c["arguments"]), dict)
                   for c in row["ground_truth"])
    categories = [r["category"] for r in rows[:5]]  # interleaved: any prefix covers every category
    assert categories == [f"workplace_assistant_{c}" for c in
                          ("email", "calendar", "analytics", "project_management", "customer_relationship_manager")]


def test_rows_are_deterministic_disjoint_and_solvable():
    train, validation = make_rows("train"), make_rows("validation")
    seed, per_category = SPLITS["validation"]
    regenerated = generate_tasks(generate_company(), seed, per_category)  # bypasses every cache
    assert [prompt for _, prompt, *_ in regenerated] == [r["responses_create_params"]["input"][1]["content"]
                                                        for r in validation]
    assert len(user_prompts(train)) == len(train) == 500
    assert not user_prompts(train) & user_prompts(validation)
    base = base_state()
    for row in train + validation:
        assert check_ground_truth(base, as_calls(row)), row["responses_create_params"]["input"][1]
        assert compute_reward(base, row["ground_truth"], row["ground_truth"]) == 1.0
        assert compute_reward(base, [], row["ground_truth"]) == 0.0  # doing nothing never passes
    assert make_rows("train", limit=7) == train[:7]
    with pytest.raises(ValueError, match="unknown workplace_assistant split"):
        make_rows("test")


# --- the example rows against the synthetic company ---------------------------------------------------------------

def _search_ids(state, tool: str, args: dict, key: str, id_key: str) -> list[str]:
    result = call_tool(state, tool, {**args, "page_size": 50})
    return [item[id_key] for item in result[key]]


def test_example_rows_ground_truth_is_the_right_answer_on_the_synthetic_company():
    """Each example row's ground truth takes effect here, and is what the request asks for."""
    state = generate_company()
    rows = {row["id"]: row for row in load_example_rows()}
    for row in rows.values():
        assert check_ground_truth(state, as_calls(row)), row["responses_create_params"]["input"][1]["content"]
    ids = {i: [args.get("email_id") or args.get("event_id") or args.get("customer_id") for _, args in as_calls(r)]
           for i, r in rows.items()}
    # "Reply to carlos's last email about 'Task Update on Develop prototype for report generation'"
    found = _search_ids(state, "email_search_emails",
                        {"query": "carlos Task Update on Develop prototype for report generation"}, "emails", "email_id")
    assert len(found) >= 2 and found[0] == ids[0][0]  # newest first; an older one exists too
    # "change the name of the last event on December 1"
    found = _search_ids(state, "calendar_search_events", {"time_min": "2023-12-01 00:00:00",
                                                          "time_max": "2023-12-01 23:59:59"}, "events", "event_id")
    assert len(found) >= 2 and found[0] == ids[1][0]
    crm = "customer_relationship_manager_search_customers"
    akira_leads = _search_ids(state, crm, {"assigned_to_email": "akira", "product_interest": "Software",
                                           "status": "Lead"}, "customers", "customer_id")
    assert sorted(akira_leads) == sorted(ids[2])
    lena_won = _search_ids(state, crm, {"assigned_to_email": "lena", "product_interest": "Services",
                                        "status": "Won"}, "customers", "customer_id")
    assert sorted(lena_won) == sorted(ids[3])
    stale = _search_ids(state, crm, {"product_interest": "Hardware", "status": "Proposal",
                                     "last_contact_date_max": STALE_CUTOFF}, "customers", "customer_id")
    recent = _search_ids(state, crm, {"product_interest": "Hardware", "status": "Proposal",
                                      "last_contact_date_min": STALE_CUTOFF}, "customers", "customer_id")
    assert sorted(stale) == sorted(ids[4]) and recent  # some proposals are recent and must stay
    assert call_tool(state, "company_directory_find_email_address", {"name": "raj"}) == ["raj.patel@atlas.com"]


def test_example_rows_on_nemo_gym_real_data():
    from nemo_gym_data import workplace_csv_dir

    state = load_state(workplace_csv_dir())
    for row in load_example_rows():
        assert check_ground_truth(state, as_calls(row))
        assert compute_reward(state, row["ground_truth"], row["ground_truth"]) == 1.0


# --- state from NeMo Gym CSV files ----------------------------------------------------------------------------

CSV_FIXTURE = {
    "processed/emails.csv": 'email_id,inbox/outbox,sender/recipient,subject,sent_datetime,body\n'
                            '00000002,inbox,ana.lima@acme.io,Budget,2023-11-02 10:00:00,"Hi,\nnumbers attached."\n'
                            '00000010,outbox,bo.chen@acme.io,Re: Budget,2023-11-03 09:30:00,Thanks\n',
    "processed/calendar_events.csv": "event_id,event_name,participant_email,event_start,duration\n"
                                     "00000001,kickoff,ana.lima@acme.io,2023-12-04 09:00:00,60\n",
    "processed/analytics_data.csv": "date_of_visit,visitor_id,page_views,session_duration_seconds,traffic_source,"
                                    "user_engaged\n2023-11-01,0042,3,12,direct,True\n"
                                    "2023-11-01,0043,1,2,referral,False\n",
    "processed/customer_relationship_manager_data.csv":
        "customer_id,assigned_to_email,customer_name,customer_email,customer_phone,last_contact_date,"
        "product_interest,status,follow_up_by,notes\n"
        "00000007,bo.chen@acme.io,Kim Park,kim@park.io,,2023-11-20,Software,Lead,2023-12-01,\n",
    "processed/project_tasks.csv": "task_id,task_name,assigned_to_email,list_name,due_date,board\n"
                                   "00000003,Fix login,bo.chen@acme.io,Backlog,2023-12-10,Back end\n",
    "raw/email_addresses.csv": "ana.lima@acme.io\nbo.chen@acme.io\n",
}


def write_fixture(root: Path, files: dict[str, str] = CSV_FIXTURE) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_state_loads_from_nemo_gym_csv_layout(tmp_path):
    state = load_state(write_fixture(tmp_path))
    assert state.directory == ("ana.lima@acme.io", "bo.chen@acme.io")
    assert call_tool(state, "email_get_email_information_by_id", {"email_id": "00000002", "field": "body"}) == {
        "body": "Hi,\nnumbers attached."}
    assert state.customers[0]["customer_phone"] is None and state.customers[0]["notes"] is None  # empty cells
    assert [v["user_engaged"] for v in state.analytics] == [True, False]
    assert call_tool(state, "analytics_engaged_users_count", {}) == {"2023-11-01": 1}
    assert call_tool(state, "email_send_email", {"recipient": "Ana.Lima@acme.io", "subject": "s", "body": "b"})
    assert state.emails[-1]["email_id"] == "00000011" and state.emails[-1]["sender/recipient"] == "ana.lima@acme.io"


def test_synthetic_company_round_trips_through_csv(tmp_path):
    company = generate_company()
    loaded = load_state(write_state(company, tmp_path))
    assert not diff_tables(company, loaded)
    assert loaded.analytics == company.analytics and loaded.directory == company.directory
    assert all(len(getattr(company, t)) >= 200 for t in TABLE_FILES)  # "a few hundred rows each"


def test_bad_csv_files_are_named(tmp_path):
    broken = dict(CSV_FIXTURE, **{"processed/project_tasks.csv": "task_id,task_title\n1,x\n"})
    with pytest.raises(ConfigError, match=r"project_tasks.csv.*missing \['task_name'"):
        load_state(write_fixture(tmp_path / "a", broken))
    missing = {k: v for k, v in CSV_FIXTURE.items() if "emails.csv" not in k}
    with pytest.raises(ConfigError, match="no emails.csv"):
        load_state(write_fixture(tmp_path / "b", missing))


# --- tool semantics the reward depends on -----------------------------------------------------------------------

def test_mutating_tools_follow_nemo_gym_semantics():
    state = generate_company().copy()
    carlos_email = "00000057"
    assert call_tool(state, "email_reply_email", {"email_id": carlos_email, "body": "ok"}) == "Email replied successfully."
    reply = state.emails[-1]
    assert (reply["email_id"], reply["inbox/outbox"], reply["sender/recipient"], reply["subject"]) == (
        "00000301", "outbox", "carlos.rivera@atlas.com", "RE: Task Update on Develop prototype for report generation")
    assert call_tool(state, "email_forward_email", {"email_id": carlos_email, "recipient": "raj.patel@atlas.com"})
    assert state.emails[-1]["subject"].startswith("FW: ") and state.emails[-1]["email_id"] == "00000302"
    order = [e["email_id"] for e in state.emails]
    assert call_tool(state, "email_delete_email", {"email_id": order[3]}) == "Email deleted successfully."
    assert [e["email_id"] for e in state.emails] == order[:3] + order[4:]  # deletes keep the others' order
    assert call_tool(state, "email_delete_email", {"email_id": order[3]}) == "Email not found."
    assert call_tool(state, "calendar_delete_event", {"event_id": "252"}) == "Invalid event ID format. Expected 8-digit ID."
    assert call_tool(state, "project_management_create_task", {
        "task_name": "x", "assigned_to_email": "nobody@atlas.com", "list_name": "Backlog", "due_date": "2023-12-01",
        "board": "Design"}).startswith("Assignee email not valid")
    assert call_tool(state, "customer_relationship_manager_update_customer", {
        "customer_id": "00000037", "field": "status", "new_value": "lost"}).startswith("Status not valid")
    assert call_tool(state, "analytics_create_plot", {"time_min": "2023-11-01", "time_max": "2023-11-30",
                                                      "value_to_plot": "total_visits", "plot_type": "bar"}) == (
        "plots/2023-11-01_2023-11-30_total_visits_bar.png")
    page = call_tool(state, "customer_relationship_manager_search_customers", {"status": "Lead", "page": 99})
    assert page["pagination"]["page"] == page["pagination"]["total_pages"]  # out-of-range pages are clamped


def test_calls_that_do_not_fit_raise_tool_error():
    state = generate_company()
    with pytest.raises(ToolError, match="unexpected argument 'sender'"):
        call_tool(state, "email_search_emails", {"sender": "x"})
    with pytest.raises(ToolError, match="'page' must be a JSON integer"):
        call_tool(state, "email_search_emails", {"page": "2"})
    with pytest.raises(ToolError, match="must be a JSON object"):
        call_tool(state, "email_search_emails", ["x"])
    with pytest.raises(ToolError, match="unknown tool"):
        call_tool(state, "email_archive_email", {})
    # A null argument counts as absent, as in NeMo Gym.
    assert call_tool(state, "email_send_email", {"recipient": None, "subject": "s", "body": "b"}) == (
        "Recipient, subject, or body not provided.")


def test_replay_skips_calls_that_cannot_run():
    base = generate_company()
    good = {"name": "email_delete_email", "arguments": json.dumps({"email_id": "00000057"})}
    junk = [{"name": "email_delete_email", "arguments": "{not json"},
            {"name": "no_such_tool", "arguments": "{}"},
            {"name": "email_delete_email", "arguments": json.dumps({"email_id": 57})}]
    assert not diff_tables(replay_calls(base, [*junk, good]), replay_calls(base, [good]))
    assert len(base.emails) == 300  # the pristine company is never touched
