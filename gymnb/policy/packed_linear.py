"""Policy server, bf16 matmuls on weights laid out once for oneDNN.

A bf16 `nn.Linear` on the CPU runs oneDNN's AMX matmul, which first reorders the weight into its blocked
layout, on every call. In a decode step of a few rows that reorder is a large part of the work: on
SmolLM2-135M's shapes (16 rows, one thread) the 576x1536 projection takes 314 us as `F.linear` and 205 us on a
weight packed once, the 576x49152 vocabulary projection 15.1 ms and 9.1 ms, with bit-identical outputs (the
same oneDNN kernel, minus the reorder).

`pack_linears(model)` packs every bf16 Linear of the engine's model and routes its forward through the packed
weight; a weight changed in place since (an optimizer step, `load_state_dict`) is packed again on its next
forward, and a forward that needs gradients takes `F.linear`, so a model shared with a trainer stays
correct. Packing is checked on the first layer against `F.linear` and skipped (returns 0) where it is
unavailable or not exact, so the engine's log-probs never depend on it.
"""

from __future__ import annotations

import logging
import types

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

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


def _exact(linear: torch.nn.Linear) -> bool:
    """Whether the packed forward gives exactly what `F.linear` gives, on a random input of decode shape."""
    x = torch.randn(3, 1, linear.in_features, dtype=linear.weight.dtype, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        return torch.equal(_packed_forward(linear, x), F.linear(x, linear.weight, linear.bias))


def pack_linears(model: torch.nn.Module) -> int:
    """Pack the weights of every bf16 CPU Linear in `model` (again, if packed before); the number packed."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)
               and m.weight.dtype == torch.bfloat16 and m.weight.device.type == "cpu"]
    if not linears or not torch.backends.mkldnn.is_available():
        return 0
    try:
        _pack(linears[0])
        exact = _exact(linears[0])
    except (RuntimeError, AttributeError) as exc:  # no oneDNN bf16 matmul on this CPU or torch build
        log.info("bf16 weight packing unavailable (%s): serving with F.linear", exc)
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
