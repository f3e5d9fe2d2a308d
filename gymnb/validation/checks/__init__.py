"""Validation stage: the per-layer checks that the five validation notebooks call.

One module per layer (`endpoint` 01, `roundtrip` 02, `collection` 03, `continuity` 04, `gradients` 05), plus
the layer result every notebook writes (`result`), the integration under test (`integration`) and plots.
Heavy modules (torch, the server) are imported by the functions that need them, so importing this package is
cheap.
"""

from gymnb.validation.checks.integration import (
    Integration,
    connect,
    find_rollouts,
    layer_output_dir,
    load_rollouts,
    policy_model,
)
from gymnb.validation.checks.result import (
    LAYERS,
    Check,
    LayerFailed,
    LayerResult,
    raise_if_failed,
    write_results,
)

__all__ = ["LAYERS", "Check", "Integration", "LayerFailed", "LayerResult", "connect", "find_rollouts",
           "layer_output_dir", "load_rollouts", "policy_model", "raise_if_failed", "write_results"]
