"""The conformance tier: gymnb against the real stack (real NeMo Gym's servers and CLI, real vLLM), nothing mocked.

Needs `make real-stack` (Python 3.12 for NeMo Gym; `make test` runs it). A missing install is a failure that
names the command, never a skip: a green suite must mean the real stack was checked.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gymnb.realstack import NemoGymStack
from gymnb.realstack.process import free_port

sys.path.insert(0, str(Path(__file__).parent))


def pytest_collection_modifyitems(items):
    for item in items:
        if "realstack" in str(item.fspath):
            item.add_marker(pytest.mark.realstack)
            item.add_marker(pytest.mark.slow)
            item.add_marker(pytest.mark.timeout(2400))  # a stack's first start installs its server venvs


@pytest.fixture(scope="session")
def policy_port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def stack040(policy_port):
    with NemoGymStack.start("0.4.0", ["math_with_judge", "workplace_assistant"],
                            policy_base_url=f"http://127.0.0.1:{policy_port}/v1", policy_model_name="tiny") as s:
        yield s


@pytest.fixture(scope="session")
def policy_dir() -> Path:
    """The policy every stack serves: a tiny random model (head size 32, so real vLLM can serve it too)."""
    from nemo_gym_rows import vllm_tiny_model

    return vllm_tiny_model()


@pytest.fixture(scope="session")
def policy(policy_dir, policy_port):
    """gymnb serve (the reference policy server) behind the good-server stacks."""
    from gymnb.policy.server import PolicyServer

    with PolicyServer.start(str(policy_dir), model_id="tiny", port=policy_port, threads=1) as server:
        yield server


@pytest.fixture(scope="session")
def stack020(policy, policy_port):
    with NemoGymStack.start("0.2.0", ["math_with_judge", "workplace_assistant"],
                            policy_base_url=f"http://127.0.0.1:{policy_port}/v1", policy_model_name="tiny") as s:
        yield s


def run_validate(head_url: str, out: Path, *, env: str, model_dir: Path, rows_path: Path,
                 extra: tuple[str, ...] = ()) -> dict:
    num_rows = len(rows_path.read_text().splitlines())
    """`gymnb validate --gym HEAD` as a user runs it (only the head URL: the policy comes from its config)."""
    argv = [sys.executable, "-m", "gymnb.cli", "validate", "--gym", head_url, "--env", env, "--out", str(out),
            "-p", f"model={model_dir}", "-p", f"rows_path={rows_path}", "-p", f"num_rows={num_rows}",
            "-p", "num_repeats=1",
            "-p", "temperature=0", "-p", "max_output_tokens=48", *extra]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=1800, check=False)
    summary_path = out / "summary.json"
    assert summary_path.exists(), f"gymnb validate wrote no summary (exit {proc.returncode}):\n{proc.stdout[-3000:]}" \
                                  f"\n{proc.stderr[-3000:]}"
    summary = json.loads(summary_path.read_text())
    summary["exit_code"] = proc.returncode
    return summary


def statuses(summary: dict) -> dict[str, str]:
    return {name: layer["status"] for name, layer in summary["layers"].items()}
