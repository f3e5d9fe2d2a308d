"""NeMo Gym's own example rows and workplace CSV data, read from the installed `nemo-gym` wheel.

`make test` installs the wheel (`make real-stack`); without it these tests fail naming that command, so they
never skip on a clean clone. Nothing of NeMo Gym's is copied into the repository.
"""

from __future__ import annotations

from pathlib import Path

from gymnb.realstack import example_rows
from gymnb.realstack.nemo_gym import site_packages

VERSION = "0.4.0"


def example_file(env: str) -> Path:
    return example_rows(VERSION, env)


def workplace_csv_dir() -> Path:
    return site_packages(VERSION) / "resources_servers" / "workplace_assistant" / "csv_data"
