"""Model names as users type them: a typo or an unreachable hub id fails at once, with the closest preset."""

from __future__ import annotations

import pytest


def test_a_mistyped_model_name_fails_before_transformers_loads_with_a_suggestion(tmp_path):
    """No hub retries for a name that can only be a typo: the error comes before transformers is imported."""
    import subprocess
    import sys

    code = ("import sys\nfrom gymnb.core.errors import ModelLoadError\nfrom gymnb.core.models import load_model\n"
            "try:\n    load_model('smollm2-135')\nexcept ModelLoadError as exc:\n    print(exc)\n"
            "print('transformers imported:', 'transformers' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "unknown model 'smollm2-135'" in out and "did you mean smollm2-135m?" in out
    assert "transformers imported: False" in out


def test_a_hub_id_missing_from_the_cache_fails_fast_offline(monkeypatch):
    from gymnb.core.errors import ModelLoadError
    from gymnb.core.models import resolve_model_path

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=r"not in the local Hugging Face cache and HF_HUB_OFFLINE is set.*"
                                             r"did you mean Qwen/Qwen3-4B-Instruct-2507\?"):
        resolve_model_path("Qwen/Qwen3-4B-Instruct")
    with pytest.raises(ModelLoadError, match="model directory /no/such/model does not exist"):
        resolve_model_path("/no/such/model")
