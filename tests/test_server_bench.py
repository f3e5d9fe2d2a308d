"""`gymnb bench server` end to end on the tiny model (gymnb only): its JSON is complete and consistent."""

from __future__ import annotations

import json

from gymnb import bench


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
        assert cell["retained"] > 0
        assert "gymnb/in_process" in block["ratios"][clients]


def test_bench_server_names_the_vllm_remedy(tmp_path, capsys):
    argv = ["server", "--vllm", str(tmp_path / "nowhere"), "--out", str(tmp_path / "server.json")]
    assert bench.main(argv) == 2
    assert "make real-vllm" in capsys.readouterr().err
