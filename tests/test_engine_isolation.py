"""Generation engine under faults: one row's failure stays its own, a refit never splits a request's choices."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from test_server import model_log_probs

from gymnb.core.errors import ServerError
from gymnb.core.models import load_model
from gymnb.policy.engine import GenerationEngine, SamplingParams


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(str(tiny_model_dir), max_model_len=512)


def test_a_row_whose_sampling_fails_fails_alone(loaded):
    """top_k past int64 overflows the batched sampling tensors; the valid rows sharing its batch finish."""
    engine = GenerationEngine(loaded, max_batch_size=8)
    try:
        prompt = loaded.tokenizer.encode("Tell me a story about a cat")
        good = SamplingParams(max_tokens=12, temperature=1.0, seed=3, ignore_eos=True)
        hostile = SamplingParams(max_tokens=12, temperature=1.0, top_k=2**63, seed=3, ignore_eos=True)
        valid, bad, valid_too = engine.submit_many([(prompt, good), (prompt, hostile), (prompt, good)])
        with pytest.raises(ServerError, match="generation failed for this request"):
            bad.result(timeout=120)
        for future in (valid, valid_too):
            (completion,) = future.result(timeout=120)
            assert len(completion.token_ids) == 12
        (alone,) = engine.submit(prompt, good).result(timeout=120)
        assert alone.token_ids == completion.token_ids  # the failure left the batch's state intact
    finally:
        engine.close()


def test_a_row_failing_while_others_decode_leaves_them_running(loaded):
    """A hostile request joining a running batch fails on admission; the running row keeps decoding."""
    engine = GenerationEngine(loaded, max_batch_size=8)
    try:
        prompt = loaded.tokenizer.encode("Why is the sky blue?")
        running = engine.submit(prompt, SamplingParams(max_tokens=80, temperature=0, ignore_eos=True))
        while engine.num_active == 0 and not running.done():
            time.sleep(0.001)
        hostile = engine.submit(prompt, SamplingParams(max_tokens=5, temperature=0.7, top_k=2**63))
        with pytest.raises(ServerError):
            hostile.result(timeout=120)
        (completion,) = running.result(timeout=120)
        assert len(completion.token_ids) == 80
        expected = model_log_probs(loaded.model, prompt, completion.token_ids, 0)
        assert torch.allclose(torch.tensor(completion.log_probs), expected, atol=1e-4)
    finally:
        engine.close()


def test_refit_waits_for_every_choice_of_a_request(tiny_model_dir):
    """n=6 with 2 rows per batch: the refit requested after the first rows start lands after all six."""
    loaded = load_model(str(tiny_model_dir), max_model_len=512)
    old_model = load_model(str(tiny_model_dir), max_model_len=512).model
    engine = GenerationEngine(loaded, max_batch_size=2)
    try:
        prompt = loaded.tokenizer.encode("List three fruits")
        params = SamplingParams(max_tokens=10, temperature=1.0, seed=11, n=6, ignore_eos=True)
        request = engine.submit(prompt, params)
        while engine.num_active == 0 and not request.done():
            time.sleep(0.001)  # the first two rows run: the request is in flight
        new_state = {k: v + 0.05 * torch.randn_like(v) for k, v in loaded.model.state_dict().items()}
        swapper = threading.Thread(target=engine.update_weights, args=(new_state,))
        swapper.start()
        choices = request.result(timeout=300)
        swapper.join()
        assert len(choices) == 6
        for choice in choices:
            expected_old = model_log_probs(old_model, prompt, choice.token_ids, 1.0)
            assert torch.allclose(torch.tensor(choice.log_probs), expected_old, atol=1e-4)
        (after,) = engine.submit(prompt, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)).result()
        expected_new = model_log_probs(loaded.model, prompt, after.token_ids, 0)
        assert torch.allclose(torch.tensor(after.log_probs), expected_new, atol=1e-4)
    finally:
        engine.close()
