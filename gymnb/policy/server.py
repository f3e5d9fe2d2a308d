"""Policy server: an OpenAI-compatible HTTP front for the batching engine, returning the ids it sampled.

Endpoints (vLLM shapes; see gymnb.policy.chat for the request schema):
    GET  /v1/models            {"object": "list", "data": [{"id": MODEL_ID, "max_model_len": ...}]}
    GET  /health               {"status": "ok"} for anyone; with the API key also "num_active", "num_waiting",
                               "stats" (request and token counters), "torch_threads", "matmul" (how the
                               Linear layers multiply: gymnb.policy.packed_linear.matmul_path)
    POST /v1/chat/completions  chat.completion; every choices[i].message has prompt_token_ids,
                               generation_token_ids, generation_log_probs
    POST /tokenize             {"messages", "tools"?, ...} or {"prompt": str}
                               -> {"tokens", "count", "max_model_len"}; for messages exactly the prompt ids
                               the chat path would use, splice included
    POST /detokenize           {"tokens": [...]} -> {"prompt": str}

Log-prob convention: see gymnb.policy.engine. Errors: OpenAI-style `{"error": {"message", "type", "param", "code"}}`
with a 4xx for every client fault; a 5xx means a bug in gymnb, and the server keeps serving after either.

In a notebook, test or trainer::

    with PolicyServer.start("smollm2-135m") as server:   # or a LoadedModel
        client = openai.OpenAI(base_url=server.base_url, api_key="none")
        ...
        server.update_weights(trainer_model.state_dict())   # refit between training steps
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import hmac
import logging
import signal
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Self

from aiohttp import web

from gymnb.core.config import API_KEY_ENV, read_api_key
from gymnb.core.errors import EnvironmentServerError, RequestError, ServerError
from gymnb.core.http import SERVER_NAME_KEY, ServerLoop, error_middleware, error_response, read_json
from gymnb.core.models import LoadedModel, list_presets, load_model
from gymnb.core.wire import TOKEN_FIELDS
from gymnb.policy.chat import (
    build_chat_response,
    check_model,
    parse_chat_request,
    parse_chat_template_kwargs,
    parse_messages,
    parse_tools,
)
from gymnb.policy.cpu_memory import keep_freed_memory
from gymnb.policy.cpu_threads import single_team_for_engine
from gymnb.policy.engine import GenerationEngine
from gymnb.policy.splice import build_prompt_ids, check_token_ids, render_ids

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 256 * 1024 * 1024  # long multi-turn token histories are big; refusing them would be our bug
LOAD_OPTIONS = ("dtype", "device", "chat_template", "max_model_len")
ENGINE_KEY = web.AppKey("engine", GenerationEngine)
MODEL_ID_KEY = web.AppKey("model_id", str)
SPLICE_KEY = web.AppKey("splice", bool)
FAULT_KEY = web.AppKey("fault", str)
# Deliberate faults, for showing that the validation suite (and real NeMo Gym) catch them; never for training.
#   no-splice        re-tokenize the history instead of splicing the ids the model generated (off-policy turns)
#   token-text       a plain OpenAI-style server asked for NeMo Gym's token flags: logprobs tokens as text
#                    (return_tokens_as_token_ids ignored), no token fields, no vLLM token_ids
#   no-token-fields  a plain chat server: no token fields, no vLLM token ids, no logprobs
FAULTS = ("no-splice", "token-text", "no-token-fields")
API_KEY_KEY = web.AppKey("api_key", object)  # str | None
# Rendering and tokenizing run on this one thread: off the event loop (a megabyte prompt must not stall
# /health or other requests), and on one thread because a fast tokenizer is not thread-safe.
TOKENIZE_EXECUTOR_KEY = web.AppKey("tokenize_executor", ThreadPoolExecutor)
MAX_PROMPT_CHARS_KEY = web.AppKey("max_prompt_chars", int)


def has_api_key(request: web.Request, api_key: str | None) -> bool:
    """Whether the request carries `Authorization: Bearer <api_key>` (always true on a server without a key)."""
    if api_key is None:
        return True
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), api_key.encode())


def require_api_key(api_key: str | None):
    @web.middleware
    async def check_key(request: web.Request, handler):
        if request.path != "/health" and not has_api_key(request, api_key):
            return error_response("missing or incorrect API key: send `Authorization: Bearer <key>`",
                                  status=401, code="invalid_api_key")
        return await handler(request)

    return check_key


async def off_loop(request: web.Request, fn, *args):
    """Run a rendering or tokenizing call on the app's tokenizer thread."""
    return await asyncio.get_running_loop().run_in_executor(request.app[TOKENIZE_EXECUTOR_KEY], fn, *args)


