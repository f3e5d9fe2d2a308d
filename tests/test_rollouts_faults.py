"""Collector under server faults: waits out a restart, finds an agent that came back on a new port, retries a
server error once and records its root cause, and `gymnb collect` exits non-zero when any rollout failed."""

from __future__ import annotations

import collections
import json
import socket

import pytest
import yaml
from aiohttp import web

from gymnb.core.http import ServerLoop
from gymnb.rollouts.collect import collect_rollouts_sync, main

CHAINED_500 = ("model server 'policy_model': the policy endpoint answered HTTP 500: internal server error: "
               "IndexError: index out of range in self")


class FaultyAgent:
    """/run by the row's `mode`: ok | down_for:K (503 `upstream_unreachable` for the first K attempts) |
    error (500 relaying a policy server bug, every attempt)."""

    def __init__(self):
        self.attempts = collections.Counter()

    async def run(self, request: web.Request) -> web.Response:
        row = await request.json()
        self.attempts[row["task_id"]] += 1
        mode = row.get("mode", "ok")
        if mode.startswith("down_for:") and self.attempts[row["task_id"]] <= int(mode.split(":")[1]):
            return web.json_response({"error": {"message": "model server unreachable", "code":
                                                "upstream_unreachable"}}, status=502)
        if mode == "error":
            return web.json_response({"error": {"message": f"simple_agent 'a' /v1/responses answered HTTP 502: "
                                                           f"{CHAINED_500}", "code": "upstream_error"}}, status=502)
        return web.json_response({**row, "response": {"output": []}, "reward": 1.0})


class Head:
    """A head server whose agent port is whatever `ports` yields next (the last one sticks)."""

    def __init__(self, ports: list[int]):
        self.ports, self.gets = list(ports), 0

    async def config_yaml(self, request: web.Request) -> web.Response:
        port = self.ports[min(self.gets, len(self.ports) - 1)]
        self.gets += 1
        config = {"agent": {"responses_api_agents": {"simple_agent": {"host": "127.0.0.1", "port": port}}}}
        return web.Response(text=json.dumps(yaml.safe_dump(config)), content_type="application/json")


def free_port() -> int:
    """A port nobody listens on (bound and released: connecting to it is refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def servers():
    loop = ServerLoop("test-faults")
    yield loop
    loop.stop()


def start_stack(servers: ServerLoop, head_ports=None) -> tuple[FaultyAgent, Head, str]:
    agent = FaultyAgent()
    app = web.Application()
    app.router.add_post("/run", agent.run)
    agent_port = int(servers.start_app(app).rsplit(":", 1)[1])
    head = Head([*(head_ports or []), agent_port])
    head_app = web.Application()
    head_app.router.add_get("/global_config_dict_yaml", head.config_yaml)
    return agent, head, servers.start_app(head_app)


def rows(*modes: str) -> list[dict]:
    return [{"responses_create_params": {"input": f"task {i}"}, "task_id": i, "mode": mode}
            for i, mode in enumerate(modes)]


def test_a_restarting_server_is_waited_for_within_the_window(servers):
    agent, _, head_url = start_stack(servers)
    run = collect_rollouts_sync(rows("down_for:6", "ok"), head_url=head_url, backoff=0.001, progress=False)
    assert run.failures == [] and agent.attempts == {0: 7, 1: 1}  # six refusals outlasted, not four
    agent.attempts.clear()
    run = collect_rollouts_sync(rows("down_for:6"), head_url=head_url, backoff=0.001, retry_window=0,
                                progress=False)
    (failure,) = run.failures
    assert failure["attempts"] == 1 and failure["root_cause"] == "model server unreachable"


def test_an_agent_back_on_a_new_port_is_found_through_the_head(servers):
    agent, head, head_url = start_stack(servers, head_ports=[free_port()])
    run = collect_rollouts_sync(rows("ok", "ok", "ok"), head_url=head_url, concurrency=3, backoff=0.001,
                                progress=False)
    assert run.failures == [] and sorted(agent.attempts.values()) == [1, 1, 1]
    assert head.gets >= 2  # the first lookup listed the dead port; a retry looked again


def test_a_server_error_is_retried_once_and_its_root_cause_recorded(servers, tmp_path):
    agent, _, head_url = start_stack(servers)
    run = collect_rollouts_sync(rows("error", "ok"), head_url=head_url, backoff=0.001,
                                out_path=tmp_path / "r.jsonl", progress=False)
    (failure,) = run.failures
    assert agent.attempts[0] == 2 and failure["attempts"] == 2 and failure["status"] == 502
    assert failure["root_cause"] == "internal server error: IndexError: index out of range in self"
    assert CHAINED_500 in failure["message"]  # the whole chain, not a truncated exception repr
    on_disk = json.loads((tmp_path / "r.failures.jsonl").read_text())
    assert on_disk["root_cause"] == failure["root_cause"]


def test_collect_exits_non_zero_when_any_rollout_failed(servers, tmp_path, capsys):
    _, _, head_url = start_stack(servers)
    rows_path, out = tmp_path / "rows.jsonl", tmp_path / "out.jsonl"
    rows_path.write_text("".join(json.dumps(r) + "\n" for r in rows("ok", "error", "ok")))
    code = main(["--gym", head_url, "--input", str(rows_path), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1
    assert f"1 of 3 rollouts failed (see {out.with_suffix('.failures.jsonl')})" in err
