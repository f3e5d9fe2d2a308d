"""Environment data: embedded math rows (shape, determinism, splits, answers) and the public-set loaders."""

from __future__ import annotations

import collections
import json

import pytest
from nemo_gym_data import example_file

from gymnb.core.errors import ConfigError
from gymnb.gym.common import check_row
from gymnb.gym.data import (
    DAPO_PROMPT,
    load_aime24,
    load_dapo_math_17k,
    load_nemo_gym_jsonl,
    load_rows,
    make_math_rows,
)
from gymnb.gym.math_with_judge import verify_math_answer

REAL_MATH_ROWS = example_file("math_with_judge")


def test_math_rows_are_nemo_gym_rows_in_dapo_style():
    rows = load_rows("math_with_judge", "train", limit=8)
    assert [r["tier"] for r in rows[:4]] == [0, 1, 2, 3]  # interleaved: any prefix holds every tier
    for row in rows:
        check_row(row)
        assert row["agent_ref"] == {"type": "responses_api_agents", "name": "math_with_judge_simple_agent"}
        (message,) = row["responses_create_params"]["input"]
        assert message["role"] == "user" and message["content"] == row["question"]
        assert row["question"].startswith(DAPO_PROMPT.split("{problem}")[0])
        assert row["question"].endswith('Remember to put your answer on its own line after "Answer:".')
        # The gold answer, written as DAPO asks, is right: the rows are gradeable as generated.
        assert verify_math_answer(row["expected_answer"], f"Answer: {row['expected_answer']}")[0] == 1.0


def test_math_splits_are_deterministic_and_disjoint():
    train, validation = load_rows("math_with_judge", "train"), load_rows("math_with_judge", "validation")
    assert train == load_rows("math_with_judge", "train")
    questions = collections.Counter(r["question"] for r in train + validation)
    assert max(questions.values()) == 1
    assert set(collections.Counter(r["tier"] for r in validation)) == {0, 1, 2, 3}
    assert len(train) > 4 * len(validation) > 0


@pytest.mark.parametrize("tier, problem, answer", [
    (0, "What is 8 + 1?", "9"),
    (1, "What is 45 ÷ 9?", "5"),
])
def test_math_answers_are_the_arithmetic(tier, problem, answer):
    rows = [r for r in make_math_rows("train") if problem in r["question"]]
    assert [(r["tier"], r["expected_answer"]) for r in rows] == [(tier, answer)]


def test_real_nemo_gym_rows_load_with_an_agent_ref():
    rows = load_nemo_gym_jsonl(REAL_MATH_ROWS, agent_name="math_with_judge_simple_agent")
    assert len(rows) == 5
    assert all(r["agent_ref"]["name"] == "math_with_judge_simple_agent" for r in rows)
    assert rows[0]["expected_answer"] == "32"


def test_bad_jsonl_rows_name_the_line_and_field(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"responses_create_params": {"input": "q"}}) + "\n{oops\n")
    with pytest.raises(ConfigError, match="rows.jsonl:2: not valid JSON"):
        load_nemo_gym_jsonl(path)
    path.write_text(json.dumps({"responses_create_params": {"inputs": "q"}}) + "\n")
    with pytest.raises(ConfigError, match="row 1: unknown field responses_create_params.inputs"):
        load_nemo_gym_jsonl(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_nemo_gym_jsonl(tmp_path / "missing.jsonl")


DAPO_RECORD = {"data_source": "math_dapo", "ability": "MATH", "extra_info": {"index": "a1"},
               "prompt": [{"role": "user", "content": DAPO_PROMPT.format(problem="Compute $1+1$.")}],
               "reward_model": {"ground_truth": "2", "style": "rule-lighteval/MATH_v2"}}


def test_dapo_and_aime_records_from_parquet_and_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tmp_path / "dapo-math-17k.parquet"
    pq.write_table(pa.Table.from_pylist([DAPO_RECORD, DAPO_RECORD]), parquet)
    rows = load_dapo_math_17k(parquet, limit=1)
    assert rows == [{"responses_create_params": {"input": DAPO_RECORD["prompt"][0]["content"]},
                     "question": DAPO_RECORD["prompt"][0]["content"], "expected_answer": "2",
                     "agent_ref": {"type": "responses_api_agents", "name": "math_with_judge_simple_agent"}}]
    h4 = tmp_path / "aime_2024.jsonl"  # HuggingFaceH4/aime_2024 rows: problem / answer
    h4.write_text(json.dumps({"id": 60, "problem": "Find $x$.", "answer": "204", "solution": "...", "year": 2024}))
    (row,) = load_aime24(h4)
    assert row["expected_answer"] == "204" and row["question"] == DAPO_PROMPT.format(problem="Find $x$.")
    h4.write_text(json.dumps({"question": "no known shape"}))
    with pytest.raises(ConfigError, match="not a DAPO-Math-17k or AIME 2024 record"):
        load_aime24(h4)


def test_unknown_env_or_split():
    with pytest.raises(ConfigError, match="no embedded data for environment 'chess'"):
        load_rows("chess", "train")
    with pytest.raises(ConfigError, match="unknown split 'test'"):
        load_rows("math_with_judge", "test")
