"""The `gymnb` command: a thin dispatcher to each stage's own `main(argv)`.

Each stage module owns its argument parser, so `gymnb serve --help` is documented where the server lives.
Imports are lazy so that `gymnb --help` does not pay for torch.
"""

from __future__ import annotations

import importlib
import sys

from gymnb.core.errors import GymnbError

COMMANDS = {
    "serve": ("gymnb.policy.server", "Run the OpenAI-compatible on-policy policy server."),
    "gym": ("gymnb.gym.spinup", "`gym up`: start NeMo-Gym-compatible environments (head, resources, agents)."),
    "collect": ("gymnb.rollouts.collect", "Collect rollouts from an environment into JSONL, with metrics."),
    "check-continuity": ("gymnb.tokens.continuity", "Check token continuity of a rollouts JSONL file."),
    "validate": ("gymnb.validation.validate", "Run the five-layer validation suite and write an HTML report."),
    "train": ("gymnb.train", "Train with the reference GRPO loop."),
    "bench": ("gymnb.bench", "Benchmarks: `bench server`, `bench rollouts`, `bench train`."),
}


def usage() -> str:
    lines = ["usage: gymnb COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<18} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `gymnb COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"gymnb: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    try:
        return int(module.main(rest) or 0)
    except GymnbError as exc:
        print(f"gymnb {command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