def max_token_chars(tokenizer) -> int:
    """The most characters any one token stands for (its vocabulary string is at least as long as its text)."""
    return max(map(len, tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))))


def check_prompt_chars(text: str, max_chars: int, param: str) -> None:
    """Refuse text that cannot fit the context whatever its tokenization, before spending time tokenizing it."""
    if len(text) > max_chars:
        raise RequestError(
            f"{param} has {len(text):,} characters, more than the model's context can hold whatever the "
            f"tokenization (at most {max_chars:,} characters); shorten it", param=param,
            code="context_length_exceeded")


async def list_models(request: web.Request) -> web.Response:
    engine, model_id = request.app[ENGINE_KEY], request.app[MODEL_ID_KEY]
    card = {"id": model_id, "object": "model", "created": 0, "owned_by": "gymnb",
            "max_model_len": engine.max_model_len}
    return web.json_response({"object": "list", "data": [card]})


async def health(request: web.Request) -> web.Response:
    """Liveness for anyone; the load counters only for holders of the API key (they describe the traffic)."""
    body = {"status": "ok"}
    if has_api_key(request, request.app[API_KEY_KEY]):
        engine = request.app[ENGINE_KEY]
        body.update(num_active=engine.num_active, num_waiting=engine.num_waiting, stats=dict(engine.stats),
                    torch_threads=engine.threads.threads if engine.threads else engine.team_size,
                    matmul=engine.matmul)
    return web.json_response(body)


async def chat_completions(request: web.Request) -> web.Response:
    engine, model_id = request.app[ENGINE_KEY], request.app[MODEL_ID_KEY]
    body = await read_json(request, non_object_status=400)
    # Checking a long conversation is Python work too: off the loop (not on the tokenizer thread: no tokenizer)
    chat = await asyncio.get_running_loop().run_in_executor(None, functools.partial(
        parse_chat_request, body, model_id=model_id, vocab_size=engine.vocab_size))
    prompt_ids = await off_loop(request, request_prompt_ids, request.app, chat.messages, chat.tools,
                                chat.chat_template_kwargs, chat.required_prefix_token_ids)
    fault = request.app[FAULT_KEY]
    if fault in ("token-text", "no-token-fields"):
        chat.tokens_as_ids = chat.return_token_ids = False
        chat.logprobs = chat.logprobs and fault == "token-text"
    completions = await engine.generate(prompt_ids, chat.sampling)
    body = await off_loop(request, build_chat_response, chat, model_id, prompt_ids, completions,
                          engine.tokenizer)
    if fault in ("token-text", "no-token-fields"):
        for choice in body["choices"]:
            for name in TOKEN_FIELDS:
                choice["message"].pop(name)
    return web.json_response(body)


async def tokenize(request: web.Request) -> web.Response:
    engine, model_id = request.app[ENGINE_KEY], request.app[MODEL_ID_KEY]
    body = await read_json(request, non_object_status=400)
    check_model(body, model_id)
    if "messages" in body:
        add_generation_prompt = body.get("add_generation_prompt", True)
        if not isinstance(add_generation_prompt, bool):
            raise RequestError("add_generation_prompt must be a boolean", param="add_generation_prompt")
        kwargs = parse_chat_template_kwargs(body.get("chat_template_kwargs"))
        messages, tools = parse_messages(body["messages"]), parse_tools(body.get("tools"))
        prefix = body.get("required_prefix_token_ids")
        tokens = await off_loop(request, functools.partial(request_prompt_ids, add_generation_prompt=(
            add_generation_prompt)), request.app, messages, tools, kwargs, prefix)
    elif isinstance(body.get("prompt"), str):
        check_prompt_chars(body["prompt"], request.app[MAX_PROMPT_CHARS_KEY], "prompt")
        add_special = body.get("add_special_tokens", True)
        tokens = await off_loop(request, functools.partial(
            engine.tokenizer.encode, add_special_tokens=bool(add_special)), body["prompt"])
    else:
        raise RequestError("send either `messages` (a chat) or `prompt` (a string)", param="messages")
    return web.json_response({"tokens": tokens, "count": len(tokens), "max_model_len": engine.max_model_len})


