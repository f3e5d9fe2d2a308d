"""The lean decode step (gymnb.policy.lean_decode) changes speed only.

Oracles: transformers' own forward of the same model, on the same KV cache (bit-identical logits) and on the
whole sequence without a cache (close: another evaluation order); and an engine that decodes with
transformers' forward (identical tokens and log-probs) through everything the engine does to its batch:
left padding, newcomers merged mid-generation, rows retired, prefix-cache reuse, refits, and more steps than
a cache buffer's spare columns (the same tokens; log-probs up to rounding, see the test).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from gymnb.core.models import load_model
from gymnb.policy.engine import GenerationEngine, SamplingParams, cache_argument
from gymnb.policy.lean_decode import SPARE_COLUMNS, LeanDecoder, supports
from gymnb.policy.packed_linear import pack_linears


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def loaded(request, tiny_model_dir):
    return load_model(str(tiny_model_dir), dtype=request.param, max_model_len=1024)


def prefill(model, ids, mask):
    name = cache_argument(model)
    out = model(input_ids=ids, attention_mask=mask, use_cache=True)
    return getattr(out, name), name


@pytest.mark.parametrize("packed", [False, True], ids=["F.linear", "packed"])
def test_a_step_gives_transformers_logits_on_the_same_cache(loaded, packed):
    """Packed, the step's grouped projections (q/k/v, gate/up: one matmul each) against the model's own
    packed layers one by one: the same kernel on the same columns, so the same bits."""
    model = copy.deepcopy(loaded.model)
    assert not packed or pack_linears(model) > 0
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (3, 7), generator=generator)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, :3] = mask[2, :5] = 0  # left padding, as the engine lays rows out
    with torch.inference_mode():
        cache, name = prefill(model, ids, mask)
        lean_cache = copy.deepcopy(cache)
        positions = mask.sum(dim=1)
        decoder = LeanDecoder(model)
        for step in range(SPARE_COLUMNS + 5):  # past the first buffer's spare columns
            token = torch.randint(0, 1000, (3,), generator=generator)
            mask = F.pad(mask, (0, 1), value=1)
            expected = model(input_ids=token[:, None], attention_mask=mask, position_ids=positions[:, None],
                             use_cache=True, **{name: cache}).logits[:, -1]
            assert torch.equal(decoder.step(token, positions, mask, lean_cache), expected), step
            positions = positions + 1
        for plain, lean in zip(cache.layers, lean_cache.layers, strict=True):
            assert torch.equal(plain.keys, lean.keys) and torch.equal(plain.values, lean.values)
    assert (decoder.qkv[0].weight is not None) == packed  # the grouped matmul ran where it could


def test_steps_follow_the_whole_sequence_forward(tiny_model_dir):
    """Incremental decoding agrees with one uncached forward of the finished sequence (float32)."""
    model = load_model(str(tiny_model_dir), dtype="float32", max_model_len=1024).model
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1000, (2, 20), generator=generator)
    with torch.inference_mode():
        cache, _ = prefill(model, ids[:, :5], torch.ones(2, 5, dtype=torch.long))
        decoder = LeanDecoder(model)
        stepped = [decoder.step(ids[:, t], torch.full((2,), t), torch.ones(2, t + 1, dtype=torch.long), cache)
                   for t in range(5, 20)]
        whole = model(input_ids=ids).logits[:, 5:]
    assert torch.allclose(torch.stack(stepped, dim=1), whole, atol=1e-4)


def sample(loaded, *, lean: bool, refit=None):
    engine = GenerationEngine(loaded, max_batch_size=3, prefix_cache_bytes=1 << 24, lean_decode=lean)
    try:
        assert (engine.lean is not None) == lean
        tokenizer = loaded.tokenizer
        prompts = [tokenizer.encode(p) for p in ["Hi", "Tell me a story about a cat", "2+2=", "Why?", "Bye"]]
        # Unequal lengths: rows retire at different steps, queued requests join the running batch.
        params = [SamplingParams(max_tokens=n, temperature=1.0, seed=i, ignore_eos=True)
                  for i, n in enumerate([SPARE_COLUMNS + 10, 5, 30, 12, 40])]
        first = [f.result() for f in engine.submit_many(list(zip(prompts, params, strict=True)))]
        # A second turn extends a finished sequence: its prefix comes from the prefix cache.
        follow = prompts[1] + first[1][0].token_ids + tokenizer.encode(" and then?")
        second = engine.submit(follow, SamplingParams(max_tokens=20, temperature=1.0, seed=9)).result()
        assert engine.stats["cached_prompt_tokens"] > 0
        if refit is not None:
            engine.update_weights(refit)
        third = engine.generate_batch(prompts[:2], SamplingParams(max_tokens=8, temperature=0))
        return [(c.token_ids, c.log_probs) for group in first + [second] + third for c in group]
    finally:
        engine.close()


def test_an_engine_decoding_lean_samples_what_transformers_forward_samples(loaded):
    weights = {k: v * 1.01 if v.is_floating_point() else v for k, v in loaded.model.state_dict().items()}
    lean = sample(copy.deepcopy(loaded), lean=True, refit=weights)
    plain = sample(copy.deepcopy(loaded), lean=False, refit=weights)
    # Same tokens; log-probs equal up to float rounding: once no row of the batch is padded, transformers
    # drops the mask and runs its other GQA kernel path (enable_gqa), where the lean step keeps one path.
    assert [tokens for tokens, _ in lean] == [tokens for tokens, _ in plain]
    worst = max(abs(a - b) for (_, x), (_, y) in zip(lean, plain, strict=True)
                for a, b in zip(x, y, strict=True))
    assert worst < (1e-5 if loaded.model.dtype == torch.float32 else 2e-2)


def test_models_of_another_shape_keep_transformers_forward(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    assert "gpt2" in supports(model)
