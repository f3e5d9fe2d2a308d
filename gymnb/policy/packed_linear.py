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
float32 rounding) and skipped (returns 0) where it is unavailable or disagrees.
"""

from __future__ import annotations

import logging
import types

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

PACKED_DTYPES = (torch.bfloat16, torch.float32)
BATCH_HINT = 16  # rows of a typical decode step; oneDNN picks the blocking for it, any row count works


def _packed_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
        return F.linear(x, self.weight, self.bias)  # a caller training this model: the packed op has no backward
    if self.weight._version != self.packed_version:  # changed in place (an optimizer step, load_state_dict)
        _pack(self)
    return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [None], "")


def _pack(linear: torch.nn.Linear) -> None:
    linear.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), BATCH_HINT)
    linear.packed_version = linear.weight._version
    linear.forward = types.MethodType(_packed_forward, linear)


def _agrees(linear: torch.nn.Linear) -> bool:
    """Whether the packed forward gives what `F.linear` gives on a random input of decode shape: exactly in
    bf16 (the same oneDNN kernel), to float32 rounding in float32 (another kernel than MKL's)."""
    x = torch.randn(3, 1, linear.in_features, dtype=linear.weight.dtype, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        packed, plain = _packed_forward(linear, x), F.linear(x, linear.weight, linear.bias)
    if linear.weight.dtype == torch.bfloat16:
        return torch.equal(packed, plain)
    return torch.allclose(packed, plain, rtol=1e-5, atol=1e-5 * float(plain.abs().max()))


def pack_linears(model: torch.nn.Module) -> int:
    """Pack the weights of every bf16 / float32 CPU Linear in `model` (again, if packed before); the number
    packed."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)
               and m.weight.dtype in PACKED_DTYPES and m.weight.device.type == "cpu"]
    if not linears or not torch.backends.mkldnn.is_available():
        return 0
    try:
        _pack(linears[0])
        exact = _agrees(linears[0])
    except (RuntimeError, AttributeError) as exc:  # no oneDNN matmul for this dtype on this CPU or torch build
        log.info("weight packing unavailable (%s): serving with F.linear", exc)
        exact = False
    if not exact:
        unpack_linears(model)
        return 0
    for linear in linears[1:]:
        _pack(linear)
    return len(linears)


def unpack_linears(model: torch.nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and "forward" in vars(m):
            del m.forward
            m.packed_weight = None
