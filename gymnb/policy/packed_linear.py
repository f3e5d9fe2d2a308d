"""Policy server, matmuls on weights laid out once for oneDNN (bf16 and float32).

A bf16 `nn.Linear` on the CPU runs oneDNN's AMX matmul, which first reorders the weight into its blocked
layout, on every call. In a decode step of a few rows that reorder is a large part of the work: on
SmolLM2-135M's shapes (16 rows, one thread) the 576x1536 projection takes 314 us as `F.linear` and 205 us on a
weight packed once, the 576x49152 vocabulary projection 15.1 ms and 9.1 ms, with bit-identical outputs (the
same oneDNN kernel, minus the reorder).

In float32 the gain is larger where torch's default matmul (MKL) is slow: on a 2-core AMD EPYC (AVX-512,
no AMX), 16 rows, two threads, 576x1536 took 258 us as `F.linear` and 151 us packed, the vocabulary
projection 22.4 ms and 7.5 ms. There the outputs are another kernel's, equal to float32 rounding (checked:
relative 1e-5), not bit-identical, and the engine's log-probs stay within float32 rounding of the trainer's.

`pack_linears(model)` packs every bf16 or float32 Linear of the engine's model and routes its forward through
the packed weight; a weight changed in place since (an optimizer step, `load_state_dict`) is packed again on
its next forward, and a forward that needs gradients takes `F.linear`, so a model shared with a trainer stays
correct. Packing is checked on the first layer against `F.linear` (bf16: bit-identical; float32: within
float32 rounding; bf16 on float32 units: within one bf16 rounding) and skipped (returns 0) where it is
unavailable or disagrees.

A CPU without bf16 matmul instructions (no AVX-512 BF16/AMX; oneDNN then needs at least AVX-512BW to pack
bf16) runs a bf16 `F.linear` on a generic kernel: on a 2-core AMD EPYC with AVX2 only, 16 rows, the 576x1536
projection took 1.9 ms, the vocabulary projection 59 ms, 3.5x slower server-wide than float32. bf16 converts
to float32 exactly, and that kernel accumulates in float32 and rounds its output to bf16 once; so there each
bf16 weight is packed as float32 and the matmul runs oneDNN's float32 kernel on the input converted up,
rounding its output to bf16: the same computation in another summation order, 4x faster (422 us, 14.3 ms).
Outputs then equal `F.linear`'s to one bf16 rounding step (measured: 1e-4 of the elements differ, each by
one unit in the last place), not bit-identical; packing is checked to that tolerance.
The packed copy then takes float32's memory (twice the bf16 weights': 0.5 GB for SmolLM2-135M).
"""

from __future__ import annotations

import logging
import types

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

PACKED_DTYPES = (torch.bfloat16, torch.float32)
BATCH_HINT = 16  # rows of a typical decode step; oneDNN picks the blocking for it, any row count works
# At one or two rows (a lone request's decode step) MKL's float32 `F.linear` runs a matrix-vector kernel that
# beats the packed matmul: SmolLM2-135M's 30 layers of projections took 16.4 vs 20.2 ms at 1 row and 17.1 vs
# 22.9 ms at 2, and 28.3 vs 22.2 ms at 4 (2 cores, AVX-512). bf16 `F.linear` reorders its weight per call.
FEW_ROWS = 2


def _few_float32_rows(x: torch.Tensor, compute_dtype: torch.dtype) -> bool:
    """Whether MKL's float32 matrix-vector path beats the packed matmul for `x` (see FEW_ROWS)."""
    return x.dtype == compute_dtype == torch.float32 and x.numel() <= FEW_ROWS * x.shape[-1]


def _packed_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
        return F.linear(x, self.weight, self.bias)  # a caller training this model: the packed op has no backward
    if _few_float32_rows(x, self.compute_dtype):
        return F.linear(x, self.weight, self.bias)
    if self.weight._version != self.packed_version:  # changed in place (an optimizer step, load_state_dict)
        _pack(self, self.compute_dtype)
    return _packed_matmul(x, self.packed_weight, self.packed_bias, self.compute_dtype)


def _packed_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   compute_dtype: torch.dtype) -> torch.Tensor:
    """x @ weight.T + bias on a weight packed for `compute_dtype`; bf16 inputs on float32 units go up exactly
    and the output is rounded to bf16 once, as the bf16 kernel does (module docstring)."""
    if compute_dtype == x.dtype:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [None], "")
    out = torch.ops.mkldnn._linear_pointwise(x.to(compute_dtype), weight, bias, "none", [None], "")
    return out.to(x.dtype)


def _pack(linear: torch.nn.Linear, compute_dtype: torch.dtype) -> None:
    """Pack `linear`'s weight for oneDNN in `compute_dtype` (its own dtype, or float32 for bf16 weights on a
    CPU without bf16 matmul: exact, bf16 converts to float32 without rounding)."""
    weight = linear.weight.detach()
    linear.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight.to(compute_dtype), BATCH_HINT)
    linear.packed_bias = None if linear.bias is None else linear.bias.detach().to(compute_dtype)
    linear.packed_version = linear.weight._version
    linear.compute_dtype = compute_dtype
    linear.forward = types.MethodType(_packed_forward, linear)


