"""Shared fixtures: a tiny random model with the embedded model's real tokenizer, built once per machine."""

from __future__ import annotations

import pytest

from gymnb.core.models import cache_dir, make_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir():
    """2-layer, 64-wide random Llama with SmolLM2's tokenizer and the tool-aware ChatML template."""
    return make_tiny_model(cache_dir() / "tiny" / "llama-2x64-seed0-8k")


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from gymnb.core.models import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


# The scripted math model and its rows, used by the training, train-bench and benchmark-notebook tests.
@pytest.fixture(scope="module")
def scripted_math_model():
    from scripted_math import build_scripted_math_model

    return build_scripted_math_model()


@pytest.fixture()
def rows_file(tmp_path):
    from scripted_math import write_rows_file

    return write_rows_file(tmp_path)
