"""Weight packing (gymnb.policy.packed_linear) changes speed only: the oracle is the unpacked model.

Every comparison is against `F.linear` / an engine that does not pack, on the same weights: on bf16 units
exact (bit-identical), since packing only skips oneDNN's per-call reorder of the weight; in float32 to float32
rounding, since the packed matmul is oneDNN's where `F.linear` is MKL's; bf16 weights on float32 units (a CPU
without bf16 matmul, or forced) to one bf16 rounding, since only the summation order before it differs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gymnb.core.models import load_model
from gymnb.policy.engine import GenerationEngine, SamplingParams
from gymnb.policy.packed_linear import matmul_path, pack_linears


def has_bf16_units() -> bool:
    """Whether oneDNN packs bf16 weights on this CPU (AVX-512BW/VL/DQ at least; AMX or AVX-512 BF16 for speed)."""
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(8, 8, dtype=torch.bfloat16), 1)
    except RuntimeError:
        return False
    return True


BF16_UNITS = has_bf16_units()
BF16_COMPUTE = [pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not BF16_UNITS, reason="this CPU has no bf16 matmul for oneDNN; the float32-units case runs instead")),
    torch.float32]


def within_one_bf16_rounding(packed: torch.Tensor, plain: torch.Tensor) -> bool:
    packed, plain = packed.float(), plain.float()
    return torch.allclose(packed, plain, rtol=2.0 ** -7, atol=1e-5 * float(plain.abs().max()))

PROMPTS = ["Hi", "Tell me a story about a cat", "2+2=", "Why is the sky blue?"]
PARAMS = SamplingParams(max_tokens=16, temperature=1.0, seed=5, ignore_eos=True)


def sample(loaded, *, pack: bool, state_dict=None, compute_dtype=None):
    """Tokens and log-probs of PROMPTS; `compute_dtype` packs the model for it before the engine starts (the
    engine then keeps that packing), otherwise the engine packs as it does by default (or not: `pack`)."""
    if compute_dtype is not None:
        assert pack_linears(loaded.model, compute_dtypes=(compute_dtype,)) > 0
    engine = GenerationEngine(loaded, max_batch_size=4, pack_weights=pack and compute_dtype is None)
    try:
        if state_dict is not None:
            engine.update_weights(state_dict)
        prompts = [loaded.tokenizer.encode(p) for p in PROMPTS]
        results = engine.generate_batch(prompts, PARAMS)
        return engine.matmul, [(c[0].token_ids, c[0].log_probs) for c in results]
    finally:
        engine.close()


def assert_same_samples(packed, plain, *, exact: bool) -> None:
    if exact:
        assert packed == plain
        return
    assert [tokens for tokens, _ in packed] == [tokens for tokens, _ in plain]
    worst = max(abs(a - b) for (_, x), (_, y) in zip(packed, plain, strict=True) for a, b in zip(x, y, strict=True))
    assert worst < 1e-3


def perturbed(state_dict: dict) -> dict:
    generator = torch.Generator().manual_seed(1)
    return {k: v + 0.05 * torch.randn(v.shape, generator=generator).to(v.dtype) if v.is_floating_point() else v
            for k, v in state_dict.items()}


def test_a_bf16_engine_packs_on_the_cpus_bf16_units_or_else_on_its_float32_units(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir), dtype="bfloat16")
    num_linears = sum(isinstance(m, torch.nn.Linear) for m in loaded.model.modules())
    assert matmul_path(loaded.model) == "F.linear"
    assert pack_linears(loaded.model) == num_linears  # every projection, the vocabulary head included
    expected = "packed bfloat16" if BF16_UNITS else "packed float32 for bfloat16 weights"
    assert matmul_path(loaded.model) == expected


@pytest.mark.parametrize("compute_dtype", BF16_COMPUTE)
def test_a_packed_bf16_engine_samples_what_an_unpacked_one_does(tiny_model_dir, compute_dtype):
    """Bit-identical on bf16 units; on float32 units the same tokens, log-probs to bf16 rounding."""
    path, packed = sample(load_model(str(tiny_model_dir), dtype="bfloat16"), pack=True, compute_dtype=compute_dtype)
    _, plain = sample(load_model(str(tiny_model_dir), dtype="bfloat16"), pack=False)
    assert path.startswith(f"packed {str(compute_dtype).removeprefix('torch.')}")
    assert_same_samples(packed, plain, exact=compute_dtype == torch.bfloat16)


@pytest.mark.parametrize("compute_dtype", BF16_COMPUTE)
def test_refit_weights_reach_the_packed_engine(tiny_model_dir, compute_dtype):
    """The oracle packs the same way, from the new weights at start: the same kernels, so the same bits. (An
    unpacked engine is no exact oracle on float32 units: after one bf16 rounding step apart, temperature-1
    sampling of a perturbed tiny model can pick another token a dozen tokens in, as it did on an AVX-512 CPU.)"""
    new_weights = perturbed(load_model(str(tiny_model_dir), dtype="bfloat16").model.state_dict())
    _, refit = sample(load_model(str(tiny_model_dir), dtype="bfloat16"), pack=True, state_dict=new_weights,
                      compute_dtype=compute_dtype)
    fresh = load_model(str(tiny_model_dir), dtype="bfloat16")
    fresh.model.load_state_dict(new_weights)
    _, expected = sample(fresh, pack=True, compute_dtype=compute_dtype)
    _, old = sample(load_model(str(tiny_model_dir), dtype="bfloat16"), pack=True, compute_dtype=compute_dtype)
    assert_same_samples(refit, expected, exact=True)
    assert [tokens for tokens, _ in refit] != [tokens for tokens, _ in old]


@pytest.mark.parametrize("compute_dtype", BF16_COMPUTE)
def test_a_packed_layer_follows_in_place_updates_and_still_trains(compute_dtype):
    linear = torch.nn.Linear(64, 96).to(torch.bfloat16)
    assert pack_linears(linear, compute_dtypes=(compute_dtype,)) == 1
    x = torch.randn(5, 1, 64, dtype=torch.bfloat16)
    same = torch.equal if compute_dtype == torch.bfloat16 else within_one_bf16_rounding
    with torch.inference_mode():
        before = linear(x)
        assert before.dtype == torch.bfloat16 and same(before, F.linear(x, linear.weight, linear.bias))
    with torch.no_grad():
        linear.weight.mul_(-2.0)  # an optimizer step or load_state_dict, outside the engine
    with torch.inference_mode():
        assert same(linear(x), F.linear(x, linear.weight, linear.bias))
        assert not within_one_bf16_rounding(linear(x), before)
    linear(x).float().sum().backward()  # a trainer sharing the model gets gradients, not an error
    expected = torch.ones(5, 1, 96).reshape(-1, 96).T.to(torch.bfloat16) @ x.reshape(-1, 64)
    assert torch.allclose(linear.weight.grad.float(), expected.float(), rtol=1e-2)


def test_bf16_on_float32_units_rounds_once_like_the_bf16_kernel():
    """Each output is the float32 accumulation rounded to bf16: a few elements differ from `F.linear`'s by one
    rounding step (another summation order), none by more, and both are as close to the exact product."""
    generator = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(576, 1536, bias=True)
    with torch.no_grad():
        linear.weight.normal_(0, 0.05, generator=generator)
    linear = linear.to(torch.bfloat16)
    x = torch.randn(16, 1, 576, generator=generator).to(torch.bfloat16)
    with torch.inference_mode():
        plain = F.linear(x, linear.weight, linear.bias)
        exact = F.linear(x.double(), linear.weight.double(), linear.bias.double())
        assert pack_linears(linear, compute_dtypes=(torch.float32,)) == 1
        packed = linear(x)
    assert packed.dtype == torch.bfloat16
    assert within_one_bf16_rounding(packed, plain)
    assert (packed != plain).float().mean() < 0.01
    # one bf16 rounding of the exact product: within half a unit in the last place (2^-9 relative), and a
    # little more where float32 summation moved a value across a rounding boundary
    assert torch.allclose(packed.double(), exact, rtol=2.0 ** -8, atol=1e-4)
    assert torch.allclose(plain.double(), exact, rtol=2.0 ** -8, atol=1e-4)


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
