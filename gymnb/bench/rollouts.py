"""Benchmarks stage, `gymnb bench rollouts`: rollout throughput and where the wall time goes.

Runs the embedded stack (policy server + workplace_assistant + simple_agent) in this process and collects
rollouts at several concurrency levels. For each level: rollouts per minute, and the share of wall time spent
outside the model: time during which no generation request is inside the engine (queued or decoding), so
only environment servers, the agent loop, HTTP, JSON and prompt building run. A well-overlapped collector keeps
that share small once several rollouts are in flight (target: under 5% at concurrency 8).

Measurement: the engine's `submit_many` is wrapped on the running instance to record when each request enters
and leaves the engine; the union of those intervals is the model-busy time. Forward passes are also timed with
hooks (`forward_share`): busy time minus forward time is the engine's own bookkeeping (sampling, KV merges).
Results go to outputs/bench/rollouts.json.
"""

from __future__ import annotations

import argparse
import json
import math
import threading
import time
from contextlib import ExitStack
from pathlib import Path

from gymnb.core.config import REPO_ROOT


class EngineBusyTimer:
    """Intervals [enter, leave] of every request inside a GenerationEngine (queued or generating)."""

    def __init__(self, engine):
        self.intervals: list[list[float]] = []
        self._lock = threading.Lock()
        original = engine.submit_many

        def submit_many(requests):
            entered = time.perf_counter()  # before submitting: the engine may start on it at once
            futures = original(requests)
            for future in futures:
                record = [entered, math.inf]
                with self._lock:
                    self.intervals.append(record)
                future.add_done_callback(lambda _f, r=record: r.__setitem__(1, time.perf_counter()))
            return futures

        engine.submit_many = submit_many  # instance attribute: measures this run only, the class is untouched

    def busy_seconds(self, start: float, end: float) -> float:
        with self._lock:
            return union_seconds(list(self.intervals), start, end)


def union_seconds(intervals, start: float, end: float) -> float:
    """Length of the union of [a, b] intervals, clipped to [start, end]."""
    spans = sorted((max(a, start), min(b, end)) for a, b in intervals if b > start and a < end)
    total, cur_a, cur_b = 0.0, None, None
    for a, b in spans:
        if cur_b is None or a > cur_b:
            total += (cur_b - cur_a) if cur_b is not None else 0.0
            cur_a, cur_b = a, b
        else:
            cur_b = max(cur_b, b)
    return total + ((cur_b - cur_a) if cur_b is not None else 0.0)


def run_level(rows, head_url, concurrency: int, num_rollouts: int, overrides: dict, busy: EngineBusyTimer,
              forward) -> dict:
    from gymnb.rollouts.collect import collect_rollouts_sync
    from gymnb.tokens.continuity import extract_trainable_turns

    num_repeats = math.ceil(num_rollouts / len(rows))
    forward.take()
    started = time.perf_counter()
    run = collect_rollouts_sync(rows, head_url=head_url, num_repeats=num_repeats, concurrency=concurrency,
                                overrides=overrides, progress=True)
    ended = time.perf_counter()
    wall, model_busy, forward_s = ended - started, busy.busy_seconds(started, ended), forward.take()
    calls = [len(extract_trainable_turns(r)) for r in run.results]
    generated = sum(len(t["generation_token_ids"]) for r in run.results for t in extract_trainable_turns(r))
    return {"concurrency": concurrency, "failures": len(run.failures), "mean_reward": run.metrics.get("mean_reward"),
            **level_figures(calls, generated, wall=wall, model_busy=model_busy, forward_s=forward_s)}


def level_figures(calls: list[int], generated: int, *, wall: float, model_busy: float, forward_s: float) -> dict:
    """A level's figures from its measurements: `calls` holds the model calls of each finished rollout."""
    num_rollouts = len(calls)
    return {"rollouts": num_rollouts, "wall_s": wall, "rollouts_per_minute": 60 * num_rollouts / wall,
            "model_busy_s": model_busy, "outside_share": 1 - model_busy / wall,
            # idle-model time per rollout: what environments, agent and HTTP cost when nothing overlaps them
            "outside_ms_per_rollout": 1000 * (wall - model_busy) / max(1, num_rollouts),
            "forward_s": forward_s, "forward_share": forward_s / wall,
            "model_calls_per_rollout": sum(calls) / max(1, num_rollouts), "generated_tokens_per_s": generated / wall}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gymnb bench rollouts", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="model preset or local HF dir (default embedded)")
    parser.add_argument("--env", default="workplace_assistant", help="environment (default workplace_assistant)")
    parser.add_argument("--limit", type=int, default=8, help="dataset rows, repeated to fill each level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="levels (default 1 8 32)")
    parser.add_argument("--rollouts", type=int, default=None,
                        help="rollouts per level (default: 2 x concurrency, at least 8)")
    parser.add_argument("--max-output-tokens", type=int, default=128, help="per model call (default 128)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-batch-size", type=int, default=32, help="engine rows decoded together")
    parser.add_argument("--out", default=None, help="JSON output (default outputs/bench/rollouts.json)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="gym config overrides")
    return parser


def format_table(levels: list[dict]) -> str:
    lines = [(f"{'concurrency':>11} {'rollouts':>8} {'wall s':>8} {'rollouts/min':>12} {'outside model':>13} "
              f"{'ms/rollout':>10} {'forward':>8} {'calls/rollout':>13}")]
    for lv in levels:
        lines.append(f"{lv['concurrency']:>11} {lv['rollouts']:>8} {lv['wall_s']:>8.1f} "
                     f"{lv['rollouts_per_minute']:>12.2f} {100 * lv['outside_share']:>12.2f}% "
                     f"{lv['outside_ms_per_rollout']:>10.1f} {100 * lv['forward_share']:>7.1f}% "
                     f"{lv['model_calls_per_rollout']:>13.2f}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    from gymnb.gym import start_gym
    from gymnb.gym.data import load_rows
    from gymnb.policy.server import PolicyServer
    from gymnb.train.metrics import ForwardTimer

    args = build_parser().parse_args(argv)
    rows = load_rows(args.env, "validation", args.limit)
    overrides = {"max_output_tokens": args.max_output_tokens, "temperature": args.temperature}
    levels = []
    with ExitStack() as stack:
        server = stack.enter_context(PolicyServer.start(args.model, max_batch_size=args.max_batch_size))
        gym = stack.enter_context(start_gym([args.env], policy_base_url=server.base_url,
                                            policy_model_name=server.model_id, overrides=args.overrides))
        busy, forward = EngineBusyTimer(server.engine), ForwardTimer(server.engine.model)
        run_level(rows[:1], gym.head_url, 1, 1, overrides, busy, forward)  # warm-up: first forwards are slow
        for concurrency in args.concurrency:
            num_rollouts = args.rollouts or max(8, 2 * concurrency)
            levels.append(run_level(rows, gym.head_url, concurrency, num_rollouts, overrides, busy, forward))
            print(format_table(levels[-1:]).splitlines()[-1], flush=True)
        forward.remove()
    print(format_table(levels))
    out = Path(args.out) if args.out else REPO_ROOT / "outputs" / "bench" / "rollouts.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    out.write_text(json.dumps({"settings": settings, "levels": levels, "target": "outside_share < 0.05 at "
                               "concurrency 8"}, indent=2))
    print(f"saved {out}")
    return 0
