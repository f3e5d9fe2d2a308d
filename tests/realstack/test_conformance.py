"""The verdict matrix on the real stack, and gymnb's twins against the real servers on NeMo Gym's own rows.

| stack (behind real NeMo Gym)         | 01   | 03   | 04                      | 05   |
| gymnb serve (0.2.0 and 0.4.0)        | pass | pass | pass                    | pass |
| gymnb serve --no-splice              | pass | pass | fail, kind named        | pass |
| plain vLLM, float32                  | pass | pass | fail, the server's side | pass |
| logprobs tokens as text              | fail | fail | -                       | -    |
| no token fields at all               | fail | fail | fail (recorded)         | fail |
"""

from __future__ import annotations

import json
import math

import pytest
from conftest import run_validate, statuses
from nemo_gym_rows import NUM_WORKPLACE_ROWS, read_rows, vllm_tiny_model, workplace_rows, write_rows

from gymnb.core.models import load_model
from gymnb.realstack import NemoGymStack, VLLMServer, collect_rollouts_with_nemo_gym
from gymnb.realstack.process import free_port
from gymnb.tokens.continuity import check_continuity, process_rollout_for_training

PASS_ALL = {"http_endpoint": "pass", "token_roundtrip": "pass", "rollout_collection": "pass",
            "token_continuity": "pass", "gradient_flow": "pass"}


@pytest.fixture(scope="module")
def rows_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rows")
    return {"math_with_judge": write_rows(read_rows("0.4.0", "math_with_judge"), folder / "math.jsonl"),
            "workplace_assistant": write_rows(workplace_rows("0.4.0"), folder / "workplace.jsonl")}


@pytest.fixture(params=["0.2.0", "0.4.0"])
def stack(request):
    return request.getfixturevalue(f"stack{request.param.replace('.', '')[:3]}")


@pytest.mark.parametrize("env", ["math_with_judge", "workplace_assistant"])
def test_gymnb_serve_passes_every_layer_behind_real_nemo_gym(stack, env, policy, policy_dir, rows_files, tmp_path):
    summary = run_validate(stack.head_url, tmp_path / "run", env=env, model_dir=policy_dir,
                           rows_path=rows_files[env])
    layers = summary["layers"]
    assert statuses(summary) == PASS_ALL, {k: v["reason"] for k, v in layers.items() if v["status"] != "pass"}
    assert summary["exit_code"] == 0
    assert layers["http_endpoint"]["figures"]["token_id_source"] == "message"
    assert layers["rollout_collection"]["figures"]["num_rollouts"] == len(rows_files[env].read_text().splitlines())
    assert layers["gradient_flow"]["figures"]["token_mult_prob_error"] < 1.001


def trainer_error(rollouts: list[dict], model) -> float:
    """token_mult_prob_error of the rollouts' own ids and log-probs, recomputed by a trainer: an independent
    check that the ids NeMo Gym recorded are the ones the server sampled (a mangled id scores differently)."""
    from gymnb.validation.checks.gradients import recompute_logprobs, rollout_temperature

    diffs = []
    for rollout in rollouts:
        processed = process_rollout_for_training(rollout, model.tokenizer)
        logprobs, mask = recompute_logprobs(model.model, processed, rollout_temperature(rollout))
        diffs += (processed["generation_logprobs"][None] - logprobs.detach())[mask].tolist()
    return sum(math.exp(abs(d)) for d in diffs) / len(diffs)


def ng_collect(stack, rows_file, env: str, out) -> list[dict]:
    agent = f"{env}_simple_agent"
    collect_rollouts_with_nemo_gym(stack, rows_file, out, agent=agent,
                                   responses_create_params={"temperature": 0.0, "max_output_tokens": 48})
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_ng_collect_rollouts_through_gymnb_serve_keeps_the_served_ids(stack, policy, policy_dir, rows_files,
                                                                      tmp_path):
    model = load_model(str(policy_dir))
    math_rollouts = ng_collect(stack, rows_files["math_with_judge"], "math_with_judge", tmp_path / "math.jsonl")
    work_rollouts = ng_collect(stack, rows_files["workplace_assistant"], "workplace_assistant", tmp_path / "wp.jsonl")
    assert len(math_rollouts) == 2 and len(work_rollouts) == NUM_WORKPLACE_ROWS  # every row came back
    assert all(r["reward"] in (0.0, 1.0) for r in math_rollouts + work_rollouts)
    for rollout in math_rollouts + work_rollouts:
        verdict = check_continuity(rollout, model.tokenizer)
        assert verdict.ok, verdict.describe()
        text = "".join(part.get("text", "") for item in rollout["response"]["output"] if item["type"] == "message"
                       for part in item["content"])
        generated = model.tokenizer.decode(rollout["response"]["output"][-1]["generation_token_ids"],
                                           skip_special_tokens=True)
        assert text.strip() in generated  # the last call's ids decode to the text NeMo Gym recorded
    assert trainer_error(math_rollouts + work_rollouts, model) < 1.0001


