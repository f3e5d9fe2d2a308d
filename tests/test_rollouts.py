"""Rollout collection against small real aiohttp servers (a head server and an agent written for the test):
aabbcc expansion, routing through /global_config_dict_yaml, retries of transient failures only, durable JSONL
with resume, failures with their error class, metrics."""

from __future__ import annotations

import asyncio
import collections
import json

import pytest
import yaml
from aiohttp import web

from gymnb.core.errors import ConfigError, EnvironmentServerError
from gymnb.core.http import ServerLoop
from gymnb.rollouts.collect import collect_rollouts_sync, expand_rows, main, read_results
from gymnb.rollouts.metrics import compute_metrics, pass_at_k


class ScriptedAgent:
    """An agent whose rows say how to behave: `mode` ok | flaky (503 once per rollout) | drop (connection
    dropped once per rollout) | bad (422) | slow (sleeps past the client's timeout)."""

    def __init__(self):
        self.attempts = collections.Counter()  # (task id, seed) -> /run calls
        self.release = asyncio.Event()  # set at teardown: slow requests then finish instead of being cut off

    async def run(self, request: web.Request) -> web.Response:
        row = await request.json()
        extra_body = json.loads(row["responses_create_params"].get("metadata", {}).get("extra_body", "{}"))
        key = (row["task_id"], str(extra_body.get("seed")))
        self.attempts[key] += 1
        first = self.attempts[key] == 1
        mode = row.get("mode", "ok")
        if mode == "bad":
            return web.json_response({"error": {"message": "field 'question' is missing", "type":
                                                "invalid_request_error", "param": "question", "code": None}},
                                     status=422)
        if mode == "flaky" and first:
            return web.json_response({"error": {"message": "resources server restarting"}}, status=503)
        if mode == "drop" and first:
            request.transport.close()  # the client sees the connection die mid-request
            return web.Response()
        if mode == "slow":
            await self.release.wait()
        return web.json_response({**row, "response": {"output": []}, "reward": row["reward"]})


@pytest.fixture()
def gym():
    """A head server listing one agent `test_agent`, both on free loopback ports."""
    servers = ServerLoop("test-gym")
    agent = ScriptedAgent()
    app = web.Application()
    app.router.add_post("/run", agent.run)
    agent_url = servers.start_app(app)
    port = int(agent_url.rsplit(":", 1)[1])
    config = {"test_agent": {"responses_api_agents": {"simple_agent": {"host": "127.0.0.1", "port": port}}},
              "policy_model": {"responses_api_models": {"vllm_model": {"host": "127.0.0.1", "port": 1}}}}

    async def config_yaml(request):
        return web.Response(text=json.dumps(yaml.safe_dump(config)), content_type="application/json")

    head = web.Application()
    head.router.add_get("/global_config_dict_yaml", config_yaml)
    agent.head_url = servers.start_app(head)
    yield agent
    servers.run(set_event(agent.release))
    servers.stop()


async def set_event(event: asyncio.Event) -> None:
    event.set()


def make_rows(modes_rewards):
    return [{"responses_create_params": {"input": f"task {i}"}, "agent_ref": {"type": "responses_api_agents",
             "name": "test_agent"}, "task_id": i, "mode": mode, "reward": reward}
            for i, (mode, reward) in enumerate(modes_rewards)]


def keys(records):
    return [(r["_ng_task_index"], r["_ng_rollout_index"]) for r in records]


def test_expand_rows_is_aabbcc_with_overrides_and_seeds():
    rows = make_rows([("ok", 1.0), ("ok", 0.0)])
    rows[0]["responses_create_params"]["temperature"] = 0.2
    expanded = expand_rows(rows, 3, overrides={"temperature": 1.0, "max_output_tokens": 8}, seed=100)
    assert keys(expanded) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert all(r["responses_create_params"]["temperature"] == 1.0 for r in expanded)
    assert expanded[4]["responses_create_params"]["input"] == "task 1"
    seeds = [json.loads(r["responses_create_params"]["metadata"]["extra_body"])["seed"] for r in expanded]
    assert seeds == [100 + i for i in range(6)]
    assert "temperature" not in rows[1]["responses_create_params"]  # the caller's rows are not mutated
    with pytest.raises(ConfigError, match="num_repeats"):
        expand_rows(rows, 0)


def test_transient_failures_cost_retries_not_rows(gym, tmp_path):
    rows = make_rows([("ok", 1.0), ("flaky", 1.0), ("drop", 0.0), ("bad", 1.0), ("slow", 1.0)])
    out = tmp_path / "r.jsonl"
    run = collect_rollouts_sync(rows, head_url=gym.head_url, num_repeats=2, concurrency=4, out_path=out,
                                seed=0, timeout=0.5, backoff=0.01, progress=False)
    assert keys(run.results) == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert sorted(keys(read_results(out))) == keys(run.results)  # every success on disk, exactly once
    attempts = {task: [gym.attempts[(task, str(task * 2 + r))] for r in range(2)] for task in range(5)}
    assert attempts[1] == [2, 2] and attempts[2] == [2, 2]  # 503 and a dropped connection: retried
    assert attempts[3] == [1, 1] and attempts[4] == [1, 1]  # 4xx and timeout: not retried
    failures = [json.loads(line) for line in (tmp_path / "r.failures.jsonl").read_text().splitlines()]
    assert len(failures) == 4 and {(f["_ng_task_index"], f["error_class"], f["attempts"]) for f in failures} == {
        (3, "http_4xx", 1), (4, "timeout", 1)}
    assert next(f for f in failures if f["error_class"] == "http_4xx")["status"] == 422
    assert "field 'question' is missing" in next(f for f in failures if f["status"] == 422)["message"]
    metrics = json.loads((tmp_path / "r.metrics.json").read_text())
    assert metrics["num_failures"] == 4 and metrics["num_rollouts"] == 6
    assert metrics["mean_reward"] == pytest.approx(2 / 3)


