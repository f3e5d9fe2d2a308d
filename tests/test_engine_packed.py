"""Weight packing (gymnb.policy.packed_linear) changes speed only: the oracle is the unpacked model.

Every comparison is against `F.linear` / an engine that does not pack, on the same weights: in bf16 exact
(bit-identical), since packing only skips oneDNN's per-call reorder of the weight; in float32 to float32
rounding, since the packed matmul is oneDNN's where `F.linear` is MKL's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gymnb.core.models import load_model
from gymnb.policy.engine import GenerationEngine, SamplingParams
from gymnb.policy.packed_linear import pack_linears

PROMPTS = ["Hi", "Tell me a story about a cat", "2+2=", "Why is the sky blue?"]
PARAMS = SamplingParams(max_tokens=16, temperature=1.0, seed=5, ignore_eos=True)


def sample(loaded, *, pack: bool, state_dict=None):
    engine = GenerationEngine(loaded, max_batch_size=4, pack_weights=pack)
    try:
        if state_dict is not None:
            engine.update_weights(state_dict)
        prompts = [loaded.tokenizer.encode(p) for p in PROMPTS]
        results = engine.generate_batch(prompts, PARAMS)
        return engine.num_packed, [(c[0].token_ids, c[0].log_probs) for c in results]
    finally:
        engine.close()


def perturbed(state_dict: dict) -> dict:
    generator = torch.Generator().manual_seed(1)
    return {k: v + 0.05 * torch.randn(v.shape, generator=generator).to(v.dtype) if v.is_floating_point() else v
            for k, v in state_dict.items()}


def test_a_packed_bf16_engine_samples_exactly_what_an_unpacked_one_does(tiny_model_dir):
    num_linears = sum(isinstance(m, torch.nn.Linear)
                      for m in load_model(str(tiny_model_dir), dtype="bfloat16").model.modules())
    packed_count, packed = sample(load_model(str(tiny_model_dir), dtype="bfloat16"), pack=True)
    _, plain = sample(load_model(str(tiny_model_dir), dtype="bfloat16"), pack=False)
    assert packed_count == num_linears  # every projection, the vocabulary head included
    assert packed == plain


def test_refit_weights_reach_the_packed_engine(tiny_model_dir):
    new_weights = perturbed(load_model(str(tiny_model_dir), dtype="bfloat16").model.state_dict())
    _, packed = sample(load_model(str(tiny_model_dir), dtype="bfloat16"), pack=True, state_dict=new_weights)
    _, plain = sample(load_model(str(tiny_model_dir), dtype="bfloat16"), pack=False, state_dict=new_weights)
    _, old = sample(load_model(str(tiny_model_dir), dtype="bfloat16"), pack=False)
    assert packed == plain and packed != old


def test_a_packed_layer_follows_in_place_updates_and_still_trains():
    linear = torch.nn.Linear(64, 96).to(torch.bfloat16)
    assert pack_linears(linear) == 1
    x = torch.randn(5, 1, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(linear(x), F.linear(x, linear.weight, linear.bias))
    with torch.no_grad():
        linear.weight.mul_(-2.0)  # an optimizer step or load_state_dict, outside the engine
    with torch.inference_mode():
        assert torch.equal(linear(x), F.linear(x, linear.weight, linear.bias))
    linear(x).float().sum().backward()  # a trainer sharing the model gets gradients, not an error
    expected = torch.ones(5, 1, 96).reshape(-1, 96).T.to(torch.bfloat16) @ x.reshape(-1, 64)
    assert torch.allclose(linear.weight.grad.float(), expected.float(), rtol=1e-2)


def test_float32_packing_agrees_to_rounding_and_samples_the_same_tokens(tiny_model_dir):
    """float32 packs onto oneDNN's kernel, not MKL's: outputs equal to float32 rounding, not bit-identical."""
    loaded = load_model(str(tiny_model_dir), dtype="float32")
    assert pack_linears(loaded.model) == sum(isinstance(m, torch.nn.Linear) for m in loaded.model.modules())
    with torch.inference_mode():
        for linear in (m for m in loaded.model.modules() if isinstance(m, torch.nn.Linear)):
            x = torch.randn(5, 1, linear.in_features)
            assert torch.allclose(linear(x), F.linear(x, linear.weight, linear.bias), rtol=1e-5, atol=1e-5)
    _, packed = sample(load_model(str(tiny_model_dir), dtype="float32"), pack=True)
    _, plain = sample(load_model(str(tiny_model_dir), dtype="float32"), pack=False)
    assert [tokens for tokens, _ in packed] == [tokens for tokens, _ in plain]
    worst = max(abs(a - b) for (_, x), (_, y) in zip(packed, plain, strict=True)
                for a, b in zip(x, y, strict=True))
    assert worst < 1e-4
