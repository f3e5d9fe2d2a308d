"""Policy server: an OpenAI-compatible HTTP front for the batching engine, returning the ids it sampled.

Endpoints (vLLM shapes; see gymnb.chat for the request schema):
    GET  /v1/models            {"object": "list", "data": [{"id": MODEL_ID, "max_model_len": ...}]}
    GET  /health               {"status": "ok", "num_active", "num_waiting", "stats"} (needs no API key)
    POST /v1/chat/completions  chat.completion; every choices[i].message has prompt_token_ids,
                               generation_token_ids, generation_log_probs
    POST /tokenize             {"messages", "tools"?, ...} or {"prompt": str}
                               -> {"tokens", "count", "max_model_len"}; for messages exactly the prompt ids
                               the chat path would use, splice included
    POST /detokenize           {"tokens": [...]} -> {"prompt": str}

Log-prob convention: see gymnb.engine. Errors: OpenAI-style `{"error": {"message", "type", "param", "code"}}`
with a 4xx for every client fault; a 5xx means a bug in gymnb, and the server keeps serving after either.

In a notebook, test or trainer::

    with PolicyServer.start("smollm2-135m") as server:   # or a LoadedModel
        client = openai.OpenAI(base_url=server.base_url, api_key="none")
        ...
        server.update_weights(trainer_model.state_dict())   # refit between training steps
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import signal
import sys
import threading
import time
import urllib.request
from typing import Self

from aiohttp import web

from gymnb.chat import (
    build_chat_response,
    check_model,
    parse_chat_request,
    parse_messages,
    parse_tools,
    require_object,
)
from gymnb.engine import GenerationEngine
from gymnb.errors import EnvironmentServerError, RequestError, ServerError
from gymnb.gym.common import ServerLoop
from gymnb.models import LoadedModel, list_presets, load_model
from gymnb.splice import build_prompt_ids, check_token_ids, render_ids

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 256 * 1024 * 1024  # long multi-turn token histories are big; refusing them would be our bug
LOAD_OPTIONS = ("dtype", "device", "threads", "chat_template", "max_model_len")
ENGINE_KEY = web.AppKey("engine", GenerationEngine)
MODEL_ID_KEY = web.AppKey("model_id", str)
SPLICE_KEY = web.AppKey("splice", bool)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> web.Response:
    kind = {401: "authentication_error", 404: "invalid_request_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return web.json_response(body, status=status)


@web.middleware
async def handle_errors(request: web.Request, handler):
    try:
        return await handler(request)
    except RequestError as exc:
        return error_body(exc.status, str(exc), exc.param, exc.code)
    except web.HTTPException as exc:  # unknown route, wrong method, body too large
        return error_body(exc.status, f"{exc.reason}: {request.method} {request.path}", code=None)
    except Exception as exc:  # a gymnb bug: log it, answer 500, keep serving
        log.exception("internal error on %s", request.path)
        return error_body(500, f"internal server error: {type(exc).__name__}: {exc}")


def require_api_key(api_key: str | None):
    @web.middleware
    async def check_key(request: web.Request, handler):
        if api_key is not None and request.path != "/health":
            given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), api_key.encode()):
                return error_body(401, "missing or incorrect API key: send `Authorization: Bearer <key>`",
                                  code="invalid_api_key")
        return await handler(request)

    return check_key


async def read_json(request: web.Request):
    raw = await request.read()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(f"the request body is not valid JSON: {exc}", code="invalid_json") from None


async def list_models(request: web.Request) -> web.Response:
    engine, model_id = request.app[ENGINE_KEY], request.app[MODEL_ID_KEY]
    card = {"id": model_id, "object": "model", "created": 0, "owned_by": "gymnb",
            "max_model_len": engine.max_model_len}
    return web.json_response({"object": "list", "data": [card]})


async def health(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    body = {"status": "ok", "num_active": engine.num_active, "num_waiting": engine.num_waiting,
            "stats": dict(engine.stats)}
    return web.json_response(body)


async def chat_completions(request: web.Request) -> web.Response:
    engine, model_id = request.app[ENGINE_KEY], request.app[MODEL_ID_KEY]
    chat = parse_chat_request(await read_json(request), model_id=model_id)
    prompt_ids = request_prompt_ids(request.app, chat.messages, chat.tools, chat.chat_template_kwargs,
                                    chat.required_prefix_token_ids)
    completions = await engine.generate(prompt_ids, chat.sampling)
    return web.json_response(build_chat_response(chat, model_id, prompt_ids, completions, engine.tokenizer))


async def tokenize(request: web.Request) -> web.Response:
    engine, model_id = request.app[ENGINE_KEY], request.app[MODEL_ID_KEY]
    body = require_object(await read_json(request))
    check_model(body, model_id)
    if "messages" in body:
        add_generation_prompt = body.get("add_generation_prompt", True)
        if not isinstance(add_generation_prompt, bool):
            raise RequestError("add_generation_prompt must be a boolean", param="add_generation_prompt")
        kwargs = body.get("chat_template_kwargs")
        if kwargs is not None and not isinstance(kwargs, dict):
            raise RequestError("chat_template_kwargs must be an object", param="chat_template_kwargs")
        messages, tools = parse_messages(body["messages"]), parse_tools(body.get("tools"))
        prefix = body.get("required_prefix_token_ids")
        tokens = request_prompt_ids(request.app, messages, tools, kwargs, prefix,
                                    add_generation_prompt=add_generation_prompt)
    elif isinstance(body.get("prompt"), str):
        add_special = body.get("add_special_tokens", True)
        tokens = engine.tokenizer.encode(body["prompt"], add_special_tokens=bool(add_special))
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
    tokenizer = app[ENGINE_KEY].tokenizer
    if not app[SPLICE_KEY]:
        return render_ids(tokenizer, messages, tools, chat_template_kwargs, add_generation_prompt)
    return build_prompt_ids(tokenizer, messages, tools, chat_template_kwargs, required_prefix_token_ids,
                            add_generation_prompt=add_generation_prompt)


async def detokenize(request: web.Request) -> web.Response:
    engine, model_id = request.app[ENGINE_KEY], request.app[MODEL_ID_KEY]
    body = require_object(await read_json(request))
    check_model(body, model_id)
    check_token_ids(body.get("tokens"), "tokens", engine.vocab_size)
    return web.json_response({"prompt": engine.tokenizer.decode(body["tokens"])})


def make_app(engine: GenerationEngine, model_id: str, api_key: str | None = None, *,
             splice: bool = True) -> web.Application:
    middlewares = [handle_errors, require_api_key(api_key)]
    app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY_BYTES)
    app[ENGINE_KEY] = engine
    app[MODEL_ID_KEY] = model_id
    app[SPLICE_KEY] = splice
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/health", health)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
    return app


class PolicyServer:
    """The app on its own thread and event loop: for notebooks, tests and in-process trainers."""

    def __init__(self, engine: GenerationEngine, model_id: str, *, host: str = "127.0.0.1", port: int = 0,
                 api_key: str | None = None, splice: bool = True):
        self.engine, self.model_id, self.host, self.api_key = engine, model_id, host, api_key
        self.port = port
        self._app = make_app(engine, model_id, api_key, splice=splice)
        self._serving: ServerLoop | None = None

    @classmethod
    def start(cls, model: str | LoadedModel, *, model_id: str | None = None, host: str = "127.0.0.1",
              port: int = 0, api_key: str | None = None, splice: bool = True, **engine_opts) -> Self:
        """Load `model` (preset, path or LoadedModel), start serving; returns once the port is bound.

        `engine_opts`: dtype, device, threads, chat_template, max_model_len (model loading) and the
        GenerationEngine options (max_batch_size, max_batch_tokens, max_prefill_tokens, prefix_cache_bytes).
        `splice=False` re-tokenizes history instead of splicing: a deliberate fault (see request_prompt_ids).
        """
        load_opts = {k: engine_opts.pop(k) for k in LOAD_OPTIONS if k in engine_opts}
        loaded = model if isinstance(model, LoadedModel) else load_model(model, **load_opts)
        server = cls(GenerationEngine(loaded, **engine_opts), model_id or loaded.name, host=host, port=port,
                     api_key=api_key, splice=splice)
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
    parser.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY`")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: the preset's)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--chat-template", default=None, help="template name in configs/templates or a file")
    parser.add_argument("--max-model-len", type=int, default=None, help="context length (default: preset's)")
    parser.add_argument("--max-batch-size", type=int, default=16, help="rows decoded together per step")
    parser.add_argument("--prefix-cache-mb", type=int, default=1024,
                        help="memory for KV reused across turns and shared system prompts (0 = off)")
    parser.add_argument("--no-splice", dest="splice", action="store_false",
                        help="FAULT for demos: re-tokenize history, no splice (validation catches it)")
    args = parser.parse_args(argv)
    check_port_free(args.host, args.port)  # before the model load, which takes seconds to minutes
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    server = PolicyServer.start(
        args.model, model_id=args.model_id or args.model, host=args.host, port=args.port,
        api_key=args.api_key,
        dtype=args.dtype, device=args.device, threads=args.threads, chat_template=args.chat_template,
        max_model_len=args.max_model_len, max_batch_size=args.max_batch_size,
        prefix_cache_bytes=args.prefix_cache_mb << 20, splice=args.splice)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        wait_until_ready(server.url, args.api_key)
        print(f"gymnb serve: {server.model_id} ready at {server.url} (OpenAI base_url {server.base_url})",
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
