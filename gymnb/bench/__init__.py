"""Benchmarks stage: `gymnb bench server|logprobs|rollouts|train`, each a module with its own `main(argv)`.

Imports are lazy so that one benchmark's dependencies never slow down or break another.
"""

from __future__ import annotations

import importlib
import sys

BENCHES = {
    "server": ("gymnb.bench.server", "server tokens/s beside real vLLM and transformers serve (--busy: on a loaded CPU)"),
    "logprobs": ("gymnb.bench.logprobs", "token_mult_prob_error of each engine x trainer dtype (gymnb, vLLM)"),
    "rollouts": ("gymnb.bench.rollouts", "rollouts per minute and time spent outside the model"),
    "train": ("gymnb.bench.train", "GRPO step time and its parts"),
}


def usage() -> str:
    lines = ["usage: gymnb bench BENCH [options]", "", "benches:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in BENCHES.items()]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] not in BENCHES:
        print(f"gymnb bench: unknown bench {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(BENCHES[argv[0]][0])
    return int(module.main(argv[1:]) or 0)