def test_resume_after_a_kill_runs_only_what_is_missing(gym, tmp_path):
    rows = make_rows([("ok", 1.0), ("ok", 0.0), ("ok", 1.0)])
    out = tmp_path / "r.jsonl"
    collect_rollouts_sync(rows, head_url=gym.head_url, num_repeats=2, concurrency=1, out_path=out, seed=0,
                          progress=False)
    lines = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:3]) + lines[3][:-1])  # killed before the 4th result's newline was written
    gym.attempts.clear()
    run = collect_rollouts_sync(rows, head_url=gym.head_url, num_repeats=2, concurrency=2, out_path=out, seed=0,
                                resume=True, progress=False)
    on_disk = read_results(out)
    assert sorted(keys(on_disk)) == [(t, r) for t in range(3) for r in range(2)]  # each exactly once
    assert sum(gym.attempts.values()) == 3  # only the torn one and the two never started
    assert keys(run.results) == sorted(keys(on_disk)) and run.metrics["resumed"] == 3


def test_resume_refuses_a_file_from_other_rows(gym, tmp_path):
    out = tmp_path / "r.jsonl"
    collect_rollouts_sync(make_rows([("ok", 1.0)]), head_url=gym.head_url, out_path=out, progress=False)
    other = make_rows([("ok", 1.0)])
    other[0]["responses_create_params"]["input"] = "another prompt"
    with pytest.raises(ConfigError, match="the rows changed"):
        collect_rollouts_sync(other, head_url=gym.head_url, out_path=out, resume=True, progress=False)
    out.write_text("oops\n" + out.read_text())
    with pytest.raises(ConfigError, match="line 1 is not JSON"):
        collect_rollouts_sync(make_rows([("ok", 1.0)]), head_url=gym.head_url, out_path=out, resume=True,
                              progress=False)


def test_unknown_agent_and_unreachable_head_are_clear_errors(gym):
    rows = make_rows([("ok", 1.0)])
    rows[0]["agent_ref"]["name"] = "math_agent"
    with pytest.raises(ConfigError, match=r"asks for agent 'math_agent', but the head server has \['test_agent'\]"):
        collect_rollouts_sync(rows, head_url=gym.head_url, progress=False)
    with pytest.raises(EnvironmentServerError, match="gymnb gym up"):
        collect_rollouts_sync(make_rows([("ok", 1.0)]), head_url="http://127.0.0.1:9", progress=False)


def test_pass_at_k_matches_the_combinatorial_definition():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2)
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 1, 4) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 4)


def test_metrics_over_tasks_with_intervals():
    rewards = {0: [1, 0, 0, 0], 1: [1, 1, 0, 0], 2: [0, 1, 0, 1], 3: [1, 1, 1, 0]}
    results = [{"_ng_task_index": t, "_ng_rollout_index": i, "reward": float(r)}
               for t, rs in rewards.items() for i, r in enumerate(rs)]
    m = compute_metrics(results, [{"_ng_task_index": 4}])
    assert m["num_tasks"] == 4 and m["num_rollouts"] == 16 and m["failure_rate"] == pytest.approx(1 / 17)
    assert m["mean_reward"] == pytest.approx(0.5) and m["avg@4"] == pytest.approx(0.5)
    assert m["pass@1"] == pytest.approx(0.5)
    assert m["pass@2"] == pytest.approx((0.5 + 5 / 6 + 5 / 6 + 1) / 4)  # 1 - C(4-c, 2) / C(4, 2) per task
    assert m["pass@4"] == pytest.approx(1.0)
    sd = (2 * 0.25 ** 2 / 3) ** 0.5  # task means 0.25, 0.5, 0.5, 0.75
    half = 1.959964 * sd / 4 ** 0.5
    assert m["avg@4_ci95"] == pytest.approx([0.5 - half, 0.5 + half], abs=1e-6)
    assert compute_metrics(results[:4])["mean_reward_ci95"] is None  # one task: no spread to estimate
    lopsided = compute_metrics([{"_ng_task_index": t, "reward": float(t == 0)} for t in range(4)])
    assert lopsided["pass@1_ci95"][0] == 0.0 and lopsided["mean_reward_ci95"][0] == 0.0  # clipped, not < 0


def test_collect_cli_against_a_running_head_server(gym, tmp_path, capsys):
    rows_path = tmp_path / "rows.jsonl"
    rows_path.write_text("".join(json.dumps(r) + "\n" for r in make_rows([("ok", 1.0), ("ok", 0.0)])))
    out = tmp_path / "out.jsonl"
    argv = ["--gym", gym.head_url, "--input", str(rows_path), "--num-repeats", "2", "--out", str(out),
            "--no-progress", "responses_create_params.temperature=0.7"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "4 rollouts over 2 tasks, 0 failed" in printed and "mean reward 0.500" in printed
    results = read_results(out)
    assert {r["responses_create_params"]["temperature"] for r in results} == {0.7}
    with pytest.raises(ConfigError, match="--resume"):
        main(argv)
    with pytest.raises(ConfigError, match="configures the embedded stack"):
        main(argv + ["--overwrite", "math_with_judge.x=1"])
    assert main(argv + ["--resume"]) == 0 and len(read_results(out)) == 4
