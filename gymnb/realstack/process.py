"""Subprocesses of the real stack: started in their own session, stopped by pid, waited for over HTTP."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from gymnb.core.errors import ConfigError, ServerError
from gymnb.core.models import cache_dir

INSTALL_HINT = "install it with `make real-stack` (scripts/realstack/install_nemo_gym.sh, install_vllm.sh)"


def realstack_dir() -> Path:
    return cache_dir() / "realstack"


def installed_venv(name: str, script: str) -> Path:
    """The venv `name` under realstack_dir(), or a ConfigError with the command that installs it."""
    venv = realstack_dir() / name
    if not (venv / ".installed").exists():
        raise ConfigError(f"{name} is not installed at {venv}: run `{script}` ({INSTALL_HINT})")
    return venv


class Subprocess:
    """A command running in its own session (process group), its output in `log_path`."""

    def __init__(self, argv: list[str], *, log_path: Path, env: dict | None = None, cwd: Path | None = None):
        self.argv, self.log_path = argv, log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "wb")  # noqa: SIM115 (lives as long as the process; closed in stop())
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                     start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, num_lines: int = 40) -> str:
        lines = self.log_path.read_bytes().decode("utf-8", errors="replace").splitlines()
        return "\n".join(line[:400] for line in lines[-num_lines:])

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM to the process group this process leads (its own children: servers, Ray, engine
        workers), then SIGKILL what is left after `grace` seconds. A backgrounded ng_run ignores SIGINT."""
        if self.alive():
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        self._signal(signal.SIGKILL)  # stragglers of the group, even after the leader exited
        self.proc.wait()
        self._log.close()

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass


class Managed:
    """A server run as one `Subprocess` in `self.process`: stopped by `stop()` or by leaving a `with` block."""

    process: Subprocess

    def stop(self) -> None:
        self.process.stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def wait_for_http(url: str, process: Subprocess, *, timeout: float, what: str, headers: dict | None = None) -> None:
    """Poll GET `url` until it answers 200; fail with the log's tail if the process dies or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        if not process.alive():
            raise ServerError(f"{what} exited (code {process.proc.returncode}) before answering {url}; the end of "
                              f"its log ({process.log_path}):\n{process.log_tail()}")
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise ServerError(f"{what} did not answer {url} within {timeout:.0f}s; the end of its log "
                              f"({process.log_path}):\n{process.log_tail()}")
        time.sleep(1.0)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
