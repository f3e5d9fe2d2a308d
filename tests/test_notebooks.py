"""The five validation notebooks under papermill, through `gymnb validate`, on a smoke configuration.

The policy is a scripted tiny model (real weights, served by the real server) that, greedy, solves one real
workplace_assistant row in three model calls: look a colleague up (compact JSON, which the chat template
re-renders differently, so only the splice keeps the next turn on-policy), send the email, confirm. Every
component is real and talks over loopback HTTP. The second test breaks the integration on purpose: a server
that re-tokenizes history instead of splicing must fail layer 04 with the first divergence in the report.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from scripted_workplace import scripted_workplace_model, workplace_rows

from gymnb.validation import validate
from gymnb.validation.checks.roundtrip import ROUNDTRIP_CASES

STEMS = {"http_endpoint": "01_http_endpoint", "token_roundtrip": "02_token_roundtrip",
         "rollout_collection": "03_rollout_collection", "token_continuity": "04_token_continuity",
         "gradient_flow": "05_gradient_flow"}
@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """(scripted model dir, rows JSONL) for the smoke configuration."""
    (row,) = rows = workplace_rows()
    model_dir = scripted_workplace_model(rows)
    rows_path = tmp_path_factory.mktemp("rows") / "rows.jsonl"
    rows_path.write_text(json.dumps(row) + "\n")
    return model_dir, rows_path


def smoke_args(model_dir, rows_path, out) -> list[str]:
    params = [f"model={model_dir}", f"rows_path={rows_path}", "num_rows=1", "num_repeats=2", "temperature=0",
              "max_output_tokens=64", "concurrency=2", "num_probe_turns=2", "probe_max_tokens=8", "max_tokens=8"]
    return ["--env", "workplace_assistant", "--out", str(out)] + [a for p in params for a in ("-p", p)]


def layer_results(run_dir, layer: str) -> dict:
    return json.loads((run_dir / STEMS[layer] / "results.json").read_text())


@pytest.mark.slow
def test_every_notebook_passes_on_the_embedded_smoke_integration(smoke, tmp_path):
    model_dir, rows_path = smoke
    run_dir = tmp_path / "run"
    assert validate.main(smoke_args(model_dir, rows_path, run_dir)) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["passed"] and list(summary["layers"]) == list(STEMS)
    assert summary["parameters"]["embedded"] is True

    endpoint = layer_results(run_dir, "http_endpoint")
    agree = next(c for c in endpoint["checks"] if c["name"].startswith("follow-up token ids agree across sources"))
    assert agree["ok"], agree  # the follow-up's ids match /tokenize's (logprobs+tokenize is one of the sources)
    assert layer_results(run_dir, "token_roundtrip")["figures"]["num_cases"] == len(ROUNDTRIP_CASES)

    collection = layer_results(run_dir, "rollout_collection")["figures"]
    assert collection["num_rollouts"] == 2 and collection["mean_reward"] == 1.0  # the script is the ground truth
    assert collection["num_multi_turn"] == 2 and collection["max_model_calls"] == 3
    rollouts = [json.loads(line) for line in (run_dir / STEMS["rollout_collection"] / "rollouts.jsonl").open()]
    assert len(rollouts) == 2

    continuity = layer_results(run_dir, "token_continuity")
    figures = continuity["figures"]
    assert figures["num_multi_turn"] == 2 and figures["num_broken"] == 0 and figures["num_probes"] == 3
    assert figures["naive_drifted_rollouts"] == 2  # the compact tool call: re-tokenizing would have gone off-policy
    assert "Token view of a continuous multi-turn sequence" in continuity["details_html"]

    gradient = layer_results(run_dir, "gradient_flow")["figures"]
    assert gradient["token_mult_prob_error"] < 1.001
    assert gradient["num_generated_tokens"] == collection["generation_tokens"]  # both rollouts, every token

    for layer, stem in STEMS.items():
        assert "injected-parameters" in (run_dir / stem / "notebook.ipynb").read_text()
        for plot in summary["layers"][layer]["plots"]:
            assert (run_dir / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    index = (run_dir / "index.html").read_text()
    assert index.count("data:image/png;base64,") >= 6


@pytest.mark.slow
def test_a_server_that_retokenizes_history_fails_layer_04_with_the_divergence(smoke, tmp_path):
    """External integration: only the Gym head URL is given; the policy server is found through its config."""
    from gymnb.gym import start_gym
    from gymnb.policy.server import PolicyServer

    model_dir, rows_path = smoke
    run_dir = tmp_path / "run"
    with PolicyServer.start(str(model_dir), model_id="scripted", splice=False) as server, \
            start_gym(["workplace_assistant"], policy_base_url=server.base_url, policy_model_name="scripted") as gym:
        code = validate.main(smoke_args(model_dir, rows_path, run_dir)
                             + ["--gym", gym.head_url, "--layers", "rollout_collection,token_continuity"])
        policy_url = server.url
    assert code == 1
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["parameters"]["embedded"] is False and summary["parameters"]["base_url"] == policy_url
    assert summary["layers"]["rollout_collection"]["status"] == "pass"
    continuity = summary["layers"]["token_continuity"]
    assert continuity["status"] == "fail"
    assert continuity["reason"].startswith("every rollout is continuous across its model calls: 2 of 2 rollouts broken")
    assert "model call 1" in continuity["reason"]
    assert continuity["figures"]["first_divergence"].startswith("rollout 0, model call 1, token ")
    failed = {c["name"] for c in continuity["checks"] if not c["ok"]}
    assert "probe splice_tool_call: continuous over 2 model calls" in failed
    assert "probe splice_bpe: continuous over 2 model calls" in failed
    # the probes sent their token fields and still broke: the server is named as the side at fault
    assert "Server at fault" in continuity["reason"] and "docs/protocol.md" in continuity["reason"]
    assert continuity["figures"]["num_broken"] == 2 + continuity["figures"]["num_broken_probes"]
    rollouts_path = summary["parameters"]["layers"]["token_continuity"]["rollouts_path"]
    assert rollouts_path == str((run_dir / STEMS["rollout_collection"] / "rollouts.jsonl").resolve())
    index = (run_dir / "index.html").read_text()
    assert "Token view of the first divergence" in index and 'class="div"' in index
    executed = (run_dir / STEMS["token_continuity"] / "notebook.html").read_text()
    assert "LayerFailed" in executed  # the last cell failed the run...
    assert "static view of the explorer" in executed  # ...after the explorer cell had run

    from browser import open_alone_offline

    shots = Path(os.environ.get("GYMNB_SCREENSHOTS") or tmp_path)
    seen = open_alone_offline(run_dir / "index.html", tmp_path / "mailed",
                              screenshot=shots / "report_no_splice_alone_offline.png")
    assert seen["requests_out"] == [] and seen["broken"] == []
    assert {"#notebook-rollout_collection", "#notebook-token_continuity"} <= {x["href"] for x in seen["links"]}
