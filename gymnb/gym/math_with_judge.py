"""math_with_judge resources server: NeMo Gym's math environment (reward 1.0 iff the answer is right).

Verify, as NeMo Gym does: the text is every `output_text` of every `message` item of the response, joined;
math-verify extracts the prediction (plain expressions, then LaTeX: `Answer: 7`, `$\\frac{1}{2}$`,
`\\boxed{..}`) and compares it with the gold answer wrapped as `\\boxed{<expected_answer>}` (outer `\\(..\\)` or
`$..$` stripped first). The optional LLM judge (`should_use_judge`, off by default as in NeMo Gym's DAPO17k
config) runs only when the library says wrong; it asks the referenced model server twice, answers swapped,
and both must say `[[A=B]]`.

math-verify bounds its work with SIGALRM, which only works in a process's main thread, and sympy can wedge on
adversarial input; so verification runs in a few worker processes, and a verify that outlives
`library_verifier_timeout_seconds` scores 0 and its worker is replaced.

Endpoints: `POST /seed_session` (the row; nothing to seed), `POST /verify`, `POST /aggregate_metrics`, `GET /`.
Verify request: the row plus `response`. Verify response: the request's fields plus
`{"reward": 1.0, "extracted_answer": "7", "library_reward": 1.0, "judge_evaluations": null}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import sys

import aiohttp
from aiohttp import web

from gymnb.core.errors import ConfigError, RequestError
from gymnb.core.http import read_json
from gymnb.gym.common import check_row, check_verify_body, make_server_app, require_fields
from gymnb.gym.metrics import compute_aggregate_metrics

VERIFIER_KEY = web.AppKey("gymnb_math_verifier", object)

log = logging.getLogger(__name__)

JUDGE_SYSTEM_MESSAGE = (
    "Please act as an impartial judge and evaluate the equivalence of the solutions given by two AI assistants "
    "to the mathematical problem displayed below. You will be given AI assistant A's answer and AI assistant B's "
    "answer. Your job is to evaluate whether assistant A's answer is equivalent to assistant B's answer.\n\n"
    "Consider the mathematical equivalence of the answers above all other considerations; disregard formatting.\n\n"
    "After evaluating both answers for equivalence, output only one of the following verdicts with its label:\n\n"
    "1.  The AI assistants' answers are equivalent: [[A=B]]\n"
    "2.  The AI assistants' answers are different: [[A!=B]]\n\n"
    'Example output: "My final verdict is different [[A!=B]]".')
JUDGE_PROMPT = ("<|Problem|>\n{question}\n\n<|Start of Assistant A's Answer|>\n{first}\n<|End of Assistant A's "
                "Answer|>\n\n<|Start of Assistant B's Answer|>\n{second}\n<|End of Assistant B's Answer|>")
EQUAL_LABEL, NOT_EQUAL_LABEL = "[[A=B]]", "[[A!=B]]"


def strip_math_delimiters(answer: str) -> str:
    """`\\(x\\)` or `$x$` -> `x`: wrapped in `\\boxed{}` the delimiters would break gold parsing."""
    answer = answer.strip()
    if answer.startswith("\\(") and answer.endswith("\\)"):
        answer = answer[2:-2].strip()
    if len(answer) > 1 and answer.startswith("$") and answer.endswith("$"):
        answer = answer[1:-1].strip()
    return answer


def verify_math_answer(expected_answer: str, text: str) -> tuple[float, str | None]:
    """(reward 0/1, extracted answer or None) for `text` against `expected_answer`. Main thread only."""
    from math_verify import grader
    from math_verify.errors import TimeoutException
    from math_verify.metric import math_metric
    from math_verify.parser import ExprExtractionConfig, LatexExtractionConfig

    metric = math_metric(gold_extraction_target=(LatexExtractionConfig(),),
                         pred_extraction_target=(ExprExtractionConfig(), LatexExtractionConfig()))
    gold = "\\boxed{" + strip_math_delimiters(expected_answer) + "}"
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            score, extracted = metric([gold], [text])
            if extracted is None:
                return float(score), None
            golds, preds = extracted
            # The answer reported is the first prediction that matches a gold form, else the first prediction.
            match = next((p for p in preds if any(grader.verify(g, p) for g in golds)), None)
    except (Exception, TimeoutException):  # noqa: BLE001  any failure scores 0; TimeoutException is a BaseException
        return 0.0, None
    return float(score), match if match is not None else (preds[0] if preds else None)


class MathVerifier:
    """Worker processes running `verify_math_answer`, one request each at a time, bounded by `timeout_seconds`.

    Workers are plain `python -m gymnb.gym.math_with_judge --verify-worker` subprocesses speaking JSON lines:
    unlike multiprocessing they neither copy a threaded parent (fork) nor re-import the caller's script (spawn).
    A worker that times out or dies is killed and replaced; its verify scores 0, as in NeMo Gym.
    """

    def __init__(self, max_workers: int = 2, timeout_seconds: float = 10.0):
        self.max_workers = max(1, int(max_workers))
        self.timeout_seconds = float(timeout_seconds)
        self._idle: asyncio.Queue | None = None
        self._workers: set[asyncio.subprocess.Process] = set()

    async def _spawn(self) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gymnb.gym.math_with_judge", "--verify-worker",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
            limit=2**24)
        self._workers.add(proc)
        return proc

    async def verify(self, expected_answer: str, text: str) -> tuple[float, str | None]:
        if self._idle is None:
            self._idle = asyncio.Queue()
            for _ in range(self.max_workers):
                self._idle.put_nowait(None)  # a free slot; its worker starts on first use
        proc = await self._idle.get()
        result = {"reward": 0.0, "extracted_answer": None}
        try:
            if proc is None or proc.returncode is not None:
                proc = await self._spawn()
            proc.stdin.write((json.dumps({"expected_answer": expected_answer, "text": text}) + "\n").encode())
            await proc.stdin.drain()
            line = await asyncio.wait_for(proc.stdout.readline(), self.timeout_seconds)
            if not line:
                raise ConnectionError("verifier worker exited")
            result = json.loads(line)
        except (TimeoutError, ConnectionError, OSError, ValueError) as exc:
            log.warning("math-verify worker failed (%s); replacing it", type(exc).__name__)
            self._kill(proc)
            proc = None  # the free-slot marker: the next verify starts a worker
        except BaseException:  # cancelled mid-request: its late answer must not reach the next request
            self._kill(proc)
            proc = None
            raise
        finally:
            self._idle.put_nowait(proc)
        return result["reward"], result["extracted_answer"]

    def worker_pids(self) -> list[int]:
        return [proc.pid for proc in self._workers]

    def _kill(self, proc: asyncio.subprocess.Process | None) -> None:
        """Kill `proc` (if any); returns None, the free-slot marker that makes the next verify start a worker."""
        if proc is not None:
            self._workers.discard(proc)
            if proc.returncode is None:
                proc.kill()

    async def close(self) -> None:
        for proc in list(self._workers):
            self._kill(proc)
            await proc.wait()
        self._idle = None


def serve_verify_worker() -> None:
    """Worker loop: one JSON request per stdin line -> one JSON result per stdout line."""
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    for line in sys.stdin:
        request = json.loads(line)
        reward, extracted = verify_math_answer(request["expected_answer"], request["text"])
        sys.stdout.write(json.dumps({"reward": reward, "extracted_answer": extracted}) + "\n")
        sys.stdout.flush()


def response_text(response: dict) -> str:
    """All `output_text` of all `message` items, joined (what NeMo Gym verifies)."""
    parts = []
    for item in response.get("output") or []:
        if isinstance(item, dict) and item.get("type") == "message":
            for content in item.get("content") or []:
                if isinstance(content, dict) and content.get("type") == "output_text":
                    parts.append(content.get("text") or "")
    return "".join(parts)


async def judge_equal(session: aiohttp.ClientSession, config: dict, question: str, first: str,
                      second: str) -> tuple[bool, dict]:
    """Ask the judge model server whether `first` and `second` are equivalent; (equal, evaluation record)."""
    params = {**config.get("judge_responses_create_params", {}), "input": [
        {"role": "system", "content": JUDGE_SYSTEM_MESSAGE},
        {"role": "user", "content": JUDGE_PROMPT.format(question=question, first=first, second=second)}]}
    url = config["judge_model_server"]["url"] + "/v1/responses"
    async with session.post(url, json=params) as resp:
        body = await resp.json(content_type=None)
        if resp.status != 200:
            return False, {"responses_create_params": params, "error": body}
    evaluation = {"responses_create_params": params, "response": body}
    text = response_text({"output": (body.get("output") or [])[-1:]})
    equal_at, not_equal_at = text.find(EQUAL_LABEL), text.find(NOT_EQUAL_LABEL)
    return equal_at >= 0 and (not_equal_at < 0 or equal_at < not_equal_at), evaluation


def make_app(config: dict) -> web.Application:
    """The math_with_judge server for one instance's config (keys of configs/envs/math_with_judge.yaml)."""
    app = make_server_app(config.get("name", "math_with_judge"))
    verifier = app[VERIFIER_KEY] = MathVerifier(config.get("library_verifier_max_concurrency", 2),
                                                config.get("library_verifier_timeout_seconds", 10.0))
    use_judge = bool(config.get("should_use_judge", False))
    if use_judge and "url" not in (config.get("judge_model_server") or {}):
        raise ConfigError("math_with_judge: should_use_judge is set but judge_model_server names no running model "
                          "server (start it through gymnb.gym.start_gym so that the reference gets a url)")

    async def seed_session(request: web.Request) -> web.Response:
        body = await read_json(request)
        check_row(body)
        require_fields(body, {"question": str, "expected_answer": str})
        return web.json_response({})

    async def verify(request: web.Request) -> web.Response:
        body = await read_json(request)
        check_verify_body(body)
        require_fields(body, {"question": str, "expected_answer": str})
        text = response_text(body["response"])
        library_reward, extracted = await verifier.verify(body["expected_answer"], text)
        reward, evaluations = library_reward, None
        if use_judge and library_reward <= 0.5:
            reward, evaluations = await run_judge(body, extracted or text)
        return web.json_response({**body, "reward": reward, "extracted_answer": extracted,
                                  "library_reward": library_reward, "judge_evaluations": evaluations})

    async def run_judge(body: dict, answer: str) -> tuple[float, list[dict]]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
            equal, first = await judge_equal(session, config, body["question"], body["expected_answer"], answer)
            if not equal:
                return 0.0, [first]
            equal, second = await judge_equal(session, config, body["question"], answer, body["expected_answer"])
            return float(equal), [first, second]

    async def aggregate_metrics(request: web.Request) -> web.Response:
        body = await read_json(request)
        require_fields(body, {"verify_responses": list})
        for i, item in enumerate(body["verify_responses"]):
            if not isinstance(item, dict):
                raise RequestError(f"verify_responses[{i}] must be an object", param=f"verify_responses[{i}]",
                                   status=422)
            require_fields(item, {"reward": (int, float)}, prefix=f"verify_responses[{i}].")
        return web.json_response(compute_aggregate_metrics(
            body["verify_responses"], score_fn=math_scores, answer_key="extracted_answer"))

    async def close_verifier(app: web.Application) -> None:
        await verifier.close()

    app.router.add_post("/seed_session", seed_session)
    app.router.add_post("/verify", verify)
    app.router.add_post("/aggregate_metrics", aggregate_metrics)
    app.on_cleanup.append(close_verifier)
    return app


def math_scores(response: dict) -> dict[str, float]:
    """Scores that NeMo Gym's math metrics report: accuracy, symbolic (library) accuracy, judge accuracy."""
    scores = {"accuracy": response["reward"]}
    if "library_reward" in response:
        scores["symbolic_accuracy"] = response["library_reward"]
    if response.get("judge_evaluations") is not None:
        scores["judge_accuracy"] = response["reward"]
    return scores


if __name__ == "__main__" and sys.argv[1:] == ["--verify-worker"]:
    serve_verify_worker()
