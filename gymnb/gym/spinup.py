"""`gymnb gym up` and `start_gym(...)`: start a NeMo-Gym-compatible stack on loopback ports.

    with start_gym(["math_with_judge"], policy_base_url=server.base_url, policy_model_name=server.model_id) as gym:
        gym.head_url                                  # http://127.0.0.1:PORT (GET /global_config_dict_yaml ...)
        gym.server_url("math_with_judge_simple_agent")  # POST /run here
        gym.config                                    # the resolved config, real ports filled in

All servers run in this process on one background thread's event loop: model servers first, then resources
servers, then agents (each instance's references resolved to the URLs of the servers already up), then the head
server. Each must answer `GET /` before the stack is handed out; on any failure everything started is shut down.

    gymnb gym up --env math_with_judge [--env workplace_assistant] --policy-base-url http://127.0.0.1:8000/v1 \
        [--policy-model ID] [--policy-api-key KEY] [--head-port 11000] [dotted.key=value ...]

prints the head server's URL and serves until SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Self

import aiohttp

from gymnb.core.config import API_KEY_ENV, read_api_key
from gymnb.core.errors import ConfigError, EnvironmentServerError
from gymnb.core.http import ServerLoop
from gymnb.gym import head
from gymnb.gym.config import DEFAULT_HEAD_PORT, SERVER_TYPES, iter_instances, list_envs, load_gym_config

# (server type, implementation) -> module whose make_app(config: dict) builds the server. Imported on use, so an
# environment that is not selected costs nothing.
IMPLEMENTATIONS = {
    ("responses_api_models", "vllm_model"): "gymnb.gym.model_server",
    ("resources_servers", "math_with_judge"): "gymnb.gym.math_with_judge",
    ("resources_servers", "workplace_assistant"): "gymnb.gym.workplace.server",
    ("responses_api_agents", "simple_agent"): "gymnb.gym.simple_agent",
}


def find_make_app(server_type: str, implementation: str, instance: str):
    module_name = IMPLEMENTATIONS.get((server_type, implementation))
    if module_name is None:
        known = sorted(impl for (kind, impl) in IMPLEMENTATIONS if kind == server_type)
        raise ConfigError(f"instance {instance!r}: unknown {server_type} implementation {implementation!r} "
                          f"(gymnb implements {known})")
    try:
        return importlib.import_module(module_name).make_app
    except ModuleNotFoundError as exc:
        raise ConfigError(f"instance {instance!r}: {implementation} is not available ({exc})") from None


def resolve_references(node, urls: dict[str, str]):
    """A copy of `node` where every `{type, name}` reference to a running instance also carries its `url`."""
    if isinstance(node, dict):
        if node.get("type") in SERVER_TYPES and node.get("name") in urls:
            return {**node, "url": urls[node["name"]]}
        return {k: resolve_references(v, urls) for k, v in node.items()}
    if isinstance(node, list):
        return [resolve_references(v, urls) for v in node]
    return node


class GymStack:
    """A running stack; use as a context manager or call `stop()`."""

    def __init__(self, config: dict):
        self.config = config
        self.head_url: str | None = None
        self.server_instances: list[dict] = []
        self._urls: dict[str, str] = {}
        self._loop = ServerLoop("gymnb-gym")

    def server_url(self, instance: str) -> str:
        if instance not in self._urls:
            raise ConfigError(f"no running instance {instance!r}; running: {sorted(self._urls)}")
        return self._urls[instance]

    def start(self) -> GymStack:
        for inst in iter_instances(self.config):
            make_app = find_make_app(inst.server_type, inst.implementation, inst.name)
            app_config = {**resolve_references(copy.deepcopy(inst.config), self._urls), "name": inst.name}
            url = self._loop.start_app(make_app(app_config), inst.config["host"], int(inst.config["port"]))
            inst.config["port"] = int(url.rsplit(":", 1)[1])  # the served config names the real port
            self._urls[inst.name] = url
            self.server_instances.append(_display(inst, url))
        head_cfg = self.config["head_server"]
        self.head_url = self._loop.start_app(head.make_app(self.config, self.server_instances),
                                             head_cfg["host"], int(head_cfg["port"]))
        head_cfg["port"] = int(self.head_url.rsplit(":", 1)[1])
        self._loop.run(wait_until_ready({"head_server": self.head_url, **self._urls}), timeout=60)
        return self

    def stop(self) -> None:
        self._loop.stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def _display(inst, url: str) -> dict:
    """NeMo Gym's ServerInstanceDisplayConfig fields for one in-process server."""
    return {"process_name": inst.name, "server_type": inst.server_type, "name": inst.implementation,
            "entrypoint": IMPLEMENTATIONS[(inst.server_type, inst.implementation)], "config_path": inst.name,
            "dir_path": None, "host": inst.config["host"], "port": inst.config["port"], "url": url,
            "pid": os.getpid(), "start_time": time.time(), "status": "success"}


