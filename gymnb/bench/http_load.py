"""Benchmarks stage, the HTTP load shared by `gymnb bench server`: server subprocesses, clients, a busy core.

Every server is a subprocess started the same way, so each figure comes with the server's own CPU time (from
/proc, all its children included) beside wall time: on a shared machine wall-clock tokens/s drifts with other
people's load, while tokens per CPU-second of the serving process drifts much less.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a refrigerator works.",
    "List some tips for learning a new language.",
    "Describe the water cycle to a child.",
    "What makes a good cup of coffee?",
    "Summarize the plot of a heist movie you invent.",
    "Give advice to someone starting to run.",
    "Why do cats purr?",
    "Describe a walk through a forest in autumn.",
    "How do airplanes stay in the air?",
    "Write a letter to your future self.",
    "What is photosynthesis?",
    "Invent a new board game and explain the rules.",
    "Describe your ideal weekend.",
    "Explain what a database index is.",
    "Write a poem about the sea.",
]

# A CPU-bound loop for --busy: what another user's job (a test run, a compile) does to the serving process.
BUSY_LOOP = "import os, sys\nos.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True:\n    pass\n"


def user_messages(index: int, tag: str | None = None) -> list[dict]:
    """One user turn. With a `tag` (a measurement's name) it opens with "Request <tag>.<index>:", so no two
    requests of a bench share more than the chat template's opening: every server has prefix caching on by
    default (vLLM's prefix caching, transformers' block sharing, gymnb's prefix cache), and repeated prompts
    would measure cache hits instead of prefills (each server's cache lives through all its rounds)."""
    prompt = PROMPTS[index % len(PROMPTS)]
    return [{"role": "user", "content": prompt if tag is None else f"Request {tag}.{index}: {prompt}"}]


def process_tree_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process and its live children (vLLM computes in a child); None off Linux."""
    total, found = 0.0, False
    for child in [pid, *child_pids(pid)]:
        try:
            fields = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
        found = True
    return total if found else None


def wait_quiet(pids: list[int], *, threshold: float = 0.1, window: float = 0.5, timeout: float = 15.0) -> float:
    """Wait until the processes `pids` (children included) together use under `threshold` CPUs over a
    `window`; returns the seconds waited (`timeout` at most, then the measurement goes ahead anyway).

    A server may go on computing after its last response: vLLM's engine core spun one core for about a second
    after each load here. A server measured next meets a busy core for that second, and one whose threads
    follow the free cores (gymnb) runs on fewer for a while: gymnb measured right after vLLM made 181
    tokens/s, alone 200. So every measurement starts on servers that have all gone quiet."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        before = [process_tree_cpu_seconds(pid) or 0.0 for pid in pids]
        time.sleep(window)
        used = sum((process_tree_cpu_seconds(pid) or 0.0) - b for pid, b in zip(pids, before, strict=True))
        if used / window < threshold:
            break
    return round(time.monotonic() - start, 2)


def child_pids(pid: int) -> list[int]:
    """Descendants of `pid` (from /proc/<pid>/task/*/children), depth first."""
    out = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            for child in map(int, children.read_text().split()):
                out += [child, *child_pids(child)]
    return out


async def run_clients(base_url: str, model: str, concurrency: int, requests_per_client: int, max_tokens: int,
                      extra: dict, tag: str) -> tuple[int, float]:
    """C clients, each sending `requests_per_client` chat requests back to back: (output tokens, seconds).
    `tag` names the measurement in every prompt (see `user_messages`)."""

    async def client(session, index: int) -> int:
        tokens = 0
        for r in range(requests_per_client):
            body = {"model": model, "messages": user_messages(index + r * concurrency, tag),
                    "max_tokens": max_tokens, "temperature": 1.0, **extra}
            async with session.post(f"{base_url}/v1/chat/completions", json=body) as resp:
                data = await resp.json(content_type=None)
                if resp.status != 200:
                    raise RuntimeError(f"{base_url} answered {resp.status}: {str(data)[:300]}")
                tokens += data["usage"]["completion_tokens"]
        return tokens

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as session:
        start = time.perf_counter()
        counts = await asyncio.gather(*(client(session, i) for i in range(concurrency)))
        return sum(counts), time.perf_counter() - start


def measure_level(url: str, model: str, pid: int, clients: int, requests_per_client: int, max_tokens: int,
                  extra: dict, tag: str) -> dict:
    """One measurement of one server at one concurrency: tokens/s and tokens per CPU-second of the server.
    `tag`: unique per measurement of a server, so that no prompt repeats (see `user_messages`)."""
    cpu_before = process_tree_cpu_seconds(pid)
    clients_run = run_clients(url, model, clients, requests_per_client, max_tokens, extra, tag)
    tokens, seconds = asyncio.run(clients_run)
    cpu_after = process_tree_cpu_seconds(pid)
    cpu = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
    return summarize(tokens, seconds, cpu, clients=clients, requests=clients * requests_per_client)


def summarize(tokens: int, seconds: float, cpu_seconds: float | None, **extra) -> dict:
    row = {**extra, "output_tokens": tokens, "seconds": round(seconds, 3),
           "tokens_per_s": round(tokens / seconds, 2)}
    if cpu_seconds and cpu_seconds > 0:
        row.update(cpu_seconds=round(cpu_seconds, 2), tokens_per_cpu_s=round(tokens / cpu_seconds, 2))
    return row


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(cmd: list[str], env: dict, log_path: Path) -> subprocess.Popen:
    """Start a server in its own process group, so that `stop` also ends the engine processes it forks."""
    with open(log_path, "w") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_ready(proc: subprocess.Popen, ready_url: str, log_path: Path, deadline: float) -> str | None:
    """Poll `ready_url` until it answers (None) or the process dies / the deadline passes (why, with log tail).

    Always polls once: servers started together share one deadline, and a late one may be up already."""
    first = True
    while first or time.monotonic() < deadline:
        first = False
        if proc.poll() is not None:
            return f"{proc.args[0]} exited ({proc.returncode}); log tail:\n{log_path.read_text()[-1500:]}"
        try:
            with urllib.request.urlopen(ready_url, timeout=2):
                return None
        except OSError:
            time.sleep(1)
    return f"{' '.join(map(str, proc.args[:3]))} did not answer {ready_url} in time; log: {log_path}"


def stop(proc: subprocess.Popen) -> None:
    """End the server and its process group (vLLM's engine core and workers outlive a terminated front)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@contextlib.contextmanager
def busy_core(core: int = 0):
    """A CPU-bound process pinned to `core` while the block runs (what a shared laptop or CI box looks like)."""
    proc = subprocess.Popen([sys.executable, "-c", BUSY_LOOP, str(core)])
    try:
        time.sleep(0.5)  # let it reach its core before the measurement starts
        yield proc
    finally:
        proc.kill()
        proc.wait()
