"""What users see besides the results: no deprecation warnings per run, no asyncio dumps at shutdown, clear
one-line messages for a taken port, a faulty server mode and a head server given where a policy server goes."""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
import warnings

import pytest

from gymnb.core.errors import ConfigError, ServerError


def test_generation_raises_no_deprecation_warning(tiny_model_dir):
    """transformers renamed the KV-cache argument; the old name warned in red in every JupyterLab run."""
    from gymnb.core.models import load_model
    from gymnb.policy.engine import GenerationEngine, SamplingParams

    loaded = load_model(str(tiny_model_dir), max_model_len=256)
    engine = GenerationEngine(loaded, max_batch_size=2)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            prompt = loaded.tokenizer.encode("Hello there")
            (completions,) = engine.generate_batch([prompt], SamplingParams(max_tokens=4, temperature=0))
    finally:
        engine.close()
    assert len(completions[0].token_ids) == 4
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == []


def test_stopping_a_server_loop_with_a_pending_task_prints_no_asyncio_dump(caplog):
    from gymnb.core.http import ServerLoop

    loop = ServerLoop("test-loop")
    started = asyncio.run_coroutine_threadsafe(asyncio.sleep(0), loop.loop)
    started.result(5)
    # a task nobody awaits, as a request in flight or a scheduler is when Ctrl-C arrives
    loop.loop.call_soon_threadsafe(lambda: loop.loop.create_task(asyncio.sleep(3600)))
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        loop.stop()
        gc.collect()
    assert "Task was destroyed but it is pending" not in caplog.text


def test_a_taken_port_is_named_before_the_model_loads():
    from gymnb.policy import server

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ServerError) as info:
            server.main(["--model", "no-such-model-would-fail-later", "--port", str(port)])
    message = str(info.value)
    assert message.startswith(f"cannot listen on 127.0.0.1:{port}") and "--port N" in message
    assert message.count("cannot listen") == 1


def test_the_no_splice_server_announces_that_it_is_faulty(tiny_model_dir):
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "gymnb.cli", "serve", "--model", str(tiny_model_dir),
                             "--port", "0", "--no-splice"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "FAULTY MODE" in line:
                break
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert "ready at http://127.0.0.1:" in "".join(lines)
    assert "FAULTY MODE (--no-splice)" in lines[-1] and "off-policy" in lines[-1] and "Do not train" in lines[-1]


def test_a_head_server_given_as_base_url_suggests_gym():
    from gymnb.gym import start_gym
    from gymnb.validation.validate import main

    with start_gym(["math_with_judge"], policy_base_url="http://127.0.0.1:9/v1", policy_model_name="m") as gym, \
            pytest.raises(ConfigError, match=rf"is a NeMo Gym head server .* Fix: pass it as --gym {gym.head_url}"):
        main(["--base-url", gym.head_url, "--layers", "http_endpoint"])
