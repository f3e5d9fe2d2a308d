"""Validation stage, the command: `gymnb validate` runs the five layer notebooks and writes the HTML report.

With no URLs it validates gymnb's own integration: it starts the embedded policy server and environments in
this process, points the notebooks at them over loopback HTTP, and stops them afterwards. With `--base-url`
and/or `--gym` it validates whatever answers there (any missing part is started embedded). Every layer runs
even when an earlier one failed; the exit code is 1 when any layer failed.

    gymnb validate                                    # embedded SmolLM2-135M, math_with_judge
    gymnb validate --base-url http://127.0.0.1:8000 --gym http://127.0.0.1:11000 -p num_rows=8
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

from gymnb.core.config import API_KEY_ENV, REPO_ROOT, read_api_key
from gymnb.core.errors import ConfigError
from gymnb.validation.checks.integration import ENVIRONMENTS, Integration, connect, policy_model
from gymnb.validation.checks.result import LAYERS
from gymnb.validation.report import write_report
from gymnb.validation.runner import (
    check_kernel,
    inspect_parameters,
    parse_parameter_overrides,
    resolve_parameters,
    run_layers,
    shipped_notebook,
)

# Set from the command's flags, not from -p, so that one spelling exists for each.
FLAG_PARAMETERS = {"base_url": "--base-url", "gym_head_url": "--gym", "env": "--env", "api_key": "--api-key",
                   "output_dir": "--out"}
POLICY_LAYERS = {"http_endpoint", "rollout_collection", "token_continuity"}
ROLLOUTS_FILE = ("03_rollout_collection", "rollouts.jsonl")  # where layer 03 writes, inside the run folder


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gymnb validate",
                                     description="Run the five-layer validation suite (notebooks/validation/) "
                                                 "and write a shareable HTML report.",
                                     epilog="`gymnb validate --list-parameters` lists the notebook parameters (-p).")
    parser.add_argument("--base-url", default="", help="policy server root URL (default: start the embedded one)")
    parser.add_argument("--gym", default="", metavar="HEAD_URL",
                        help="NeMo Gym head server URL (default: start gymnb's environments)")
    parser.add_argument("--env", default="math_with_judge", choices=ENVIRONMENTS,
                        help="environment to collect rollouts from (default: math_with_judge, short prompts; "
                             "workplace_assistant gives multi-turn tool-calling rollouts if the policy calls tools)")
    parser.add_argument("--api-key", default="", help="bearer token of the policy server, if it needs one "
                                                      f"(visible in `ps`: prefer --api-key-file or ${API_KEY_ENV})")
    parser.add_argument("--api-key-file", default=None, metavar="PATH", help="file holding the bearer token")
    parser.add_argument("-p", "--parameter", action="append", default=[], metavar="KEY=VALUE",
                        help="notebook parameter, e.g. -p num_rows=8 -p model=smollm2-135m (repeatable)")
    parser.add_argument("--out", default="", metavar="DIR",
                        help="run folder (default: outputs/validation/<run-id>)")
    parser.add_argument("--layers", default="", help=f"comma-separated subset of {','.join(LAYERS)} (default: all)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds a notebook cell may run")
    parser.add_argument("--list-parameters", action="store_true", help="list the notebook parameters and exit")
    return parser


def list_parameters() -> str:
    """Every notebook parameter with its default, its notebooks and the comment that documents it."""
    seen: dict[str, dict] = {}
    for layer in LAYERS:
        for name, info in inspect_parameters(shipped_notebook(layer)[0]).items():
            seen.setdefault(name, {**info, "layers": []})["layers"].append(layer)
    lines = []
    for name, info in seen.items():
        flag = f"  (set with {FLAG_PARAMETERS[name]})" if name in FLAG_PARAMETERS else ""
        lines.append(f"{name} = {json.dumps(info['default'])}  [{', '.join(info['layers'])}]{flag}\n    {info['help']}")
    return "\n".join(lines)


def select_layers(spec: str) -> list[str]:
    if not spec:
        return list(LAYERS)
    chosen = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in LAYERS]
    if unknown:
        raise ConfigError(f"unknown layer(s) {unknown}; choose from {list(LAYERS)}")
    return [layer for layer in LAYERS if layer in chosen]


def check_parameter_keys(params: dict) -> None:
    for key, flag in FLAG_PARAMETERS.items():
        if key in params:
            raise ConfigError(f"set {key} with {flag}, not -p {key}=...")


def run_defaults(run_dir: Path, user_params: dict) -> dict:
    """Values the runner fixes for this run: layers 04 and 05 read this run's rollouts unless told otherwise, so
    a run never checks another run's rollouts (the path is in the report either way)."""
    if "rollouts_path" in user_params:
        return {}
    return {"rollouts_path": str(run_dir.resolve().joinpath(*ROLLOUTS_FILE))}