def _agrees(linear: torch.nn.Linear) -> bool:
    """Whether the packed forward gives what `F.linear` gives on a random input of decode shape: exactly on
    bf16 units (the same oneDNN kernel), to float32 rounding in float32 (another kernel than MKL's), to one
    bf16 rounding for bf16 on float32 units (another summation order before the output's rounding)."""
    dtype = linear.weight.dtype
    x = torch.randn(3, 1, linear.in_features, dtype=dtype, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        packed, plain = _packed_forward(linear, x).float(), F.linear(x, linear.weight, linear.bias).float()
    if dtype == linear.compute_dtype == torch.bfloat16:
        return torch.equal(packed, plain)
    rtol = 2.0 ** -7 if dtype == torch.bfloat16 else 1e-5  # one unit in the last place of a bf16 value
    return torch.allclose(packed, plain, rtol=rtol, atol=1e-5 * float(plain.abs().max()))


def _pack_checked(linear: torch.nn.Linear, compute_dtype: torch.dtype) -> bool:
    try:
        _pack(linear, compute_dtype)
        return _agrees(linear)
    except (RuntimeError, AttributeError) as exc:  # no oneDNN matmul for this dtype on this CPU or torch build
        log.info("no packed %s matmul for %s weights here (%s)", compute_dtype, linear.weight.dtype, exc)
        return False


def pack_linears(model: torch.nn.Module, compute_dtypes: tuple[torch.dtype, ...] | None = None) -> int:
    """Pack the weights of every bf16 / float32 CPU Linear in `model` (again, if packed before); the number
    packed. `compute_dtypes`: the matmul dtypes to try, first that works wins; by default the weights' own,
    then for bf16 weights float32 (a CPU without bf16 matmul: module docstring)."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)
               and m.weight.dtype in PACKED_DTYPES and m.weight.device.type == "cpu"]
    if not linears or not torch.backends.mkldnn.is_available():
        return 0
    dtype = linears[0].weight.dtype
    choices = compute_dtypes or ((dtype, torch.float32) if dtype == torch.bfloat16 else (dtype,))
    compute_dtype = next((choice for choice in choices if _pack_checked(linears[0], choice)), None)
    if compute_dtype is None:
        unpack_linears(model)
        log.info("weight packing unavailable: serving with F.linear")
        return 0
    for linear in linears[1:]:
        _pack(linear, compute_dtype)
    return len(linears)


def matmul_path(model: torch.nn.Module) -> str:
    """How the model's Linear layers multiply, for /health and logs: 'packed bfloat16', 'packed float32',
    'packed float32 for bfloat16 weights' (a CPU without bf16 matmul) or 'F.linear'."""
    linear = next((m for m in model.modules() if isinstance(m, torch.nn.Linear) and "forward" in vars(m)), None)
    if linear is None:
        return "F.linear"
    compute, weights = (str(dtype).removeprefix("torch.") for dtype in (linear.compute_dtype, linear.weight.dtype))
    return f"packed {compute}" if compute == weights else f"packed {compute} for {weights} weights"


class PackedGroup:
    """Linear layers that read the same input (a layer's q/k/v projections; its gate and up projections) as one
    matmul: their weights stacked and packed once, the outputs side by side in the last dimension.

    In a decode step of 16 rows each matmul is small, and a small oneDNN matmul costs more per weight than a
    larger one: on SmolLM2-135M (2 cores, AVX-512, 16 rows, 60 cached tokens) a lean decode step took 1.07x
    (float32) and 1.09x (bf16) as long with the projections apart, rotary included (gymnb.policy.lean_decode).
    Each output column is the same dot product as in its own layer's matmul, computed by the same kernel:
    the outputs were bit-identical there; tests/test_lean_decode.py checks it on every machine.

    The stacked copy is packed again on the first call after any member's weight changed (an optimizer step,
    `load_state_dict`: the weight's version moves, as `pack_linears` checks per layer). Members that are not
    packed (`pack_linears` was not run, or found no packed matmul) run as their own forward, concatenated.
    The packed copy is a second copy of the members' weights: SmolLM2-135M in float32, 0.28 GB more.
    """

    def __init__(self, linears: list[torch.nn.Linear]):
        self.linears = linears
        self.sizes = [linear.out_features for linear in linears]
        self._key = None  # the members' (weight, version, compute dtype) at packing time
        self.weight = self.bias = self.compute_dtype = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if (torch.is_grad_enabled() or not all("forward" in vars(linear) for linear in self.linears)
                or _few_float32_rows(x, self.linears[0].compute_dtype)):
            # unpacked, a caller training, or the rows `F.linear` serves faster: each member's own forward
            return torch.cat([linear(x) for linear in self.linears], dim=-1)
        key = [(id(lin.weight), lin.weight._version, lin.compute_dtype) for lin in self.linears]
        if key != self._key:
            self._pack(key)
        return _packed_matmul(x, self.weight, self.bias, self.compute_dtype)

    def _pack(self, key: list) -> None:
        compute_dtypes = {lin.compute_dtype for lin in self.linears}
        if len(compute_dtypes) != 1:
            raise ValueError(f"the group's layers are packed for different dtypes: {compute_dtypes}")
        self.compute_dtype = compute_dtypes.pop()
        weight = torch.cat([lin.weight.detach() for lin in self.linears]).to(self.compute_dtype)
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, BATCH_HINT)
        self.bias = None
        if any(lin.bias is not None for lin in self.linears):
            self.bias = torch.cat([lin.weight.new_zeros(lin.out_features) if lin.bias is None else
                                   lin.bias.detach() for lin in self.linears]).to(self.compute_dtype)
        self._key = key


def unpack_linears(model: torch.nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and "forward" in vars(m):
            del m.forward
            m.packed_weight = m.packed_bias = None
