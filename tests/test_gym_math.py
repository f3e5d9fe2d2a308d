"""math_with_judge: math-verify semantics (right, wrong, unparseable, LaTeX forms), the server's 4xx, metrics."""

from __future__ import annotations

import asyncio
import json
import os
import signal

import aiohttp
import pytest
from nemo_gym_data import example_file

from gymnb.core.http import ServerLoop
from gymnb.gym.math_with_judge import VERIFIER_KEY, make_app, strip_math_delimiters, verify_math_answer
from gymnb.gym.metrics import compute_aggregate_metrics

REAL_ROWS = example_file("math_with_judge")


@pytest.mark.parametrize("expected, text", [
    ("7", "3 + 4 = 7\nAnswer: 7"),
    ("-3", "So the value is negative.\nAnswer: -3"),
    ("\\frac{1}{2}", "Answer: 0.5"),                         # decimal vs LaTeX fraction
    ("\\(\\frac{1}{2}\\)", "Answer: $\\frac{1}{2}$"),        # gold in \( \) as NeMo Gym rows write it
    ("$\\frac{5}{6}$", "Answer: 5/6"),
    ("\\frac{5}{6}", "The sum is \\boxed{\\dfrac{5}{6}}."),   # \dfrac in a box
    ("\\(\\sqrt{2}\\)", "Answer: $\\sqrt 2$"),
    ("32", "\\boxed{32}"),
])
def test_right_answers_score_one(expected, text):
    reward, extracted = verify_math_answer(expected, text)
    assert reward == 1.0 and extracted is not None


@pytest.mark.parametrize("expected, text, extracted", [
    ("7", "Answer: 8", "8"),
    ("\\frac{1}{2}", "Answer: $\\frac{1}{3}$", "1/3"),
    ("\\(\\sqrt{2}\\)", "Answer: 2", "2"),
])
def test_wrong_answers_score_zero_and_report_the_extraction(expected, text, extracted):
    assert verify_math_answer(expected, text) == (0.0, extracted)


@pytest.mark.parametrize("text", ["I am not sure.", "", "Answer: \\frac{"])
def test_unparseable_answers_score_zero(text):
    reward, extracted = verify_math_answer("7", text)
    assert reward == 0.0 and extracted is None


def test_gold_delimiters_are_stripped():
    assert strip_math_delimiters(" \\(\\frac{333}{1997}\\) ") == "\\frac{333}{1997}"
    assert strip_math_delimiters("$x$") == "x" and strip_math_delimiters("$") == "$"


def test_real_nemo_gym_golds_parse():
    """Each real row's gold, answered verbatim, scores 1 (the \\( \\) wrapping must not break parsing)."""
    rows = [json.loads(line) for line in REAL_ROWS.read_text().splitlines()]
    for row in rows:
        answer = strip_math_delimiters(row["expected_answer"])
        assert verify_math_answer(row["expected_answer"], f"Answer: ${answer}$")[0] == 1.0, row["expected_answer"]


def message(text: str) -> dict:
    return {"output": [{"type": "reasoning", "summary": [{"type": "summary_text", "text": "Answer: 99"}]},
                       {"type": "message", "role": "assistant",
                        "content": [{"type": "output_text", "text": text}]}]}


@pytest.fixture(scope="module")
def math_app():
    loop = ServerLoop("test-math")
    app = make_app({"name": "math_with_judge", "library_verifier_max_concurrency": 1})
    yield app, loop.start_app(app)
    loop.stop()


@pytest.fixture(scope="module")
def math_url(math_app):
    return math_app[1]


def post(url: str, body) -> tuple[int, dict]:
    async def go():
        data = body if isinstance(body, str) else json.dumps(body)
        async with aiohttp.ClientSession() as http, http.post(url, data=data) as resp:
            return resp.status, await resp.json()
    return asyncio.run(go())


def row(expected="12", **extra) -> dict:
    return {"responses_create_params": {"input": [{"role": "user", "content": "What is 5 + 7?"}]},
            "question": "What is 5 + 7?", "expected_answer": expected, **extra}


def test_verify_reads_only_message_text_and_echoes_the_row(math_url):
    status, body = post(math_url + "/verify", {**row(tier=0), "response": message("5 + 7 = 12.\nAnswer: 12")})
    assert status == 200
    assert (body["reward"], body["library_reward"], body["extracted_answer"]) == (1.0, 1.0, "12")
    assert body["judge_evaluations"] is None and body["tier"] == 0 and body["question"] == "What is 5 + 7?"
    # The reasoning item says 99: only message output_text counts, so a right message still wins and 99 loses.
    status, body = post(math_url + "/verify", {**row("99"), "response": message("Answer: 12")})
    assert body["reward"] == 0.0


@pytest.mark.parametrize("body, status, param", [
    ({"responses_create_params": {"input": "q"}, "question": "q", "response": {"output": []}}, 422,
     "expected_answer"),
    ({**row(), "response": {"output": "nope"}}, 422, "response.output"),
    ({**row(), "responses_create_params": {"input": "q", "max_tokens": 5}, "response": {"output": []}}, 422,
     "responses_create_params.max_tokens"),
    ({**row(), "expected_answer": 12, "response": {"output": []}}, 422, "expected_answer"),
    ("{not json", 400, None),
])
def test_malformed_verify_requests_get_4xx_naming_the_field(math_url, body, status, param):
    got_status, got = post(math_url + "/verify", body)
    assert got_status == status and got["error"]["param"] == param
    assert post(math_url + "/seed_session", row())[0] == 200  # and the server keeps serving


