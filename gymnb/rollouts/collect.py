"""Rollout collection (stage: environments -> rollouts -> continuity and training).

`collect_rollouts(rows, head_url=...)` finds each row's agent through the head server's
`/global_config_dict_yaml` (`agent_ref.name` -> `responses_api_agents` host and port), expands the rows aabbcc
(`num_repeats` copies, each tagged `_ng_task_index` and `_ng_rollout_index`), shallow-merges
`responses_create_params` overrides, and POSTs each copy to the agent's `/run` under a concurrency limit.

Durability: each result is appended to the output JSONL as soon as it completes and flushed, so a killed run
loses only rollouts in flight; `resume=True` reads the file back and runs only what is missing (a torn last line
from a kill mid-write is dropped). Failed rollouts are data: written to the failures file with their error class,
never a crashed batch.

Retries. A server that is down or restarting is waited for: connection errors, and 5xx answers that say an
upstream server could not be reached (`upstream_unreachable`, 503), are retried with jittered exponential
backoff until `retry_window` seconds (default 60, longer than a policy server restart) have passed since the
rollout's first failure, and before each retry of a connection error the agent's URL is looked up again on the
head server (a restarted environment comes back on new ports). Any other 5xx is a server error that most often
repeats (each attempt being a full generation), so it is retried once, and the failure records the server's own
error message. A 4xx (the row is malformed) fails the same way every time; a timeout is not retried either,
since the agent may still be running the first attempt and a retry would double the load on a slow policy.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import random
import sys
import threading
import time
from pathlib import Path

import aiohttp
import yaml

from gymnb.core.errors import ConfigError, EnvironmentServerError
from gymnb.core.jsonl import read_jsonl
from gymnb.core.wire import WireError, parse_head_config
from gymnb.rollouts.metrics import compute_metrics

TASK_KEY, ROLLOUT_KEY = "_ng_task_index", "_ng_rollout_index"
DEFAULT_TIMEOUT = 600.0  # seconds per /run attempt: a multi-step rollout on a CPU model can take minutes
DEFAULT_RETRY_WINDOW = 60.0  # seconds a rollout waits for a down server: a policy server restart fits in it
MAX_BACKOFF = 8.0  # seconds between two attempts at most, so a server that is back is found soon
# Marks of a 5xx that only relays "could not reach the next server" (gymnb's code; aiohttp's and the OS's words
# as other agents relay them): the stack is restarting, not failing.
UNREACHABLE_MARKS = ("upstream_unreachable", "Cannot connect to host", "Connection refused",
                     "ServerDisconnectedError", "ClientConnectorError")


@dataclasses.dataclass
class RolloutRun:
    results: list[dict]  # /run results (+ task and rollout indices), ordered by (task, rollout)
    failures: list[dict]  # {_ng_task_index, _ng_rollout_index, error_class, status, message, attempts}
    metrics: dict  # gymnb.rollouts.metrics.compute_metrics


class RolloutFailure(Exception):
    """One attempt failed. `error_class`: connection | timeout | http_4xx | http_5xx | bad_response.

    `unreachable`: a 5xx relaying that a server further down could not be reached (retried like a connection
    error); `root_cause`: the innermost error message the servers passed along.
    """

    def __init__(self, error_class: str, message: str, status: int | None = None, *,
                 unreachable: bool = False, root_cause: str | None = None):
        super().__init__(message)
        self.error_class, self.status = error_class, status
        self.unreachable, self.root_cause = unreachable, root_cause

    @property
    def waits_for_restart(self) -> bool:
        """Retried until the retry window closes: the server (or one behind it) is down, maybe restarting."""
        return self.error_class == "connection" or self.unreachable


def expand_rows(rows: list[dict], num_repeats: int = 1, overrides: dict | None = None,
                seed: int | None = None) -> list[dict]:
    """aabbcc copies with task and rollout indices; overrides merged into responses_create_params.

    A seed gives each rollout `seed + task * num_repeats + rollout` (stable across resumes), sent as `seed` in
    the JSON object `responses_create_params.metadata.extra_body`: NeMo Gym forbids unknown keys in
    responses_create_params, and its vllm_model merges `metadata.extra_body` into the chat request, so the seed
    reaches the policy server's sampler (vLLM's and gymnb's both read a top-level `seed`).
    """
    if num_repeats < 1:
        raise ConfigError(f"num_repeats must be >= 1, got {num_repeats}")
    expanded = []
    for task, row in enumerate(rows):
        if not isinstance(row.get("responses_create_params"), dict):
            raise ConfigError(f"row {task} has no responses_create_params object: not a NeMo Gym dataset row")
        for repeat in range(num_repeats):
            params = {**row["responses_create_params"], **(overrides or {})}
            if seed is not None:
                params["metadata"] = with_extra_body(params.get("metadata"), seed=seed + task * num_repeats + repeat)
            expanded.append({**row, "responses_create_params": params, TASK_KEY: task, ROLLOUT_KEY: repeat})
    return expanded


def with_extra_body(metadata: dict | None, **fields) -> dict:
    """`metadata` with `fields` merged into its `extra_body` JSON string (OpenAI metadata values are strings)."""
    metadata = dict(metadata or {})
    try:
        extra = json.loads(metadata.get("extra_body") or "{}")
    except json.JSONDecodeError as exc:
        raise ConfigError(f"responses_create_params.metadata.extra_body is not valid JSON: {exc}") from None
    if not isinstance(extra, dict):
        raise ConfigError("responses_create_params.metadata.extra_body must hold a JSON object")
    metadata["extra_body"] = json.dumps({**extra, **fields})
    return metadata


def agent_urls(config: dict, head_url: str) -> dict[str, str]:
    """{agent instance name: base url} from a resolved NeMo Gym config."""
    urls = {}
    for name, instance in config.items():
        if not isinstance(instance, dict) or not isinstance(instance.get("responses_api_agents"), dict):
            continue
        for impl in instance["responses_api_agents"].values():
            host = impl.get("host") or "127.0.0.1"
            if host in ("0.0.0.0", "::"):  # bound on all interfaces: reach it where the head server is
                host = aiohttp.client.URL(head_url).host
            urls[name] = f"http://{host}:{impl['port']}"
    return urls


async def fetch_agent_urls(http: aiohttp.ClientSession, head_url: str) -> dict[str, str]:
    url = head_url.rstrip("/") + "/global_config_dict_yaml"
    try:
        async with http.get(url, timeout=aiohttp.ClientTimeout(total=30)) as resp:
            if resp.status != 200:
                raise EnvironmentServerError(f"GET {url} answered HTTP {resp.status}: {(await resp.text())[:300]}")
            text = await resp.json(content_type=None)
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise EnvironmentServerError(f"cannot reach the head server at {head_url} ({type(exc).__name__}: {exc}). "
                                     "Fix: start one with "
                                     "`gymnb gym up --env NAME --policy-base-url URL`, or omit --gym to run the "
                                     "embedded stack.") from None
    try:
        config = parse_head_config(text)
    except WireError as exc:
        raise EnvironmentServerError(f"{url}: {exc}") from None
    urls = agent_urls(config, head_url)
    if not urls:
        raise EnvironmentServerError(f"the head server at {head_url} lists no responses_api_agents instance")
    return urls


def route_rows(rows: list[dict], urls: dict[str, str], default_agent: str | None = None) -> list[str]:
    """The agent url of each row: its agent_ref.name; else `default_agent` (ng_collect_rollouts' +agent_name:
    NeMo Gym's own example rows name no agent); else the only agent of the head."""
    routed = []
    for row in rows:
        name = (row.get("agent_ref") or {}).get("name") or default_agent
        if name is None:
            if len(urls) != 1:
                raise ConfigError(f"row {row.get(TASK_KEY)} names no agent (no agent_ref) and the head server has "
                                  f"{sorted(urls)}: pass --agent NAME (or --env ENV for its simple agent)")
            name = next(iter(urls))
        if name not in urls:
            raise ConfigError(f"row {row.get(TASK_KEY)} asks for agent {name!r}, but the head server has "
                              f"{sorted(urls)}: start that environment, fix the rows' agent_ref.name or --agent")
        routed.append(urls[name])
    return routed


async def run_rollout(http: aiohttp.ClientSession, agent_url: str, row: dict, timeout: float) -> dict:
    """One POST /run attempt; raises RolloutFailure classifying what went wrong."""
    body = {k: v for k, v in row.items() if k not in (TASK_KEY, ROLLOUT_KEY)}
    try:
        async with http.post(agent_url + "/run", json=body, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            text = await resp.text()
            status = resp.status
    except TimeoutError:
        raise RolloutFailure("timeout", f"no answer from {agent_url}/run within {timeout:g}s") from None
    except aiohttp.ClientError as exc:
        raise RolloutFailure("connection", f"{type(exc).__name__}: {exc}") from None
    if status >= 400:
        kind = "http_5xx" if status >= 500 else "http_4xx"
        message = error_message(text)
        unreachable = status == 503 or (status >= 500 and any(mark in text for mark in UNREACHABLE_MARKS))
        raise RolloutFailure(kind, f"HTTP {status} from {agent_url}/run: {message}", status,
                             unreachable=unreachable, root_cause=root_cause(message))
    try:
        result = json.loads(text)
    except json.JSONDecodeError:
        raise RolloutFailure("bad_response", f"/run answered non-JSON: {text[:200]!r}", status) from None
    if not isinstance(result, dict) or "reward" not in result:
        raise RolloutFailure("bad_response", f"/run result has no reward: {text[:200]!r}", status)
    return {**result, TASK_KEY: row[TASK_KEY], ROLLOUT_KEY: row[ROLLOUT_KEY]}


def error_message(text: str, limit: int = 4000) -> str:
    """The message of an error body: OpenAI's `error.message`, FastAPI's `detail`, or the text itself."""
    try:
        body = json.loads(text)
    except json.JSONDecodeError:
        return text[:limit]
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and error.get("message") is not None:
        return str(error["message"])[:limit]
    if isinstance(body, dict) and body.get("detail") is not None:
        return str(body["detail"])[:limit]
    return text[:limit]


def root_cause(message: str) -> str:
    """The innermost error of a chain that each server prefixed with `... answered HTTP NNN: `."""
    parts = message.rsplit("answered HTTP ", 1)
    return parts[-1].split(": ", 1)[-1] if len(parts) == 2 else message


async def run_with_retries(http, agent_url: str, row: dict, *, timeout: float, max_retries: int,
                           backoff: float, retry_window: float = DEFAULT_RETRY_WINDOW,
                           resolve=None) -> tuple[dict | None, dict | None]:
    """(result, None) or (None, failure record); retries as the module docstring says.

    `max_retries` bounds the retries of a server error (5xx); `resolve()`, when given, is awaited before a
    retry of a connection error and returns the row's agent URL as the head server lists it now (or None).
    """
    first_failure, server_errors = None, 0
    for attempt in itertools.count(1):
        try:
            return await run_rollout(http, agent_url, row, timeout), None
        except RolloutFailure as exc:
            first_failure = first_failure or time.monotonic()
            delay = min(MAX_BACKOFF, backoff * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)
            waited = time.monotonic() - first_failure
            server_errors += exc.error_class == "http_5xx" and not exc.unreachable
            retry = (exc.waits_for_restart and waited + delay <= retry_window) or (
                exc.error_class == "http_5xx" and not exc.unreachable and server_errors <= max_retries)
            if not retry:
                return None, failure_record(row, exc, attempt, waited)
            # jittered: concurrent rollouts hitting one restarting server spread out
            await asyncio.sleep(delay)
            if exc.error_class == "connection" and resolve is not None:
                agent_url = await resolve() or agent_url


def failure_record(row: dict, exc: RolloutFailure, attempts: int, waited: float) -> dict:
    return {TASK_KEY: row[TASK_KEY], ROLLOUT_KEY: row[ROLLOUT_KEY], "error_class": exc.error_class,
            "status": exc.status, "message": str(exc), "root_cause": exc.root_cause or str(exc),
            "attempts": attempts, "retried_for_s": round(waited, 1)}


class AgentDirectory:
    """The head server's agent URLs, looked up again when an agent stops answering (it may have restarted on
    other ports); concurrent rollouts share one lookup, and lookups are at most one per `min_interval` s."""

    def __init__(self, http: aiohttp.ClientSession, head_url: str, urls: dict[str, str], min_interval: float = 1.0,
                 default_agent: str | None = None):
        self.http, self.head_url, self.urls, self.min_interval = http, head_url, urls, min_interval
        self.default_agent = default_agent
        self._lock = asyncio.Lock()
        self._fetched_at = time.monotonic()

    async def resolve(self, row: dict) -> str | None:
        """The row's agent URL from a fresh head lookup; None while the head server is unreachable too."""
        async with self._lock:
            if time.monotonic() - self._fetched_at >= self.min_interval:
                try:
                    self.urls = await fetch_agent_urls(self.http, self.head_url)
                except EnvironmentServerError:
                    return None
                finally:
                    self._fetched_at = time.monotonic()
        try:
            return route_rows([row], self.urls, self.default_agent)[0]
        except ConfigError:
            return None


def read_rollouts(path: str | Path) -> list[dict]:
    """Rollouts from a JSONL file; a line that is not a JSON object is an error naming its line number."""
    return read_jsonl(path, what="one rollout (a NeMo Gym /run result) per line", kind="rollouts JSONL")


def read_results(path: Path) -> list[dict]:
    """Results already in `path`. A last line without its newline is the torn tail of an interrupted write
    (each record goes out with its newline in one write): it is cut off the file and its rollout runs again."""
    if not path.exists():
        return []
    results, good_bytes = [], 0
    with path.open("rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise ConfigError(f"{path}: line {len(results) + 1} is not JSON; not a rollouts file") from None
            results.append(record)
            good_bytes += len(line)
    if good_bytes != path.stat().st_size:
        with path.open("r+b") as f:
            f.truncate(good_bytes)
    return results


def check_resumable(done: list[dict], rows: list[dict]) -> None:
    """Refuse to resume into a file that holds another dataset's rollouts."""
    inputs = {(r[TASK_KEY], r[ROLLOUT_KEY]): r["responses_create_params"].get("input") for r in rows}
    for result in done:
        key = (result.get(TASK_KEY), result.get(ROLLOUT_KEY))
        recorded = (result.get("responses_create_params") or {}).get("input")
        if key in inputs and recorded is not None and recorded != inputs[key]:
            raise ConfigError(f"cannot resume: the output file's rollout {key} has another prompt than row "
                              f"{key[0]} now; the rows changed (other --env/--split/--limit?). "
                              "Use a new output file.")


class RolloutSink:
    """Where finished rollouts go: the in-memory lists, the JSONL files (appended and flushed one record at a
    time, so a killed run keeps every finished rollout) and the progress bar."""

    def __init__(self, done: list[dict], total: int, out: Path | None, failures_file: Path | None,
                 *, append: bool, progress: bool):
        from tqdm.auto import tqdm

        self.results, self.failures = list(done), []
        self._reward_sum = sum(float(r.get("reward") or 0.0) for r in done)
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
        self._out = out.open("a" if append else "w") if out is not None else None
        self._fail = failures_file.open("w") if failures_file is not None else None
        self._bar = tqdm(total=total, initial=len(done), desc="rollouts", unit="rollout", disable=not progress)

    def add(self, result: dict | None, failure: dict | None) -> None:
        if result is not None:
            self.results.append(result)
            self._reward_sum += float(result.get("reward") or 0.0)
            self._write(self._out, result)
        else:
            self.failures.append(failure)
            self._write(self._fail, failure)
        self._bar.update(1)
        mean = self._reward_sum / max(1, len(self.results))
        self._bar.set_postfix(reward=f"{mean:.3f}", failed=len(self.failures))

    @staticmethod
    def _write(f, record: dict) -> None:
        if f is not None:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def close(self) -> None:
        self._bar.close()
        for f in (self._out, self._fail):
            if f is not None:
                f.close()


async def collect_rollouts(rows: list[dict], *, head_url: str, num_repeats: int = 1, concurrency: int = 8,
                           overrides: dict | None = None, out_path: str | Path | None = None,
                           failures_path: str | Path | None = None, metrics_path: str | Path | None = None,
                           resume: bool = False, timeout: float = DEFAULT_TIMEOUT, max_retries: int = 1,
                           backoff: float = 0.5, retry_window: float = DEFAULT_RETRY_WINDOW,
                           seed: int | None = None, progress: bool = True, threshold: float = 1.0,
                           agent: str | None = None) -> RolloutRun:
    """Run every row `num_repeats` times through its agent; see the module docstring.

    `max_retries`: retries of a server error (5xx); `retry_window`: seconds a rollout keeps retrying while a
    server is unreachable. `agent` names the agent instance for rows without an `agent_ref`
    (ng_collect_rollouts' `+agent_name`).

    `out_path` is replaced unless `resume`. Files default next to it: `<stem>.failures.jsonl` (rewritten each
    run: a resume retries failures) and `<stem>.metrics.json`. Without `out_path` nothing is written.
    """
    if concurrency < 1:
        raise ConfigError(f"concurrency must be >= 1, got {concurrency}")
    expanded = expand_rows(rows, num_repeats, overrides, seed)
    out = Path(out_path) if out_path else None
    done = read_results(out) if out is not None and resume else []
    check_resumable(done, expanded)
    done_keys = {(r.get(TASK_KEY), r.get(ROLLOUT_KEY)) for r in done}
    todo = [r for r in expanded if (r[TASK_KEY], r[ROLLOUT_KEY]) not in done_keys]
    failures_file = Path(failures_path) if failures_path else (out.with_suffix(".failures.jsonl") if out else None)
    metrics_file = Path(metrics_path) if metrics_path else (out.with_suffix(".metrics.json") if out else None)
    started = time.perf_counter()
    connector = aiohttp.TCPConnector(limit=0)  # our workers bound the concurrency
    async with aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar()) as http:
        urls = await fetch_agent_urls(http, head_url) if todo else {}
        directory = AgentDirectory(http, head_url, urls, default_agent=agent)
        queue = list(zip(todo, route_rows(todo, urls, agent) if todo else []))
        queue.reverse()  # pop() from the end keeps aabbcc order
        sink = RolloutSink(done, len(expanded), out, failures_file, append=resume, progress=progress)

        async def worker():
            while queue:
                row, url = queue.pop()
                sink.add(*await run_with_retries(http, url, row, timeout=timeout, max_retries=max_retries,
                                                 backoff=backoff, retry_window=retry_window,
                                                 resolve=lambda row=row: directory.resolve(row)))

        try:
            await asyncio.gather(*(worker() for _ in range(min(concurrency, len(queue)))))
        finally:
            sink.close()
    results = sorted(sink.results, key=lambda r: (r.get(TASK_KEY, 0), r.get(ROLLOUT_KEY, 0)))
    failures = sorted(sink.failures, key=lambda r: (r[TASK_KEY], r[ROLLOUT_KEY]))
    metrics = compute_metrics(results, failures, threshold=threshold)
    elapsed, collected = time.perf_counter() - started, len(todo) - len(failures)
    metrics.update(num_repeats=num_repeats, resumed=len(done), collected=collected, elapsed_s=elapsed,
                   rollouts_per_minute=60 * collected / max(elapsed, 1e-9))
    if metrics_file is not None:
        metrics_file.write_text(json.dumps(metrics, indent=2))
    return RolloutRun(results, failures, metrics)


def collect_rollouts_sync(rows: list[dict], **kwargs) -> RolloutRun:
    """`collect_rollouts` from synchronous code, including a notebook whose event loop is already running."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(collect_rollouts(rows, **kwargs))
    box: dict = {}

    def run():
        try:
            box["run"] = asyncio.run(collect_rollouts(rows, **kwargs))
        except BaseException as exc:  # noqa: BLE001 -- re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=run, name="gymnb-collect")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["run"]


def split_overrides(items: list[str]) -> tuple[dict, list[str]]:
    """`responses_create_params.KEY=VALUE` (NeMo Gym also writes a leading `+`) -> request overrides; any other
    `key=value` -> gym config overrides for the embedded stack. Values are YAML scalars (`0.7`, `true`)."""
    request, gym = {}, []
    for item in items:
        key, sep, value = item.lstrip("+").partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        if key.startswith("responses_create_params."):
            request[key.split(".", 1)[1]] = yaml.safe_load(value) if value else None
        else:
            gym.append(f"{key}={value}")
    return request, gym


def build_parser():
    import argparse

    p = argparse.ArgumentParser(
        prog="gymnb collect", description="Collect rollouts into JSONL (+ .failures.jsonl, .metrics.json). "
        "Without --gym the embedded policy server and environment are started here.")
    p.add_argument("--env", help="environment whose embedded rows to use (math_with_judge | workplace_assistant); "
                                 "also the environment the embedded stack starts")
    p.add_argument("--split", default="validation", help="train | validation (default validation)")
    p.add_argument("--input", help="NeMo Gym rows JSONL to use instead of the embedded rows of --env")
    p.add_argument("--limit", type=int, help="first N rows only")
    p.add_argument("--num-repeats", type=int, default=1, help="rollouts per row (aabbcc order)")
    p.add_argument("--concurrency", type=int, default=8, help="rollouts in flight")
    p.add_argument("--out", required=True, help="results JSONL, appended as rollouts finish")
    p.add_argument("--gym", metavar="HEAD_URL", help="head server of a running stack (gymnb gym up or NeMo Gym)")
    p.add_argument("--agent", help="agent instance for rows without agent_ref (default: --env's simple agent, "
                                   "e.g. math_with_judge_simple_agent), as ng_collect_rollouts' +agent_name")
    p.add_argument("--model", default="smollm2-135m", help="embedded stack: model preset or local HF dir")
    p.add_argument("--resume", action="store_true", help="keep --out's finished rollouts and run the rest")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--failures", help="failures JSONL (default <out stem>.failures.jsonl)")
    p.add_argument("--metrics", help="metrics JSON (default <out stem>.metrics.json)")
    p.add_argument("--seed", type=int, help="base sampling seed; rollout i gets seed + i")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per /run attempt")
    p.add_argument("--max-retries", type=int, default=1,
                   help="retries of a server error (HTTP 5xx); each is a full generation, and most repeat")
    p.add_argument("--retry-window", type=float, default=DEFAULT_RETRY_WINDOW,
                   help="seconds a rollout keeps retrying while a server is down or restarting (default 60)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="responses_create_params.KEY=VALUE for every request (e.g. "
                        "responses_create_params.temperature=1.0); other keys override the embedded gym config")
    return p


def load_input_rows(args) -> list[dict]:
    if args.input:
        rows = read_rollouts(args.input)
        return rows[:args.limit] if args.limit is not None else rows
    if not args.env:
        raise ConfigError("give --env NAME (embedded rows) or --input ROWS.jsonl")
    from gymnb.gym.data import load_rows

    return load_rows(args.env, args.split, args.limit)


def main(argv: list[str]) -> int:
    import contextlib

    from gymnb.rollouts.metrics import format_metrics

    args = build_parser().parse_intermixed_args(argv)  # key=value may come before or after options
    request_overrides, gym_overrides = split_overrides(args.overrides)
    out = Path(args.out)
    if out.exists() and out.stat().st_size and not (args.resume or args.overwrite):
        raise ConfigError(f"{out} already holds rollouts: pass --resume to finish it, --overwrite to replace it")
    if args.gym and gym_overrides:
        raise ConfigError(f"override {gym_overrides[0]!r} configures the embedded stack, but --gym points at a "
                          "running one; only responses_create_params.KEY=VALUE applies there")
    if not args.gym and not args.env:
        raise ConfigError("the embedded stack needs --env NAME (or point --gym at a running head server)")
    rows = load_input_rows(args)
    options = {"num_repeats": args.num_repeats, "concurrency": args.concurrency,
               "overrides": request_overrides, "out_path": out, "failures_path": args.failures,
               "metrics_path": args.metrics, "resume": args.resume, "timeout": args.timeout,
               "max_retries": args.max_retries, "retry_window": args.retry_window, "seed": args.seed,
               "progress": not args.no_progress, "agent": args.agent or env_agent(args.env)}
    with contextlib.ExitStack() as stack:
        head_url = args.gym or start_embedded_stack(stack, args.env, args.model, gym_overrides)
        run = collect_rollouts_sync(rows, head_url=head_url, **options)
    print(format_metrics(run.metrics))
    print(f"results: {out}")
    if run.failures:
        # Non-zero whenever a rollout is missing: a script must not take a partial collection for a full one.
        failures_file = args.failures or out.with_suffix(".failures.jsonl")
        total = len(run.results) + len(run.failures)
        print(f"FAILED: {len(run.failures)} of {total} rollouts failed (see {failures_file}); "
              f"`gymnb collect --resume` with the same arguments runs only them", file=sys.stderr)
        return 1
    return 0


def env_agent(env: str | None) -> str | None:
    """The simple agent instance NeMo Gym's configs (and gymnb's) name for an environment."""
    from gymnb.gym.data import ENV_AGENTS

    return ENV_AGENTS.get(env) if env else None


def start_embedded_stack(stack, env: str, model: str, gym_overrides: list[str]) -> str:
    """Policy server + environment on loopback ports for the life of `stack`; returns the head server URL."""
    from gymnb.gym import start_gym
    from gymnb.policy.server import PolicyServer

    server = stack.enter_context(PolicyServer.start(model))
    gym = stack.enter_context(start_gym([env], policy_base_url=server.base_url,
                                        policy_model_name=server.model_id, overrides=gym_overrides))
    print(f"embedded stack: policy {server.base_url} ({server.model_id}), head {gym.head_url}", flush=True)
    return gym.head_url