def request_prompt_ids(app: web.Application, messages, tools, chat_template_kwargs, required_prefix_token_ids,
                       *, add_generation_prompt: bool = True) -> list[int]:
    """The prompt ids of a chat request: spliced, or re-rendered when the app runs with splice=False.

    splice=False is a deliberate fault, for demonstrating that the validation suite catches it: the server
    then does what a plain chat server does, re-rendering and re-tokenizing the whole history, which takes a
    multi-turn rollout off-policy wherever the generated ids do not survive that round trip.
    """
    tokenizer, max_chars = app[ENGINE_KEY].tokenizer, app[MAX_PROMPT_CHARS_KEY]
    if not app[SPLICE_KEY]:
        return render_ids(tokenizer, messages, tools, chat_template_kwargs, add_generation_prompt,
                          max_chars=max_chars)
    return build_prompt_ids(tokenizer, messages, tools, chat_template_kwargs, required_prefix_token_ids,
                            add_generation_prompt=add_generation_prompt, max_chars=max_chars)


async def detokenize(request: web.Request) -> web.Response:
    engine, model_id = request.app[ENGINE_KEY], request.app[MODEL_ID_KEY]
    body = await read_json(request, non_object_status=400)
    check_model(body, model_id)
    check_token_ids(body.get("tokens"), "tokens", engine.vocab_size)
    return web.json_response({"prompt": await off_loop(request, engine.tokenizer.decode, body["tokens"])})


def make_app(engine: GenerationEngine, model_id: str, api_key: str | None = None, *,
             splice: bool = True, fault: str | None = None) -> web.Application:
    """The policy server's routes. `fault` (one of FAULTS) is a deliberate defect for demos and tests;
    `splice=False` is the same as fault="no-splice"."""
    if fault is not None and fault not in FAULTS:
        raise ServerError(f"unknown fault {fault!r}; choose from {list(FAULTS)}")
    middlewares = [error_middleware, require_api_key(api_key)]
    app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY_BYTES)
    app[SERVER_NAME_KEY] = "policy"
    app[ENGINE_KEY] = engine
    app[MODEL_ID_KEY] = model_id
    app[SPLICE_KEY] = splice and fault != "no-splice"
    app[FAULT_KEY] = fault or ""
    app[API_KEY_KEY] = api_key
    app[TOKENIZE_EXECUTOR_KEY] = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gymnb-tokenize")
    app[MAX_PROMPT_CHARS_KEY] = engine.max_model_len * max_token_chars(engine.tokenizer)
    app.on_cleanup.append(shutdown_executor)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/health", health)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
    return app


async def shutdown_executor(app: web.Application) -> None:
    app[TOKENIZE_EXECUTOR_KEY].shutdown(wait=False, cancel_futures=True)


