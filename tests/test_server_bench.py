"""`gymnb bench server` end to end on the tiny model (gymnb only): its JSON is complete and consistent."""

from __future__ import annotations

import json
import subprocess
import sys

from gymnb import bench
from gymnb.bench import http_load, server


def test_bench_dispatcher_lists_and_rejects(capsys):
    assert bench.main(["--help"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in ("server", "rollouts", "train"))
    assert bench.main(["nope"]) == 2


def test_bench_server_alternates_rounds_and_reports_busy_shares(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("GYMNB_CACHE", str(tmp_path / "cache"))  # no vLLM installed there
    out = tmp_path / "server.json"
    argv = ["server", "--model", str(tiny_model_dir), "--concurrency", "1,3", "--max-tokens", "5",
            "--requests-per-client", "1", "--rounds", "2", "--busy", "--no-peer", "--threads", "1",
            "--out", str(out)]
    assert bench.main(argv) == 0
    block = json.loads(out.read_text())["dtypes"]["float32"]
    assert block["in_process"]["output_tokens"] == 3 * 5
    assert "make real-vllm" in block["servers"]["vllm float32"]["skipped"]
    for clients, cell in block["servers"]["gymnb float32"].items():
        for mode in ("quiet", "busy"):
            runs = cell[mode]["runs"]
            assert len(runs) == 2  # one per round
            assert all(r["output_tokens"] == int(clients) * 5 for r in runs)  # ignore_eos: max_tokens each
            assert all(r["cpu_seconds"] > 0 for r in runs)  # the server subprocess's own CPU time
            assert all(0 <= r["settled_s"] < 15 for r in runs)  # an idle server goes quiet before the bound
        assert cell["retained"] > 0
        assert "gymnb/in_process" in block["ratios"][clients]


def test_bench_server_names_the_vllm_remedy(tmp_path, capsys):
    argv = ["server", "--vllm", str(tmp_path / "nowhere"), "--out", str(tmp_path / "server.json")]
    assert bench.main(argv) == 2
    assert "make real-vllm" in capsys.readouterr().err


def run(tokens_per_s: float) -> dict:
    return {"tokens_per_s": tokens_per_s, "tokens_per_cpu_s": tokens_per_s / 2}


def test_ratios_come_with_the_range_of_each_rounds_pair(capsys):
    """Two rounds: gymnb 100 then 60 tok/s, its peer 50 then 60. Medians 80 / 55; the pairs 2.0 and 1.0."""
    cells = {"gymnb float32": [100, 60], "vllm float32": [50, 60]}
    result = {"busy": False, "levels": [16], "dtypes": {"float32": {"servers": {
        key: {"16": {"quiet": {"runs": [run(v) for v in values], "tokens_per_s": sum(values) / 2}}}
        for key, values in cells.items()}}}}
    server.add_ratios(result)
    block = result["dtypes"]["float32"]
    assert block["ratios"]["16"] == {"gymnb/vllm": round(80 / 55, 3)}
    assert block["ratio_ranges"]["16"] == {"gymnb/vllm": [1.0, 2.0]}
    server.print_table(result)
    assert "gymnb/vllm 1.46x (1.00-2.00)" in capsys.readouterr().out


def test_bench_prompts_never_repeat_and_share_only_their_opening():
    """Every server has prefix caching on: a repeated prompt would measure a cache hit, not a prefill."""
    from gymnb.bench import http_load

    def text(index, tag):
        return http_load.user_messages(index, tag)[0]["content"]

    seen = [text(i + r * 16, f"{round_}.16") for round_ in (1, 2) for r in range(2) for i in range(16)]
    assert len(set(seen)) == len(seen) == 64  # the 16 base prompts, each asked 4 times, never alike
    assert text(3, "1.16") == text(3, "1.16")  # a server's peers get the same prompt
    assert text(3, "1.16").startswith("Request 1.16.3: ")
    untagged = http_load.user_messages(3)  # the logprobs bench: the plain prompt
    assert untagged == [{"role": "user", "content": http_load.PROMPTS[3]}]


BURN_THEN_SLEEP = """
import sys, time
start = time.monotonic()
while time.monotonic() - start < 1.5:
    pass
open(sys.argv[1], "w").write("stopped")
time.sleep(60)
"""


def test_a_measurement_waits_for_a_server_that_computes_on_after_its_load(tmp_path):
    """As vLLM's engine core does for a second after its last response: the wait ends after it stops."""
    marker = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, "-c", BURN_THEN_SLEEP, str(marker)])
    try:
        waited = http_load.wait_quiet([proc.pid], timeout=30)
        assert marker.exists() and waited < 30
        assert http_load.wait_quiet([proc.pid], window=0.2, timeout=30) < 30  # quiet now: no more waiting
    finally:
        proc.kill()
        proc.wait()
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:  # never quiet: the measurement goes ahead at the bound
        assert http_load.wait_quiet([burner.pid], window=0.2, timeout=1.0) >= 1.0
    finally:
        burner.kill()
        burner.wait()


def test_bench_logprobs_pairs_a_served_float32_engine_with_the_trainer(tiny_model_dir, tmp_path, capsys):
    """`gymnb bench logprobs` end to end with gymnb's server alone: a float32 engine is on-policy for a float32
    trainer (the same weights; only float32 rounding between the two evaluation orders)."""
    out = tmp_path / "logprobs.json"
    argv = ["logprobs", "--model", str(tiny_model_dir), "--engines", "gymnb:float32", "--prompts", "3",
            "--max-tokens", "6", "--out", str(out)]
    assert bench.main(argv) == 0
    pairs = json.loads(out.read_text())["pairs"]["gymnb:float32"]
    exact = pairs["trainer float32"]
    assert exact["num_tokens"] == 3 * 6
    assert abs(exact["token_mult_prob_error"] - 1.0) < 1e-3
    assert pairs["trainer bfloat16"]["num_tokens"] == 3 * 6