def print_notebook_notes(layers: list[str]) -> None:
    for layer in layers:
        note = shipped_notebook(layer)[1]
        if note:
            print(f"note: {note}", flush=True)


def check_not_a_head_server(base_url: str) -> None:
    """A NeMo Gym head server given as --base-url fails every policy check with a puzzling 404; say what it is."""
    import urllib.request

    url = base_url.rstrip("/").removesuffix("/v1") + "/global_config_dict_yaml"
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            is_head = reply.status == 200
    except (OSError, ValueError):
        return  # not a head server (or not up): layer 01 reports what the URL does answer
    if is_head:
        raise ConfigError(f"--base-url {base_url} is a NeMo Gym head server (it serves /global_config_dict_yaml), "
                          f"not a policy server. Fix: pass it as --gym {base_url}; the policy server is then "
                          "found in its config (policy_base_url), or give that with --base-url")


def open_integration(args, layers: list[str], model: str) -> Integration:
    """Connect to (or start) what the selected layers talk to; layers 02 and 05 alone need no server."""
    if not set(layers) & POLICY_LAYERS:
        return Integration(args.base_url, args.gym or None, "")
    integration = connect(args.base_url, args.gym, model=model, envs=[args.env],
                          need_gym="rollout_collection" in layers, api_key=args.api_key)
    print(f"policy server {integration.base_url} ({integration.model_id}), gym head "
          f"{integration.head_url or '-'}{' [embedded]' if integration.embedded else ''}", flush=True)
    return integration


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    args.api_key = read_api_key(args.api_key, args.api_key_file) or ""
    if args.list_parameters:
        print(list_parameters())
        return 0
    layers = select_layers(args.layers)
    user_params = parse_parameter_overrides(args.parameter)
    check_parameter_keys(user_params)
    run_id = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(args.out) if args.out else REPO_ROOT / "outputs" / "validation" / run_id
    resolve_parameters(layers, user_params)  # fail on a bad -p or a missing kernel before starting any server
    check_kernel()
    if args.base_url:  # before asking it for its model: a head server answers /v1/models with a puzzling 404
        check_not_a_head_server(args.base_url)
    # An external server's own model, never the embedded default's tokenizer, unless -p model= names one.
    model = policy_model(str(user_params.get("model") or ""), args.base_url, args.gym, args.api_key)
    print(f"gymnb validate: run folder {run_dir}", flush=True)
    print_notebook_notes(layers)
    integration = open_integration(args, layers, model)
    embedded = integration.embedded  # before stop() empties it
    try:
        # No api_key parameter: the kernels get the key through the environment (see runner.kernel_api_key).
        shared = {"base_url": integration.base_url, "gym_head_url": integration.head_url or "", "env": args.env,
                  "model": model, **run_defaults(run_dir, user_params)}
        resolved = resolve_parameters(layers, user_params, shared)
        runs = run_layers(run_dir, resolved, timeout=args.timeout, api_key=integration.api_key)
    finally:
        integration.stop()
    record = {"base_url": integration.base_url, "gym_head_url": integration.head_url, "env": args.env,
              "model": model, "model_id": integration.model_id, "embedded": embedded,
              "layers": {run.layer: run.parameters for run in runs},
              "notebook_notes": {run.layer: run.note for run in runs if run.note}}
    index, _ = write_report(run_dir, runs, record, run_id=run_dir.name)
    failed = [run for run in runs if not run.passed]
    verdict = "all layers passed" if not failed else f"{len(failed)} of {len(runs)} layers failed"
    print(f"gymnb validate: {verdict}; report {index}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