def test_a_killed_verifier_worker_is_replaced(math_app, math_url):
    verifier = math_app[0][VERIFIER_KEY]
    """A dead worker (sympy wedged and killed, OOM) costs at most one verify a 0; then verifies are right again."""
    good = {**row(), "response": message("Answer: 12")}
    assert post(math_url + "/verify", good)[1]["reward"] == 1.0
    (pid,) = verifier.worker_pids()
    os.kill(pid, signal.SIGKILL)
    status, body = post(math_url + "/verify", good)
    assert status == 200 and body["reward"] in (0.0, 1.0)  # 0 if the death is noticed mid-request
    assert post(math_url + "/verify", good)[1]["reward"] == 1.0
    assert pid not in verifier.worker_pids() and len(verifier.worker_pids()) == 1


def test_aggregate_metrics_match_hand_computation(math_url):
    responses = [
        {"_ng_task_index": 0, "_ng_rollout_index": 0, "reward": 1.0, "library_reward": 1.0, "extracted_answer": "7"},
        {"_ng_task_index": 0, "_ng_rollout_index": 1, "reward": 0.0, "library_reward": 0.0, "extracted_answer": "8"},
        {"_ng_task_index": 1, "_ng_rollout_index": 0, "reward": 0.0, "library_reward": 0.0, "extracted_answer": None},
        {"_ng_task_index": 1, "_ng_rollout_index": 1, "reward": 0.0, "library_reward": 0.0, "extracted_answer": "3"},
    ]
    status, body = post(math_url + "/aggregate_metrics", {"verify_responses": responses})
    metrics = body["agent_metrics"]
    assert status == 200 and metrics["mean/reward"] == 0.25
    assert metrics["pass@1[avg-of-2]/accuracy"] == 25.0   # mean over tasks of (1/2, 0/2)
    assert metrics["pass@2/accuracy"] == 50.0             # task 0 solved within 2 tries, task 1 not
    assert metrics["pass@1/accuracy"] == 25.0             # unbiased: task 0 is 1 - C(1,1)/C(2,1) = 0.5
    assert metrics["pass@2/no_answer"] == 50.0
    assert [g["_ng_task_index"] for g in body["group_level_metrics"]] == [0, 1]
    assert body["key_metrics"]["pass@1[avg-of-2]/accuracy"] == 25.0
    assert compute_aggregate_metrics([]) == {"group_level_metrics": [], "agent_metrics": {}, "key_metrics": {}}
    status, body = post(math_url + "/aggregate_metrics", {"verify_responses": [{"_ng_task_index": 0}]})
    assert status == 422 and body["error"]["param"] == "verify_responses[0].reward"


@pytest.mark.parametrize("verdicts, reward, num_evaluations", [
    (["My final verdict is equivalent [[A=B]]", "Same: [[A=B]]"], 1.0, 2),
    (["They differ [[A!=B]] not [[A=B]]"], 0.0, 1),          # the first label that appears decides
    (["[[A=B]]", "no label at all"], 0.0, 2),                 # both orders must agree
])
def test_judge_runs_only_when_the_library_says_wrong(verdicts, reward, num_evaluations):
    """The judge is a model server reference: here the real model server in front of a scripted endpoint."""
    from aiohttp import web

    from gymnb.gym import model_server

    asked = []

    async def chat(request):
        body = await request.json()
        asked.append(body["messages"])
        text = verdicts[min(len(asked), len(verdicts)) - 1]
        return web.json_response({"choices": [{"index": 0, "finish_reason": "stop",
                                               "message": {"role": "assistant", "content": text}}]})

    judge_endpoint = web.Application()
    judge_endpoint.router.add_post("/v1/chat/completions", chat)
    loop = ServerLoop("test-judge")
    try:
        endpoint_url = loop.start_app(judge_endpoint)
        judge_url = loop.start_app(model_server.make_app({"name": "judge", "base_url": endpoint_url + "/v1",
                                                          "model": "judge", "return_token_id_information": False}))
        url = loop.start_app(make_app({"name": "math_with_judge", "should_use_judge": True,
                                       "library_verifier_max_concurrency": 1,
                                       "judge_model_server": {"type": "responses_api_models", "name": "judge",
                                                              "url": judge_url},
                                       "judge_responses_create_params": {"input": [], "temperature": 0.0}}))
        status, body = post(url + "/verify", {**row("\\frac{1}{2}"), "response": message("Answer: one half")})
        assert status == 200 and body["library_reward"] == 0.0
        assert body["reward"] == reward and len(body["judge_evaluations"]) == num_evaluations
        first_prompt = asked[0][1]["content"]
        assert "one half" in first_prompt.split("Assistant B's Answer|>")[1]  # gold first, then swapped
        if len(asked) > 1:
            assert "one half" in asked[1][1]["content"].split("Assistant B's Answer|>")[0]
        asked.clear()
        _, body = post(url + "/verify", {**row("12"), "response": message("Answer: 12")})
        assert body["reward"] == 1.0 and body["judge_evaluations"] is None and asked == []
    finally:
        loop.stop()
