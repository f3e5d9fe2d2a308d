"""Real NeMo Gym, started and driven with its own CLI: `ng_run` for the servers, `ng_collect_rollouts` for rollouts.

    with NemoGymStack.start("0.4.0", ["math_with_judge"], policy_base_url="http://127.0.0.1:8000/v1",
                            policy_model_name="smollm2-135m") as gym:
        gym.head_url                                      # http://127.0.0.1:PORT, what `gymnb validate --gym` takes
        collect_rollouts_with_nemo_gym(gym, example_rows(gym.version, "math_with_judge"), out, agent=...)

Configs are NeMo Gym's own, from the installed wheel: each environment's `configs/<env>.yaml` (resources server
plus its simple agent) and `responses_api_models/vllm_model/configs/vllm_model_for_training.yaml` (the policy,
token id information on). Facts that shape the command line:
- ng_run builds a uv venv per server folder; `uv_venv_dir` puts them in gymnb's cache and
  `skip_venv_if_present` reuses them, so only the first start pays for the installs (about 2 minutes).
- uv must find NeMo Gym's own interpreter (`python_version` is pinned to it) on PATH and must never try to
  download one (`UV_PYTHON_DOWNLOADS=never`: there is no network for that).
- `+head_server.port` needs `+head_server.host` beside it; math_with_judge's LLM judge stays off.
- The servers inherit ng_run's process group; stopping ng_run's group stops them all.
- The 0.2.0 wheel's CLI imports a module it does not ship; install_nemo_gym.sh puts a stub on PYTHONPATH.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Self

from gymnb.core.client import request_json
from gymnb.core.errors import ConfigError, EnvironmentServerError
from gymnb.core.wire import parse_head_config
from gymnb.realstack.process import (
    Managed,
    Subprocess,
    free_port,
    installed_venv,
    realstack_dir,
    wait_for_http,
)

NEMO_GYM_VERSIONS = ("0.2.0", "0.4.0")
ENV_CONFIGS = {"math_with_judge": "resources_servers/math_with_judge/configs/math_with_judge.yaml",
               "workplace_assistant": "resources_servers/workplace_assistant/configs/workplace_assistant.yaml"}
POLICY_CONFIG = "responses_api_models/vllm_model/configs/vllm_model_for_training.yaml"
ENV_AGENTS = {"math_with_judge": "math_with_judge_simple_agent",
              "workplace_assistant": "workplace_assistant_simple_agent"}
SPINUP_TIMEOUT = 900.0  # the first start installs every server's venv


def nemo_gym_venv(version: str) -> Path:
    return installed_venv(f"nemo-gym-{version}", f"scripts/realstack/install_nemo_gym.sh {version}")


def site_packages(version: str) -> Path:
    found = sorted((nemo_gym_venv(version) / "lib").glob("python3.*/site-packages"))
    if not found:
        raise ConfigError(f"no site-packages in {nemo_gym_venv(version)}: reinstall with `make real-stack`")
    return found[0]


def example_rows(version: str, env: str) -> Path:
    """NeMo Gym's own example rows for `env`, as the installed wheel ships them (no agent_ref)."""
    return site_packages(version) / "resources_servers" / env / "data" / "example.jsonl"