async def wait_until_ready(urls: dict[str, str]) -> None:
    """Every server answers GET / with {"status": "ok"}, or EnvironmentServerError naming the one that does not."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        for name, url in urls.items():
            try:
                async with http.get(url + "/") as resp:
                    body = await resp.json(content_type=None)
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                raise EnvironmentServerError(f"server {name!r} at {url} did not answer GET /: {exc}") from None
            if resp.status != 200 or body != {"status": "ok"}:
                raise EnvironmentServerError(f"server {name!r} at {url} answered GET / with {resp.status}: {body}")


def start_gym(envs: list[str], *, policy_base_url: str | list[str], policy_model_name: str,
              policy_api_key: str | None = None, overrides=(), head_port: int = 0) -> GymStack:
    """Start the chosen environments (plus the policy model server and the head server); see the module doc."""
    config = load_gym_config(envs, policy_base_url=policy_base_url, policy_model_name=policy_model_name,
                             policy_api_key=policy_api_key, overrides=overrides, head_port=head_port)
    stack = GymStack(config)
    try:
        return stack.start()
    except BaseException:
        stack.stop()
        raise


def discover_model_id(base_url: str, api_key: str | None) -> str:
    """The first model id that `GET {base_url}/models` lists (for `gym up` without --policy-model)."""
    request = urllib.request.Request(base_url.rstrip("/") + "/models",
                                     headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return json.load(resp)["data"][0]["id"]
    except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError) as exc:
        raise ConfigError(f"could not read the model id from {base_url}/models ({exc}); is the policy server "
                          "running? Or pass --policy-model ID") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gymnb gym", description="NeMo-Gym-compatible environments.")
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="start environments and serve until SIGINT/SIGTERM")
    up.add_argument("--env", action="append", required=True, metavar="NAME",
                    help=f"environment to start (repeatable): {', '.join(list_envs())} or a YAML file")
    up.add_argument("--policy-base-url", required=True, action="append", metavar="URL",
                    help="OpenAI-style base URL of the policy, ending in /v1 (repeat for several endpoints)")
    up.add_argument("--policy-model", default=None, metavar="ID", help="model id (default: first of GET /models)")
    up.add_argument("--policy-api-key", default=None, metavar="KEY",
                    help=f"bearer token for the policy endpoint (visible in `ps`: prefer --policy-api-key-file or "
                         f"${API_KEY_ENV})")
    up.add_argument("--policy-api-key-file", default=None, metavar="PATH", help="file holding that token")
    up.add_argument("--head-port", type=int, default=DEFAULT_HEAD_PORT,
                    help=f"head server port (default {DEFAULT_HEAD_PORT}, NeMo Gym's; 0 = a free port)")
    up.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    commands.add_parser("envs", help="list the environments --env accepts")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "envs":
        print("\n".join(list_envs()))
        return 0
    base_urls = args.policy_base_url
    api_key = read_api_key(args.policy_api_key, args.policy_api_key_file)
    model = args.policy_model or discover_model_id(base_urls[0], api_key)
    stack = start_gym(args.env, policy_base_url=base_urls[0] if len(base_urls) == 1 else base_urls,
                      policy_model_name=model, policy_api_key=api_key, overrides=args.overrides,
                      head_port=args.head_port)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        for inst in stack.server_instances:
            print(f"{inst['process_name']:<36} {inst['url']}", file=sys.stderr)
        print(stack.head_url, flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        stack.stop()
        print("gymnb gym: stopped", file=sys.stderr)
    return 0
