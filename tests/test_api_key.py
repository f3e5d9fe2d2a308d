"""The policy server's API key: read from a flag, a file or $GYMNB_API_KEY, used by every server that needs
it, and never written into a file gymnb produces nor served by gymnb's head server."""

from __future__ import annotations

import json
import urllib.request

import nbformat
import pytest

from gymnb.core.config import API_KEY_ENV, read_api_key
from gymnb.core.errors import ConfigError
from gymnb.gym import start_gym
from gymnb.gym.data import load_rows
from gymnb.policy.server import PolicyServer
from gymnb.validation.runner import execute_notebook, kernel_api_key

KEY = "sk-test-7f3a9c0e5b"


def test_the_key_comes_from_a_flag_a_file_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert read_api_key() is None
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert read_api_key() == "from-env"
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    assert read_api_key(None, str(key_file)) == "from-file"  # a file wins over the environment
    assert read_api_key("from-flag") == "from-flag"
    with pytest.raises(ConfigError, match="not both"):
        read_api_key("from-flag", str(key_file))
    key_file.write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        read_api_key(None, str(key_file))
    with pytest.raises(ConfigError, match="cannot read the API key file"):
        read_api_key(None, str(tmp_path / "missing"))


def test_the_head_server_serves_no_key_and_the_stack_still_uses_it(tiny_model_dir):
    row = load_rows("math_with_judge", "validation", limit=1)[0]
    row["responses_create_params"]["max_output_tokens"] = 4
    with PolicyServer.start(str(tiny_model_dir), model_id="tiny", api_key=KEY) as policy, \
            start_gym(["math_with_judge"], policy_base_url=policy.base_url, policy_model_name="tiny",
                      policy_api_key=KEY) as gym:
        with urllib.request.urlopen(gym.head_url + "/global_config_dict_yaml", timeout=30) as resp:
            served = resp.read().decode()
        assert KEY not in served and "policy_api_key" in served  # the key's name stays, its value is null
        request = urllib.request.Request(gym.server_url("math_with_judge_simple_agent") + "/run",
                                         data=json.dumps(row).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as resp:
            result = json.loads(resp.read())
        assert len(result["response"]["output"][0]["generation_token_ids"]) <= 4  # the policy let it in


@pytest.mark.slow
def test_a_notebook_kernel_gets_the_key_without_it_reaching_the_notebook(tmp_path, monkeypatch):
    """The runner's way: the key in the kernel's environment; the executed notebook holds no trace of it."""
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    notebook = nbformat.v4.new_notebook()
    parameters = nbformat.v4.new_code_cell('api_key = ""  # bearer token')
    parameters.metadata["tags"] = ["parameters"]
    check = nbformat.v4.new_code_cell(
        "import json, os\n"
        "from gymnb.validation.checks.integration import Integration\n"
        f"integration = Integration('http://x', None, 'm', os.environ['{API_KEY_ENV}'])\n"
        f"json.dump({{'key_length': len(os.environ['{API_KEY_ENV}'])}}, open('seen.json', 'w'))\n"
        "integration")
    notebook.cells = [parameters, check]
    notebook.metadata["kernelspec"] = {"name": "python3", "language": "python", "display_name": "Python 3"}
    source, executed = tmp_path / "in.ipynb", tmp_path / "out.ipynb"
    nbformat.write(notebook, str(source))
    with kernel_api_key(KEY):
        error = execute_notebook(source, executed, {"api_key": ""}, cwd=tmp_path, timeout=300)
    assert error is None
    assert json.loads((tmp_path / "seen.json").read_text()) == {"key_length": len(KEY)}
    assert KEY not in executed.read_text()  # neither as a parameter nor in the displayed Integration