def nemo_gym_env(version: str) -> dict:
    """ng_run's environment: its venv's bin and interpreter first on PATH, no interpreter downloads."""
    venv = nemo_gym_venv(version)
    interpreter_dir = (venv / "bin" / "python").resolve().parent
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # Ray (NeMo Gym's process manager) binds its cluster to the machine's outward interface unless told it is
    # a single-machine cluster; this keeps every NeMo Gym socket on loopback.
    env.update(PATH=f"{venv / 'bin'}:{interpreter_dir}:{env.get('PATH', '')}", UV_PYTHON_DOWNLOADS="never",
               HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    if (venv / "gymnb-shims").is_dir():  # a module the wheel imports but does not ship (install_nemo_gym.sh)
        env["PYTHONPATH"] = str(venv / "gymnb-shims")
    return env


class NemoGymStack(Managed):
    """`ng_run` of one NeMo Gym release with `envs` and the policy model server pointed at a policy endpoint."""

    def __init__(self, version: str, process: Subprocess, head_url: str, workdir: Path):
        self.version, self.process, self.head_url, self.workdir = version, process, head_url, workdir

    @classmethod
    def start(cls, version: str, envs: list[str], *, policy_base_url: str, policy_model_name: str,
              policy_api_key: str = "none", workdir: Path | None = None, overrides: list[str] = ()) -> Self:
        unknown = [env for env in envs if env not in ENV_CONFIGS]
        if unknown:
            raise ConfigError(f"no NeMo Gym config known for {unknown}; choose from {list(ENV_CONFIGS)}")
        packages = site_packages(version)
        configs = ",".join(str(packages / path) for path in [*(ENV_CONFIGS[e] for e in envs), POLICY_CONFIG])
        port = free_port()
        workdir = Path(workdir or realstack_dir() / "runs" / f"ng-{version}-{port}")
        workdir.mkdir(parents=True, exist_ok=True)
        argv = [str(nemo_gym_venv(version) / "bin" / "ng_run"), f"+config_paths=[{configs}]",
                f"+policy_base_url={policy_base_url}", f"+policy_api_key={policy_api_key}",
                f"+policy_model_name={policy_model_name}", "+head_server.host=127.0.0.1",
                f"+head_server.port={port}", f"+uv_venv_dir={realstack_dir() / f'ng-venvs-{version}'}",
                "+skip_venv_if_present=true", *overrides]
        process = Subprocess(argv, log_path=workdir / "ng_run.log", env=nemo_gym_env(version), cwd=workdir)
        stack = cls(version, process, f"http://127.0.0.1:{port}", workdir)
        try:
            stack.wait_until_ready()
        except BaseException:
            stack.stop()
            raise
        return stack

    def wait_until_ready(self) -> None:
        """The head answers, then every server it lists answers `GET /`."""
        deadline = time.monotonic() + SPINUP_TIMEOUT
        wait_for_http(f"{self.head_url}/global_config_dict_yaml", self.process, timeout=SPINUP_TIMEOUT,
                      what=f"NeMo Gym {self.version} (ng_run)")
        for url in self.server_urls().values():
            wait_for_http(url + "/", self.process, timeout=max(deadline - time.monotonic(), 30.0),
                          what=f"NeMo Gym {self.version} server {url}")

    def config(self) -> dict:
        reply = request_json("GET", f"{self.head_url}/global_config_dict_yaml", timeout=30)
        if not reply.ok:
            raise EnvironmentServerError(f"{self.head_url}/global_config_dict_yaml answered HTTP {reply.status}")
        return parse_head_config(reply.body)

    def server_urls(self) -> dict[str, str]:
        """{instance name: url} of every server in the head's config."""
        urls = {}
        for name, instance in self.config().items():
            if not isinstance(instance, dict):
                continue
            for kind in ("resources_servers", "responses_api_agents", "responses_api_models"):
                for impl in (instance.get(kind) or {}).values():
                    if isinstance(impl, dict) and impl.get("port"):
                        urls[name] = f"http://{impl.get('host') or '127.0.0.1'}:{impl['port']}"
        return urls


def collect_rollouts_with_nemo_gym(stack: NemoGymStack, rows_path: Path, out_path: Path, *, agent: str,
                                   limit: int | None = None, num_repeats: int = 1,
                                   responses_create_params: dict | None = None, timeout: float = 1800.0) -> Path:
    """Run NeMo Gym's own `ng_collect_rollouts` against a running stack; the rollouts JSONL it wrote."""
    import json
    import subprocess

    argv = [str(nemo_gym_venv(stack.version) / "bin" / "ng_collect_rollouts"), f"+agent_name={agent}",
            f"+input_jsonl_fpath={rows_path}", f"+output_jsonl_fpath={out_path}", f"+num_repeats={num_repeats}",
            "+head_server.host=127.0.0.1", f"+head_server.port={stack.head_url.rsplit(':', 1)[1]}"]
    if limit is not None:
        argv.append(f"+limit={limit}")
    if responses_create_params:  # Hydra's dict grammar: unquoted keys (0.2.0's parser refuses JSON)
        items = ", ".join(f"{key}: {json.dumps(value)}" for key, value in responses_create_params.items())
        argv.append(f"+responses_create_params={{{items}}}")
    proc = subprocess.run(argv, capture_output=True, text=True, env=nemo_gym_env(stack.version),
                          cwd=stack.workdir, timeout=timeout, check=False)
    if proc.returncode != 0 or not out_path.exists():
        raise EnvironmentServerError(f"ng_collect_rollouts (NeMo Gym {stack.version}) failed with code "
                                     f"{proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return out_path
