"""Rollouts from the real embedded stack: policy server (scripted tiny model) -> model server -> simple_agent ->
workplace_assistant, all over loopback HTTP. Multi-turn tool-calling rollouts must be continuous; naive
re-tokenization of the same rollouts must show the drift the splice avoids; a flaky agent costs retries, not
rows; a `gymnb collect` killed mid-run resumes to every rollout exactly once.
The scripted model is trained once per machine (cached under ~/.cache/gymnb/tiny).
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time

import aiohttp
import pytest
import yaml
from aiohttp import web
from scripted_workplace import scripted_workplace_model, workplace_rows

from gymnb.core.http import ServerLoop
from gymnb.core.models import load_tokenizer
from gymnb.rollouts.collect import collect_rollouts_sync, read_results
from gymnb.tokens.continuity import (
    audit_loss_mask,
    check_rollouts,
    extract_trainable_turns,
    process_rollout_for_training,
)
from gymnb.tokens.drift import audit_drift

OVERRIDES = {"temperature": 0.0, "max_output_tokens": 64}


@pytest.fixture(scope="module")
def rows():
    return workplace_rows()


@pytest.fixture(scope="module")
def scripted_dir(rows):
    return scripted_workplace_model(rows)


@pytest.fixture(scope="module")
def stack(scripted_dir):
    from gymnb.gym import start_gym
    from gymnb.policy.server import PolicyServer

    with PolicyServer.start(str(scripted_dir), model_id="scripted", threads=1) as server, \
            start_gym(["workplace_assistant"], policy_base_url=server.base_url,
                      policy_model_name=server.model_id) as gym:
        yield gym


@pytest.mark.slow
def test_multi_turn_rollouts_are_continuous_and_naive_retokenization_would_drift(stack, rows, scripted_dir):
    run = collect_rollouts_sync(rows, head_url=stack.head_url, num_repeats=3, concurrency=3, overrides=OVERRIDES,
                                progress=False)
    assert run.failures == []
    assert [r["reward"] for r in run.results] == [1.0] * 3  # the scripted calls are the ground truth
    assert [len(extract_trainable_turns(r)) for r in run.results] == [3, 3, 3]
    tokenizer = load_tokenizer(str(scripted_dir))
    summary = check_rollouts(run.results, tokenizer)
    assert summary.ok and summary.num_multi_turn == 3, [b.describe() for b in summary.broken]
    for rollout in run.results:
        processed = process_rollout_for_training(rollout, tokenizer)
        assert audit_loss_mask(processed, rollout)["ok"]
        assert [m["role"] for m in processed["message_log"]][:3] == ["user", "assistant", "tool"]
    drift = audit_drift(run.results, tokenizer).to_dict()
    # the compact tool call re-renders differently; the other two calls round-trip
    assert drift["call_kinds"] == {"tool_call_rerender": 3} and drift["num_calls"] == 9
    assert drift["rollout_kinds"] == {"tool_call_rerender": 3} and drift["off_policy_tokens"] > 0


class FlakyProxy:
    """Stands in front of the real agent: each rollout's first /run gets a 503, its second a dropped
    connection; the third reaches the agent. Rollouts are told apart by their seed."""

    def __init__(self, agent_url: str):
        self.agent_url = agent_url
        self.attempts = collections.Counter()

    async def run(self, request: web.Request) -> web.Response:
        body = await request.read()
        seed = json.loads(body)["responses_create_params"]["metadata"]["extra_body"]
        self.attempts[seed] += 1
        if self.attempts[seed] == 1:
            return web.json_response({"error": {"message": "environment restarting"}}, status=503)
        if self.attempts[seed] == 2:
            request.transport.close()
            return web.Response()
        async with aiohttp.ClientSession() as http, http.post(self.agent_url + "/run", data=body,
                                                              headers={"Content-Type": "application/json"}) as r:
            return web.Response(body=await r.read(), status=r.status, content_type="application/json")


@pytest.mark.slow
def test_flaky_environment_costs_retries_not_rows(stack, rows, tmp_path):
    loop = ServerLoop("flaky-proxy")
    try:
        proxy = FlakyProxy(stack.server_url("workplace_assistant_simple_agent"))
        app = web.Application()
        app.router.add_post("/run", proxy.run)
        port = int(loop.start_app(app).rsplit(":", 1)[1])
        config = json.loads(json.dumps(stack.config))
        config["workplace_assistant_simple_agent"]["responses_api_agents"]["simple_agent"]["port"] = port

        async def config_yaml(request):
            return web.Response(text=json.dumps(yaml.safe_dump(config)), content_type="application/json")

        head = web.Application()
        head.router.add_get("/global_config_dict_yaml", config_yaml)
        head_url = loop.start_app(head)
        run = collect_rollouts_sync(rows, head_url=head_url, num_repeats=4, concurrency=4, overrides=OVERRIDES,
                                    seed=7, backoff=0.01, out_path=tmp_path / "r.jsonl", progress=False)
    finally:
        loop.stop()
    assert run.failures == [] and [r["reward"] for r in run.results] == [1.0] * 4
    assert sorted(proxy.attempts.values()) == [3, 3, 3, 3]
    assert len(read_results(tmp_path / "r.jsonl")) == 4


@pytest.mark.slow
def test_killed_collect_resumes_with_every_rollout_exactly_once(scripted_dir, rows, tmp_path):
    rows_path, out = tmp_path / "rows.jsonl", tmp_path / "out.jsonl"
    rows_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    num_repeats = 16
    cmd = [sys.executable, "-m", "gymnb.cli", "collect", "--env", "workplace_assistant", "--input", str(rows_path),
           "--model", str(scripted_dir), "--num-repeats", str(num_repeats), "--concurrency", "1", "--out", str(out),
           "--no-progress", *[f"responses_create_params.{k}={v}" for k, v in OVERRIDES.items()]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while (not out.exists() or len(out.read_bytes().splitlines()) < 3) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)  # no chance to clean up: only flushed lines survive
    finally:
        proc.wait(timeout=30)
    before = len(read_results(out))
    assert 3 <= before < num_repeats, "the run was not interrupted mid-way"
    done = subprocess.run(cmd + ["--resume"], check=False, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = read_results(out)
    keys = [(r["_ng_task_index"], r["_ng_rollout_index"]) for r in results]
    assert sorted(keys) == [(0, r) for r in range(num_repeats)]  # each exactly once
    assert all(r["reward"] == 1.0 for r in results)
    metrics = json.loads(out.with_suffix(".metrics.json").read_text())
    assert metrics["resumed"] == before and metrics["num_rollouts"] == num_repeats


@pytest.mark.slow
def test_per_rollout_seeds_reach_the_sampler(tiny_model_dir):
    """A random tiny model at temperature 1 (far from the scripted model's peaked outputs): the same seed gives
    the same tokens run to run, another seed other tokens, and the repeats of one row differ from each other."""
    from gymnb.gym import start_gym
    from gymnb.gym.data import load_rows
    from gymnb.policy.server import PolicyServer

    rows = load_rows("math_with_judge", "validation", 1)
    with PolicyServer.start(str(tiny_model_dir), model_id="tiny", threads=1) as server, \
            start_gym(["math_with_judge"], policy_base_url=server.base_url, policy_model_name="tiny") as gym:
        def sample(seed):
            run = collect_rollouts_sync(rows, head_url=gym.head_url, num_repeats=2, concurrency=1, seed=seed,
                                        overrides={"temperature": 1.0, "max_output_tokens": 12}, progress=False)
            return [extract_trainable_turns(r)[0]["generation_token_ids"] for r in run.results]

        first = sample(11)
        assert first == sample(11)
        assert first != sample(12)
        assert first[0] != first[1]  # rollout i gets seed + i