class PolicyServer:
    """The app on its own thread and event loop: for notebooks, tests and in-process trainers."""

    def __init__(self, engine: GenerationEngine, model_id: str, *, host: str = "127.0.0.1", port: int = 0,
                 api_key: str | None = None, splice: bool = True, fault: str | None = None):
        self.engine, self.model_id, self.host, self.api_key = engine, model_id, host, api_key
        self.port = port
        self._app = make_app(engine, model_id, api_key, splice=splice, fault=fault)
        self._serving: ServerLoop | None = None

    @classmethod
    def start(cls, model: str | LoadedModel, *, model_id: str | None = None, host: str = "127.0.0.1",
              port: int = 0, api_key: str | None = None, splice: bool = True, fault: str | None = None,
              **engine_opts) -> Self:
        """Load `model` (preset, path or LoadedModel), start serving; returns once the port is bound.

        `engine_opts`: dtype, device, chat_template, max_model_len (model loading) and the GenerationEngine
        options (threads, max_batch_size, max_batch_tokens, max_prefill_tokens, prefix_cache_bytes, ...).
        `splice=False` re-tokenizes history instead of splicing: a deliberate fault (see request_prompt_ids);
        `fault` names one of FAULTS.
        """
        load_opts = {k: engine_opts.pop(k) for k in LOAD_OPTIONS if k in engine_opts}
        loaded = model if isinstance(model, LoadedModel) else load_model(model, **load_opts)
        server = cls(GenerationEngine(loaded, **engine_opts), model_id or loaded.name, host=host, port=port,
                     api_key=api_key, splice=splice, fault=fault)
        server._start_thread()
        return server

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "", "localhost") else self.host
        return f"http://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def update_weights(self, state_dict: dict) -> None:
        """Swap in new weights once in-flight generations finish; requests after this see the new weights."""
        self.engine.update_weights(state_dict)

    def _start_thread(self) -> None:
        self._serving = ServerLoop("gymnb-server")
        try:
            url = self._serving.start_app(self._app, self.host, self.port)
        except EnvironmentServerError as exc:
            self._serving.stop()
            self._serving = None
            self.engine.close()
            raise ServerError(f"policy server could not listen on {self.host}:{self.port}: {exc}") from None
        self.port = int(url.rsplit(":", 1)[1])

    def stop(self) -> None:
        if self._serving is None:
            return
        self._serving.stop()
        self._serving = None
        self.engine.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def wait_until_ready(url: str, api_key: str | None, timeout: float = 30.0) -> None:
    """Poll GET /v1/models until it answers 200 (the readiness signal clients rely on)."""
    request = urllib.request.Request(url + "/v1/models")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(request, timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise ServerError(f"the server at {url} did not answer GET /v1/models: {exc}") from None
        time.sleep(0.1)


NO_SPLICE_BANNER = ("gymnb serve: FAULTY MODE (--no-splice): history is re-tokenized instead of spliced, so multi-turn "
                    "training on this server is off-policy. It exists to show the fault being caught: `gymnb validate "
                    "--base-url URL` must fail layer 04 against it. Do not train on it.")


def check_port_free(host: str, port: int) -> None:
    """One clear message when the port is taken, before anything slow starts."""
    if port == 0:
        return
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise ServerError(f"cannot listen on {host}:{port} ({exc.strerror}): another server holds the port. "
                              "Fix: stop it, or pick another port with --port N (0 for any free one).") from None


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="gymnb serve", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m",
                        help=f"preset ({', '.join(list_presets())}), local HF-format dir, or hub id")
    parser.add_argument("--model-id", default=None, help="served model name (default: the --model value)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    parser.add_argument("--port", type=int, default=8000, help="port (0 = any free port)")
    parser.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` (visible in `ps`: "
                                                        f"prefer --api-key-file or ${API_KEY_ENV})")
    parser.add_argument("--api-key-file", default=None, metavar="PATH", help="file holding the API key")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: the preset's)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (the most the engine uses)")
    parser.add_argument("--adapt-threads", action=argparse.BooleanOptionalAction, default=True,
                        help="shrink the engine's torch threads to the cores other processes leave free")
    parser.add_argument("--chat-template", default=None, help="template name in configs/templates or a file")
    parser.add_argument("--max-model-len", type=int, default=None, help="context length (default: preset's)")
    parser.add_argument("--max-batch-size", type=int, default=16, help="rows decoded together per step")
    parser.add_argument("--prefix-cache-mb", type=int, default=1024,
                        help="memory for KV reused across turns and shared system prompts (0 = off)")
    parser.add_argument("--no-splice", dest="splice", action="store_false",
                        help="FAULT for demos: re-tokenize history, no splice (validation catches it)")
    parser.add_argument("--fault", choices=FAULTS, default=None,
                        help="FAULT for demos and conformance tests (see gymnb.policy.server.FAULTS)")
    args = parser.parse_args(argv)
    check_port_free(args.host, args.port)  # before the model load, which takes seconds to minutes
    keep_freed_memory()  # before any thread allocates: one heap, kept (gymnb.policy.cpu_memory)
    threads = single_team_for_engine(args.threads)  # this process only serves: one OpenMP team, the engine's
    api_key = read_api_key(args.api_key, args.api_key_file)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    server = PolicyServer.start(
        args.model, model_id=args.model_id or args.model, host=args.host, port=args.port,
        api_key=api_key,
        dtype=args.dtype, device=args.device, threads=threads, chat_template=args.chat_template,
        max_model_len=args.max_model_len, max_batch_size=args.max_batch_size,
        prefix_cache_bytes=args.prefix_cache_mb << 20, adapt_threads=args.adapt_threads, splice=args.splice,
        fault=args.fault)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        wait_until_ready(server.url, api_key)
        print(f"gymnb serve: {server.model_id} ready at {server.url} (OpenAI base_url {server.base_url}; "
              f"{str(server.engine.model.dtype).removeprefix('torch.')} weights, matmul {server.engine.matmul})",
              flush=True)
        if not args.splice:
            print(NO_SPLICE_BANNER, flush=True)
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
