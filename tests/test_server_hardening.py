"""Policy server against hostile clients: out-of-range sampling values, template swaps, pathological JSON and
huge prompts are 4xx naming the problem; a valid request next to a hostile one is served; the event loop keeps
answering while a prompt is being tokenized; the API key is checked the one documented way."""

from __future__ import annotations

import json
import socket
import threading
import urllib.request

import pytest

from gymnb.core.models import load_model
from gymnb.policy.server import PolicyServer

USER = [{"role": "user", "content": "hi"}]
DEEP = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"

HOSTILE_CHAT = {
    "top_k past int64": ({"messages": USER, "top_k": 2**63}, "top_k"),
    "top_k past the vocabulary": ({"messages": USER, "top_k": 10**6}, "top_k"),
    "seed past int64": ({"messages": USER, "seed": 2**64}, "seed"),
    "seed below int64": ({"messages": USER, "seed": -(2**63) - 1}, "seed"),
    "max_tokens past int32": ({"messages": USER, "max_tokens": 2**40}, "max_tokens"),
    "max_completion_tokens past int32": ({"messages": USER, "max_completion_tokens": 2**31}, "max_completion_tokens"),
    "stop string of a megabyte": ({"messages": USER, "stop": "x" * 2**20}, "stop"),
    "template swapped": ({"messages": USER, "chat_template_kwargs": {"chat_template": "{{ 'pwned' }}"}},
                         "chat_template_kwargs.chat_template"),
    "template tokenizes": ({"messages": USER, "chat_template_kwargs": {"tokenize": True}},
                           "chat_template_kwargs.tokenize"),
    "tools through the template": ({"messages": USER, "chat_template_kwargs": {"tools": [{"x": 1}]}},
                                   "chat_template_kwargs.tools"),
    "documents through the template": ({"messages": USER, "chat_template_kwargs": {"documents": [{"t": "x"}]}},
                                       "chat_template_kwargs.documents"),
    "lone surrogate in content": ({"messages": [{"role": "user", "content": "a\ud800b"}]},
                                  "body.messages[0].content"),
    "lone surrogate in a key": ({"messages": USER, "\udc00": 1}, "body.\udc00"),
    "JSON 100,000 deep": (DEEP, None),
    "not UTF-8": (b'{"messages": "\xff\xfe"}', None),
}


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir), max_model_len=256)
    with PolicyServer.start(loaded, model_id="tiny", api_key="sekret") as server:
        yield server


def call(server, path: str, body, headers=None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(server.url + path, data=data, method="POST" if data else "GET",
                                     headers={"Content-Type": "application/json", "Authorization": "Bearer sekret",
                                              **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def assert_openai_400(status: int, body: dict, param: str | None) -> None:
    assert status == 400, body
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["message"]
    assert body["error"]["param"] == param


def assert_serving(server) -> None:
    status, body = call(server, "/v1/chat/completions", {"messages": USER, "max_tokens": 2})
    assert status == 200 and len(body["choices"][0]["message"]["generation_token_ids"]) == 2


@pytest.mark.parametrize("case", list(HOSTILE_CHAT))
def test_hostile_chat_request_is_a_400_naming_the_field(server, case):
    body, param = HOSTILE_CHAT[case]
    assert_openai_400(*call(server, "/v1/chat/completions", body), param)
    assert_serving(server)


def test_template_variables_still_reach_the_template(server):
    body = {"messages": USER, "max_tokens": 1, "chat_template_kwargs": {"enable_thinking": False}}
    assert call(server, "/v1/chat/completions", body)[0] == 200


@pytest.mark.parametrize("path,body,param", [
    ("/tokenize", {"prompt": "x" * 2**20}, "prompt"),
    ("/tokenize", {"messages": [{"role": "user", "content": "x" * 2**20}]}, "messages"),
    ("/tokenize", {"prompt": "\udfff"}, "body.prompt"),
    ("/tokenize", DEEP, None),
    ("/tokenize", {"messages": USER, "chat_template_kwargs": {"chat_template": "x"}},
     "chat_template_kwargs.chat_template"),
    ("/detokenize", b'{"tokens": ' + b"[" * 5000 + b"]" * 5000 + b"}", None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 2**20}]}, "messages"),
])
def test_hostile_tokenize_and_oversized_prompts_are_400s(server, path, body, param):
    status, reply = call(server, path, body)
    assert_openai_400(status, reply, param)
    if param in ("prompt", "messages"):
        assert reply["error"]["code"] == "context_length_exceeded" and "characters" in reply["error"]["message"]
    assert_serving(server)


def test_a_valid_request_beside_a_hostile_one_is_served(server):
    results = {}

    def valid():
        results["valid"] = call(server, "/v1/chat/completions", {"messages": USER, "max_tokens": 40,
                                                                 "temperature": 1.0, "ignore_eos": True})

    thread = threading.Thread(target=valid)
    thread.start()
    hostile = [call(server, "/v1/chat/completions", {"messages": USER, "top_k": 2**63, "temperature": 1.0})
               for _ in range(5)]
    thread.join()
    assert all(status == 400 for status, _ in hostile)
    status, body = results["valid"]
    assert status == 200 and len(body["choices"][0]["message"]["generation_token_ids"]) == 40


def test_health_answers_while_a_prompt_is_being_tokenized(server, monkeypatch):
    """Tokenizing is held inside the tokenizer; /health must answer before it is let go."""
    tokenizer = server.engine.tokenizer
    entered, release = threading.Event(), threading.Event()
    encode = tokenizer.encode

    def held_encode(*args, **kwargs):
        entered.set()
        release.wait(120)
        return encode(*args, **kwargs)

    monkeypatch.setattr(tokenizer, "encode", held_encode)
    result = {}
    thread = threading.Thread(target=lambda: result.update(reply=call(server, "/tokenize", {"prompt": "hello"})))
    thread.start()
    try:
        assert entered.wait(60)
        with urllib.request.urlopen(server.url + "/health", timeout=30) as resp:
            assert resp.status == 200 and not release.is_set()  # answered while the tokenizer was held
    finally:
        release.set()
        thread.join()
    assert result["reply"][0] == 200 and result["reply"][1]["count"] > 0


def test_the_key_is_a_bearer_token_and_guards_the_counters(server):
    status, body = call(server, "/v1/chat/completions", {"messages": USER, "max_tokens": 1},
                        headers={"Authorization": "sekret"})
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert call(server, "/v1/chat/completions", {"messages": USER, "max_tokens": 1},
                headers={"Authorization": "bearer sekret"})[0] == 200  # the scheme is case-insensitive
    with urllib.request.urlopen(server.url + "/health", timeout=30) as resp:
        assert json.loads(resp.read()) == {"status": "ok"}  # liveness for anyone, no traffic counters
    request = urllib.request.Request(server.url + "/health", headers={"Authorization": "Bearer sekret"})
    with urllib.request.urlopen(request, timeout=30) as resp:
        assert json.loads(resp.read())["stats"]["requests"] > 0


def test_a_too_large_header_gets_an_openai_error(server):
    """aiohttp refuses it before any handler runs; the answer still has the OpenAI error shape."""
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 10_000 + b"\r\n\r\n")
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith((b"HTTP/1.0 400", b"HTTP/1.1 400"))
    error = json.loads(body)["error"]
    assert error["code"] == "header_too_large" and error["type"] == "invalid_request_error"
    assert_serving(server)
