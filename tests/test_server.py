"""Policy server over real HTTP (tiny model, loopback port): token fields, log-probs, /tokenize, refit."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
import torch

from gymnb.core.models import load_model
from gymnb.policy.server import PolicyServer


def post(url: str, body, api_key: str | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(str(tiny_model_dir), max_model_len=256)


@pytest.fixture(scope="module")
def server(loaded):
    with PolicyServer.start(loaded, model_id="tiny") as server:
        yield server


def model_log_probs(model, prompt_ids, generation_ids, temperature):
    """The trainer's view: log_softmax(logits / T) of each generated token, one unpadded forward pass."""
    ids = torch.tensor([prompt_ids + generation_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt_ids) - 1 : -1].float()  # (G, V)
    logprobs = torch.log_softmax(logits / (temperature or 1.0), dim=-1)
    return logprobs.gather(1, torch.tensor(generation_ids)[:, None]).squeeze(1)


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0])
def test_log_probs_equal_model_log_softmax(server, loaded, temperature):
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Count to five."}],
        "max_tokens": 12,
        "temperature": temperature,
        "seed": 3,
        "n": 2,
    }
    status, resp = post(server.url + "/v1/chat/completions", body)
    assert status == 200, resp
    for choice in resp["choices"]:
        msg = choice["message"]
        assert len(msg["generation_token_ids"]) == len(msg["generation_log_probs"]) == 12
        expected = model_log_probs(
            loaded.model, msg["prompt_token_ids"], msg["generation_token_ids"], temperature
        )
        assert torch.allclose(torch.tensor(msg["generation_log_probs"]), expected, atol=1e-4)
    if temperature == 0.0:  # greedy: both choices identical, and each token the argmax
        first, second = (c["message"]["generation_token_ids"] for c in resp["choices"])
        assert first == second


def test_tokenize_equals_chat_prompt_ids(server):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    status, chat = post(server.url + "/v1/chat/completions", {"messages": messages, "max_tokens": 3})
    assert status == 200
    status, tok = post(server.url + "/tokenize", {"model": "tiny", "messages": messages})
    assert status == 200
    assert tok["tokens"] == chat["choices"][0]["message"]["prompt_token_ids"]
    assert tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == 256


def test_seed_reproduces_sampling(server):
    body = {
        "messages": [{"role": "user", "content": "Pick a word."}],
        "max_tokens": 10,
        "temperature": 1.0,
        "seed": 11,
    }
    runs = [post(server.url + "/v1/chat/completions", body)[1] for _ in range(2)]
    ids = [r["choices"][0]["message"]["generation_token_ids"] for r in runs]
    assert ids[0] == ids[1]
    other = post(server.url + "/v1/chat/completions", {**body, "seed": 12})[1]
    assert other["choices"][0]["message"]["generation_token_ids"] != ids[0]


def test_gymnb_serve_prints_url_when_ready_and_stops_on_sigterm(tiny_model_dir):
    """`gymnb serve` as a user runs it: the printed URL answers at once; SIGTERM ends it cleanly."""
    import signal
    import subprocess
    import sys

    cmd = [
        sys.executable,
        "-m",
        "gymnb.cli",
        "serve",
        "--model",
        str(tiny_model_dir),
        "--port",
        "0",
        "--max-model-len",
        "256",
        "--api-key",
        "k",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        assert "ready at http://127.0.0.1:" in line, line
        url = line.split("ready at ")[1].split()[0]
        status, resp = post(
            url + "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
            api_key="k",
        )
        assert status == 200 and resp["model"] == str(tiny_model_dir)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0


def test_concurrent_requests_share_decode_steps(server):
    """Eight concurrent clients are decoded together: far fewer steps than 8 x 19 one by one."""
    import asyncio

    import aiohttp

    async def ask(session, i):
        body = {"messages": [{"role": "user", "content": f"Story number {i}"}], "max_tokens": 20,
                "temperature": 1.0, "seed": i, "ignore_eos": True, "stop": ["zzzz"]}
        async with session.post(server.url + "/v1/chat/completions", json=body) as resp:
            assert resp.status == 200
            return (await resp.json())["usage"]["completion_tokens"]

    async def steps(session) -> int:
        async with session.get(server.url + "/health") as resp:
            return (await resp.json())["stats"]["decode_steps"]

    async def run():
        async with aiohttp.ClientSession() as session:
            before = await steps(session)
            counts = await asyncio.gather(*(ask(session, i) for i in range(8)))
            return counts, await steps(session) - before

    counts, num_steps = asyncio.run(run())
    assert counts == [20] * 8
    assert num_steps < 8 * 19 / 2  # one by one: 19 decode steps each (the first token comes from the prefill)
