"""The scripted math model and rows shared by the training, train-bench and benchmark-notebook tests.

A tiny model that knows the answers to two questions: sampled at temperature 1 it gives groups with mixed
rewards, so GRPO steps carry real gradients. One definition means it is trained once per machine.
"""

from __future__ import annotations

import json

from gymnb.core.models import cache_dir
from gymnb.policy.scripted import make_scripted_model

QUESTIONS = [("What is 2 + 2?", "4"), ("What is 3 + 5?", "8")]


def build_scripted_math_model():
    """A tiny model that answers QUESTIONS with `\\boxed{answer}` when decoded greedily (cached per machine)."""
    conversations = [{"messages": [{"role": "user", "content": q}], "completions": [f"\\boxed{{{a}}}"]}
                     for q, a in QUESTIONS]
    return make_scripted_model(cache_dir() / "tiny" / "scripted-math-2q", conversations)


def write_rows_file(directory):
    """QUESTIONS as NeMo Gym math rows (no agent_ref: the trainer fills in the env's simple agent)."""
    path = directory / "rows.jsonl"
    rows = [{"responses_create_params": {"input": [{"role": "user", "content": q}]}, "question": q,
             "expected_answer": a} for q, a in QUESTIONS]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