def test_gymnb_twin_gives_the_real_servers_rewards_shapes_and_ids(stack040, policy, policy_dir, rows_files,
                                                                  tmp_path):
    """The same rows, policy and greedy decoding through real NeMo Gym and through gymnb's environments (fed
    NeMo Gym's own workplace CSV data): the same rewards, output item types and token ids, item for item."""
    from gymnb.gym import start_gym
    from gymnb.realstack.nemo_gym import site_packages
    from gymnb.rollouts.collect import collect_rollouts_sync

    data_dir = site_packages("0.4.0") / "resources_servers" / "workplace_assistant" / "csv_data"
    overrides = [f"workplace_assistant.resources_servers.workplace_assistant.data_dir={data_dir}"]
    for env, rows_file in rows_files.items():
        real = ng_collect(stack040, rows_file, env, tmp_path / f"real-{env}.jsonl")
        rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
        with start_gym([env], policy_base_url=policy.base_url, policy_model_name="tiny",
                       overrides=overrides if env == "workplace_assistant" else ()) as gym:
            twin = collect_rollouts_sync(rows, head_url=gym.head_url, agent=f"{env}_simple_agent", progress=False,
                                         overrides={"temperature": 0.0, "max_output_tokens": 48}).results
        assert [r["reward"] for r in twin] == [r["reward"] for r in real], env
        for a, b in zip(twin, real, strict=True):
            assert [i["type"] for i in a["response"]["output"]] == [i["type"] for i in b["response"]["output"]]
            ids = [(i.get("prompt_token_ids"), i.get("generation_token_ids")) for i in a["response"]["output"]]
            assert ids == [(i.get("prompt_token_ids"), i.get("generation_token_ids")) for i in b["response"]["output"]]


def validate_behind(version: str, policy_base_url: str, model_id: str, policy_dir, rows_files, out) -> dict:
    with NemoGymStack.start(version, ["math_with_judge"], policy_base_url=policy_base_url,
                            policy_model_name=model_id) as gym:
        return run_validate(gym.head_url, out, env="math_with_judge", model_dir=policy_dir,
                            rows_path=rows_files["math_with_judge"])


@pytest.mark.parametrize("fault", ["no-splice", "token-text", "no-token-fields"])
def test_faulty_servers_get_the_verdict_they_deserve(fault, policy_dir, rows_files, tmp_path):
    from gymnb.policy.server import PolicyServer

    with PolicyServer.start(str(policy_dir), model_id="tiny", port=free_port(), threads=1,
                            fault=fault) as server:
        summary = validate_behind("0.4.0", server.base_url, "tiny", policy_dir, rows_files, tmp_path / "run")
    layers, verdicts = summary["layers"], statuses(summary)
    assert summary["exit_code"] == 1
    if fault == "no-splice":
        assert verdicts == {**PASS_ALL, "token_continuity": "fail"}, verdicts
        assert "BPE merge" in layers["token_continuity"]["reason"]
    elif fault == "token-text":
        assert verdicts["http_endpoint"] == verdicts["rollout_collection"] == "fail", verdicts
        assert "logprobs.content[0].token" in layers["http_endpoint"]["reason"]
    else:
        assert {k: verdicts[k] for k in ("http_endpoint", "rollout_collection", "token_continuity",
                                         "gradient_flow")} == dict.fromkeys(
            ("http_endpoint", "rollout_collection", "token_continuity", "gradient_flow"), "fail"), verdicts
        assert "no token ids in any shape" in json.dumps(layers["http_endpoint"]["checks"])
        assert "answered with token ids" in json.dumps(layers["token_continuity"]["checks"])  # recorded, no crash


def test_plain_vllm_is_judged_for_the_right_reason(rows_files, tmp_path):
    model_dir = vllm_tiny_model()
    # The tool parser as NeMo Gym users run vLLM for tool calling (without it vLLM refuses requests with tools).
    with VLLMServer.start(model_dir, served_model_name="tiny", dtype="float32",
                          extra_args=["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]) as vllm:
        summary = validate_behind("0.4.0", vllm.base_url, "tiny", model_dir, rows_files, tmp_path / "run")
    layers, verdicts = summary["layers"], statuses(summary)
    assert verdicts == {**PASS_ALL, "token_continuity": "fail"}, {k: v["reason"] for k, v in layers.items()}
    assert layers["http_endpoint"]["figures"]["token_id_source"] == "return_token_ids"
    continuity = json.dumps(layers["token_continuity"]["checks"])
    assert "probe splice_bpe" in continuity and "server" in layers["token_continuity"]["reason"].lower()
    error = layers["gradient_flow"]["figures"]["token_mult_prob_error"]
    print(f"token_mult_prob_error, vLLM float32 vs gymnb's float32 trainer: {error:.7f}")
    assert error < 1.001  # greedy rows are scored at T=1, where vLLM's default raw log-probs are the sampler's
