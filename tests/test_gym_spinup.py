"""Config, head server and spin-up: `start_gym` with a tiny model end to end, and `gymnb gym up` as a process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request

import pytest
import yaml
from nemo_gym_data import example_file

from gymnb.core.config import REPO_ROOT
from gymnb.core.errors import ConfigError
from gymnb.gym import start_gym
from gymnb.gym.config import iter_instances, load_gym_config
from gymnb.gym.data import load_rows

POLICY = {"policy_base_url": "http://127.0.0.1:9/v1", "policy_model_name": "m"}
AGENT = "workplace_assistant_simple_agent.responses_api_agents.simple_agent"
POLICY_IMPL = "policy_model.responses_api_models.vllm_model"
MATH_IMPL = "math_with_judge.resources_servers.math_with_judge"


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.load(resp)


def post_json(url: str, body: dict):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as resp:
        return json.load(resp)


def test_configs_merge_with_nemo_gym_instance_names_and_overrides():
    config = load_gym_config(["math_with_judge", "workplace_assistant"], **POLICY,
                             overrides=[f"{AGENT}.max_steps=4", f"{POLICY_IMPL}.base_url=[http://a/v1,http://b/v1]"])
    names = [(i.name, i.server_type, i.implementation) for i in iter_instances(config)]
    assert names[0] == ("policy_model", "responses_api_models", "vllm_model")
    assert {n for n, _, _ in names} == {"policy_model", "math_with_judge", "math_with_judge_simple_agent",
                                        "workplace_assistant", "workplace_assistant_simple_agent"}
    assert config["workplace_assistant_simple_agent"]["responses_api_agents"]["simple_agent"]["max_steps"] == 4
    assert config["math_with_judge_simple_agent"]["responses_api_agents"]["simple_agent"]["resources_server"] == {
        "type": "resources_servers", "name": "math_with_judge"}
    assert config["policy_model"]["responses_api_models"]["vllm_model"]["base_url"] == ["http://a/v1", "http://b/v1"]
    assert config["policy_model"]["responses_api_models"]["vllm_model"]["model"] == "m"  # ${policy_model_name}


@pytest.mark.parametrize("kwargs, message", [
    ({"overrides": [f"{AGENT}.max_stepz=4"]}, f"unknown key '{AGENT}.max_stepz'"),
    ({"overrides": [f"{AGENT}.resources_server.name=nope"]}, "instance 'nope', which is not configured"),
    ({"overrides": ["policy_model.responses_api_models.vllm_model.model=${nowhere}"]}, "nowhere"),
    ({"overrides": ["no_equals_sign"]}, "not of the form key.sub=value"),
    ({"policy_base_url": None}, "policy_base_url is not set"),
    ({"envs": ["chess"]}, "unknown environment 'chess'"),
])
def test_config_errors_name_the_problem(kwargs, message):
    args = {"envs": ["workplace_assistant"], **POLICY, **kwargs}
    envs = args.pop("envs")
    with pytest.raises(ConfigError, match=message.replace("$", r"\$").replace("{", r"\{").replace("[", r"\[")):
        load_gym_config(envs, **args)


def test_an_env_from_a_yaml_file(tmp_path):
    path = tmp_path / "my_math.yaml"
    source = yaml.safe_load((REPO_ROOT / "configs/envs/math_with_judge.yaml").read_text())
    source["math_with_judge_simple_agent"]["responses_api_agents"]["simple_agent"]["max_steps"] = 1
    path.write_text(yaml.safe_dump(source))
    config = load_gym_config([str(path)], **POLICY)
    assert config["math_with_judge_simple_agent"]["responses_api_agents"]["simple_agent"]["max_steps"] == 1


def test_start_gym_runs_math_end_to_end_with_a_tiny_model(tiny_model_dir):
    from gymnb.policy.server import PolicyServer

    real_row = json.loads(example_file("math_with_judge").read_text().splitlines()[0])
    rows = load_rows("math_with_judge", "validation", limit=2) + [real_row]  # a real NeMo Gym row, as prepared
    with PolicyServer.start(str(tiny_model_dir), model_id="tiny") as policy, \
            start_gym(["math_with_judge"], policy_base_url=policy.base_url, policy_model_name="tiny",
                      overrides=[f"{MATH_IMPL}.library_verifier_max_concurrency=1"]) as gym:
        served = yaml.safe_load(get_json(gym.head_url + "/global_config_dict_yaml"))  # a JSON-encoded YAML string
        instances = {i["process_name"]: i for i in get_json(gym.head_url + "/server_instances")}
        for name in ("policy_model", "math_with_judge", "math_with_judge_simple_agent"):
            assert get_json(gym.server_url(name) + "/") == {"status": "ok"}
            assert instances[name]["url"] == gym.server_url(name)
            impl = next(iter(next(iter(served[name].values())).values()))
            assert f"http://{impl['host']}:{impl['port']}" == gym.server_url(name)
        assert served["head_server"]["port"] == int(gym.head_url.rsplit(":", 1)[1])
        for row in rows:
            row["responses_create_params"]["max_output_tokens"] = 8
            result = post_json(gym.server_url("math_with_judge_simple_agent") + "/run", row)
            assert result["reward"] in (0.0, 1.0) and result["expected_answer"] == row["expected_answer"]
            (message,) = result["response"]["output"]
            assert message["type"] == "message" and len(message["generation_token_ids"]) <= 8
            assert result["response"]["incomplete_details"] in (None, {"reason": "max_output_tokens"})


def test_gym_up_serves_until_sigterm():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "gymnb.cli", "gym", "up", "--env", "math_with_judge",
                             "--policy-base-url", "http://127.0.0.1:9/v1", "--policy-model", "m", "--head-port", "0",
                             "math_with_judge_simple_agent.responses_api_agents.simple_agent.max_steps=3"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO_ROOT)
    try:
        head_url = proc.stdout.readline().strip()
        assert head_url.startswith("http://127.0.0.1:"), proc.stderr.read()
        served = yaml.safe_load(get_json(head_url + "/global_config_dict_yaml"))
        assert served["math_with_judge_simple_agent"]["responses_api_agents"]["simple_agent"]["max_steps"] == 3
        assert len(get_json(head_url + "/server_instances")) == 3
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0


def test_gym_up_reports_config_errors():
    proc = subprocess.run([sys.executable, "-m", "gymnb.cli", "gym", "up", "--env", "math_with_judge",
                           "--policy-base-url", "http://127.0.0.1:9/v1", "--policy-model", "m", "--head-port", "0",
                           "math_with_judge.resources_servers.math_with_judge.judge=1"],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=120, check=False)
    assert proc.returncode == 1
    assert "unknown key 'math_with_judge.resources_servers.math_with_judge.judge'" in proc.stderr
