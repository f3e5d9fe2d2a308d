"""`gymnb bench server` end to end on the tiny model (no peer): its JSON is complete and consistent."""

from __future__ import annotations

import json

from gymnb import bench


def test_bench_dispatcher_lists_and_rejects(capsys):
    assert bench.main(["--help"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in ("server", "rollouts", "train"))
    assert bench.main(["nope"]) == 2


def test_bench_server_writes_ratios(tiny_model_dir, tmp_path):
    out = tmp_path / "server.json"
    argv = ["server", "--model", str(tiny_model_dir), "--concurrency", "1,3", "--max-tokens", "5",
            "--requests-per-client", "2", "--no-peer", "--threads", "1", "--out", str(out)]
    assert bench.main(argv) == 0
    result = json.loads(out.read_text())
    inproc = result["in_process"]
    assert inproc["output_tokens"] == 3 * 5 and len(inproc["runs_tokens_per_s"]) == 2
    for clients, row in result["gymnb_http"].items():
        assert row["output_tokens"] == int(clients) * 2 * 5  # ignore_eos: every request makes max_tokens
        assert row["requests"] == int(clients) * 2 and row["tokens_per_s_vs_in_process"] > 0
        assert row["cpu_seconds"] > 0 and row["tokens_per_cpu_s"] > 0  # the server subprocess's own CPU time
    assert "transformers_serve" not in result  # --no-peer


def test_server_bench_figures_from_hand_measured_numbers():
    from gymnb.bench.server import add_ratios, summarize

    assert summarize(30, 2.0, 4.0, clients=3) == {"clients": 3, "output_tokens": 30, "seconds": 2.0,
                                                  "tokens_per_s": 15.0, "cpu_seconds": 4.0, "tokens_per_cpu_s": 7.5}
    assert "tokens_per_cpu_s" not in summarize(30, 2.0, None)  # no CPU clock for the process: no CPU figure
    result = {"in_process": {"tokens_per_s": 20.0, "tokens_per_cpu_s": 10.0},
              "gymnb_http": {"3": {"tokens_per_s": 15.0, "tokens_per_cpu_s": 7.5}},
              "transformers_serve": {"3": {"tokens_per_s": 12.0, "tokens_per_cpu_s": 5.0}}}
    add_ratios(result)
    assert result["gymnb_http"]["3"] == {"tokens_per_s": 15.0, "tokens_per_cpu_s": 7.5,
                                         "tokens_per_s_vs_in_process": 0.75, "tokens_per_cpu_s_vs_in_process": 0.75,
                                         "tokens_per_s_vs_transformers_serve": 1.25,
                                         "tokens_per_cpu_s_vs_transformers_serve": 1.5}
