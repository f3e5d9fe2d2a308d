"""Layer checks without notebooks: each catches the fault it exists for, against real servers on loopback."""

from __future__ import annotations

import pytest

from gymnb.core.models import cache_dir, load_model, make_tiny_model
from gymnb.rollouts.collect import RolloutRun
from gymnb.validation.checks.collection import check_rollout_collection
from gymnb.validation.checks.continuity import chat, check_token_continuity, output_item, run_multiturn_probe
from gymnb.validation.checks.gradients import check_gradient_flow
from gymnb.validation.checks.integration import connect


@pytest.fixture(scope="module")
def servers(tiny_model_dir):
    """The same tiny model served twice: splicing (correct) and re-tokenizing history (the fault)."""
    from gymnb.policy.server import PolicyServer

    with PolicyServer.start(str(tiny_model_dir), model_id="tiny", threads=1) as good, \
            PolicyServer.start(str(tiny_model_dir), model_id="tiny", threads=1, splice=False) as bad:
        yield connect(good.url, need_gym=False), connect(bad.url, need_gym=False)


def test_splice_probes_continue_on_a_splicing_server_and_break_on_a_retokenizing_one(servers, tokenizer, tmp_path):
    good, bad = servers
    none = check_token_continuity([], tokenizer, probes=run_multiturn_probe(good, tokenizer, num_turns=0),
                                  output_dir=tmp_path / "none")
    assert [c.name for c in none.checks if not c.ok] == ["every rollout is continuous across its model calls"]
    assert "no rollouts to check" in none.reason  # an empty collection never passes vacuously
    ok = check_token_continuity([single_turn_rollout(good, "Hi", 1.0)], tokenizer,
                                probes=run_multiturn_probe(good, tokenizer, num_turns=0), output_dir=tmp_path / "good")
    assert ok.passed, ok.reason
    broken = check_token_continuity([], tokenizer, probes=run_multiturn_probe(bad, tokenizer, num_turns=0),
                                    output_dir=tmp_path / "bad")
    verdicts = {c.name: (c.ok, c.detail) for c in broken.checks}
    ok_bpe, detail_bpe = verdicts["probe splice_bpe: continuous over 2 model calls"]
    ok_tool, detail_tool = verdicts["probe splice_tool_call: continuous over 2 model calls"]
    assert not ok_bpe and "BPE merge" in detail_bpe
    assert not ok_tool and "tool-call re-render" in detail_tool
    assert "Token view of the first divergence (probe splice_bpe)" in broken.details_html


def single_turn_rollout(integration, prompt: str, temperature: float) -> dict:
    messages = [{"role": "user", "content": prompt}]
    completion, ids = chat(integration, messages, max_tokens=12, temperature=temperature)
    return {"responses_create_params": {"input": messages, "temperature": temperature},
            "response": {"output": [output_item(completion["choices"][0]["message"], ids)]}, "reward": 0.0}


def test_gradient_flow_agrees_with_served_weights_and_catches_stale_ones(servers, tiny_model_dir, tmp_path):
    good, _ = servers
    rollouts = [single_turn_rollout(good, p, t) for p, t in (("Hi there", 1.0), ("Count to five", 0.7))]
    same = check_gradient_flow(rollouts, load_model(str(tiny_model_dir)), output_dir=tmp_path / "same")
    assert same.passed, same.reason
    assert same.figures["token_mult_prob_error"] < 1.0001  # the temperature of each rollout is honoured
    assert same.figures["num_generated_tokens"] == 24
    stale_dir = make_tiny_model(cache_dir() / "tiny" / "llama-2x64-seed1", seed=1)  # other weights, same tokenizer
    stale = check_gradient_flow(rollouts, load_model(str(stale_dir)), output_dir=tmp_path / "stale")
    assert not stale.passed and stale.reason.startswith("token_mult_prob_error <= 1.05")
    assert stale.figures["token_mult_prob_error"] > 1.05


def test_collection_check_names_failures_bad_rewards_and_missing_token_fields(servers, tmp_path):
    good, _ = servers
    fine = single_turn_rollout(good, "Hello", 1.0)
    no_tokens = {"response": {"output": [{"type": "message", "role": "assistant", "content": []}]}, "reward": 1.0}
    bad_reward = {**single_turn_rollout(good, "Hi", 1.0), "reward": 3.0}
    failure = {"_ng_task_index": 3, "_ng_rollout_index": 0, "error_class": "http_5xx", "message": "agent died"}
    run = RolloutRun(results=[fine, no_tokens, bad_reward], failures=[failure], metrics={})
    result = check_rollout_collection(run, num_expected=4, output_dir=tmp_path)
    failed = {c.name: c.detail for c in result.checks if not c.ok}
    assert failed["every row returned a rollout"].startswith("3 of 4 rollouts, 1 failed: row 3 repeat 0: http_5xx")
    assert failed["each reward is a number in [0, 1]"] == "bad rewards (rollout, value): [(2, 3.0)]"
    assert "rollouts without token fields: [1]" in failed[
        "each rollout has trainable outputs (items with generation_token_ids)"]
    assert (tmp_path / "reward_histogram.png").exists()


def test_endpoint_layer_reads_ids_as_nemo_gym_and_names_what_a_faulty_server_gets_wrong(servers, tiny_model_dir,
                                                                                        tmp_path):
    """A correct server passes with all three sources agreeing; a server that writes logprobs tokens as text
    fails naming the field; a plain chat server (no token ids anywhere) fails, and the later checks still run."""
    from gymnb.policy.server import PolicyServer
    from gymnb.validation.checks.endpoint import check_endpoint

    good, _ = servers
    passed = check_endpoint(good.base_url, output_dir=tmp_path / "good")
    assert passed.passed, passed.reason
    assert passed.figures["token_id_sources"] == ["message", "return_token_ids", "logprobs+tokenize"]
    assert passed.figures["token_id_source"] == "message"
    for fault, first_failure, detail in (
            ("token-text", "logprobs tokens are token_id:<N>", "ignored return_tokens_as_token_ids"),
            ("no-token-fields", "logprobs tokens are token_id:<N>", "no choices[0].logprobs.content")):
        with PolicyServer.start(str(tiny_model_dir), model_id="tiny", threads=1, fault=fault) as server:
            result = check_endpoint(server.url, output_dir=tmp_path / fault)
        failed = [c for c in result.checks if not c.ok]
        assert failed[0].name.startswith(first_failure) and detail in failed[0].detail, failed
        assert "POST /tokenize (plain prompt)" in {c.name for c in result.checks}  # the later checks still ran
        if fault == "token-text":
            reading = next(c for c in result.checks if c.name == "token ids readable as NeMo Gym reads them")
            assert not reading.ok and "choices[0].logprobs.content[0].token" in reading.detail
        else:
            reading = next(c for c in result.checks if c.name == "token ids readable as NeMo Gym reads them")
            assert not reading.ok and "no token ids in any shape" in reading.detail
