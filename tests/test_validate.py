"""`gymnb validate` and the notebook runner: parameter handling, and a real run against a real policy server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gymnb.core.errors import ConfigError
from gymnb.validation import validate
from gymnb.validation.runner import collect_results, parse_parameter_overrides, resolve_parameters


def test_overrides_parse_as_yaml_scalars():
    params = parse_parameter_overrides(["num_rows=8", "temperature=0.7", "env=math_with_judge", "flag=true",
                                        "model_id=", "extra_strings=[a, b]"])
    assert params == {"num_rows": 8, "temperature": 0.7, "env": "math_with_judge", "flag": True, "model_id": "",
                      "extra_strings": ["a", "b"]}


@pytest.mark.parametrize("item", ["num_rows", "=3", " num_rows=3"])
def test_malformed_override_names_the_form(item):
    with pytest.raises(ConfigError, match="key=value"):
        parse_parameter_overrides([item])


def test_unknown_parameter_is_named_with_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown notebook parameter\(s\) \['num_rowz'\].*'num_rows'"):
        resolve_parameters(["token_roundtrip"], {"num_rowz": 3})


def test_parameters_go_only_to_notebooks_that_declare_them_with_their_types():
    resolved = resolve_parameters(["token_roundtrip", "rollout_collection"],
                                  {"temperature": 1, "extra_strings": "x, y z"},
                                  shared={"base_url": "http://127.0.0.1:1", "model": "m"})
    # every declared parameter is injected, defaults included, so hand edits of a notebook never decide a run
    assert resolved["token_roundtrip"] == {"model": "m", "extra_strings": ["x", "y z"], "output_dir": ""}
    assert resolved["rollout_collection"]["temperature"] == 1.0
    assert isinstance(resolved["rollout_collection"]["temperature"], float)
    assert resolved["rollout_collection"]["base_url"] == "http://127.0.0.1:1"


def test_wrongly_typed_parameter_is_refused():
    with pytest.raises(ConfigError, match="num_rows' must be int"):
        resolve_parameters(["rollout_collection"], {"num_rows": "many"})


def test_flags_are_not_parameters_and_layers_are_checked():
    with pytest.raises(ConfigError, match="--base-url"):
        validate.main(["-p", "base_url=http://x"])
    with pytest.raises(ConfigError, match="unknown layer"):
        validate.select_layers("http_endpoint,gradient")
    assert validate.select_layers("gradient_flow,http_endpoint") == ["http_endpoint", "gradient_flow"]


def test_notebook_that_died_is_a_failure_with_its_error(tmp_path):
    results = collect_results("token_continuity", tmp_path, "ContinuityError: boom (cell 3)")
    assert results["status"] == "fail" and results["reason"] == "ContinuityError: boom (cell 3)"
    assert collect_results("token_continuity", tmp_path, None)["reason"].startswith("the notebook finished")


@pytest.mark.slow
def test_validate_reports_a_failing_layer_and_still_runs_the_rest(tmp_path, tiny_model_dir):
    """External server (a real one on loopback); layer 02 gets a tokenizer path that does not exist."""
    from gymnb.policy.server import PolicyServer

    with PolicyServer.start(str(tiny_model_dir), model_id="tiny") as server:
        code = validate.main(["--base-url", server.base_url, "--layers", "token_roundtrip,http_endpoint",
                              "-p", f"model={tmp_path / 'no-such-model'}", "--out", str(tmp_path / "run")])
    assert code == 1
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["passed"] is False
    assert summary["layers"]["http_endpoint"]["status"] == "pass"
    assert summary["layers"]["http_endpoint"]["figures"]["model_id"] == "tiny"
    roundtrip = summary["layers"]["token_roundtrip"]
    assert roundtrip["status"] == "fail"
    assert "ModelLoadError" in roundtrip["reason"] and "no-such-model" in roundtrip["reason"]
    failed_html = (tmp_path / "run" / roundtrip["notebook_html"]).read_text()
    assert "ModelLoadError" in failed_html  # papermill marked the failing cell in the exported notebook
    assert summary["parameters"]["embedded"] is False
    index = (tmp_path / "run" / "index.html").read_text()
    assert "no-such-model" in index and 'id="notebook-http_endpoint"' in index


def test_list_parameters_documents_every_notebook_parameter(capsys):
    assert validate.main(["--list-parameters"]) == 0
    text = capsys.readouterr().out
    assert 'num_rows = 4  [rollout_collection]\n    dataset rows to run: an int, 1 or more' in text
    assert "base_url = \"\"  [http_endpoint, rollout_collection, token_continuity]  (set with --base-url)" in text


def test_raise_for_errors_names_each_failed_layer(tmp_path):
    from gymnb.core.errors import GymnbError
    from gymnb.validation.runner import NotebookRun, raise_for_errors

    def run(layer, status, reason=""):
        return NotebookRun(layer, tmp_path, tmp_path / f"{layer}.ipynb", None,
                           {"status": status, "reason": reason}, {}, 1.0)

    raise_for_errors([run("http_endpoint", "pass")])
    with pytest.raises(GymnbError, match=r"1 of 2 validation layers failed:\n- Token continuity: model call 1"):
        raise_for_errors([run("http_endpoint", "pass"), run("token_continuity", "fail", "model call 1 diverges")])


@pytest.fixture(scope="module")
def served_as(tiny_model_dir):
    """A real policy server on the tiny model that answers /v1/models with the given model id."""
    from contextlib import contextmanager

    from gymnb.core.models import load_model
    from gymnb.policy.server import PolicyServer

    loaded = load_model(str(tiny_model_dir), max_model_len=512)

    @contextmanager
    def serve(model_id: str):
        with PolicyServer.start(loaded, model_id=model_id) as server:
            yield server

    return serve


def test_external_servers_model_is_found_from_its_model_id(served_as, tiny_model_dir):
    from gymnb.validation.checks import policy_model

    with served_as(str(tiny_model_dir)) as server:  # `gymnb serve --model DIR` serves the directory as its id
        assert policy_model("", server.base_url) == str(tiny_model_dir)
        assert policy_model("smollm2-135m", server.base_url) == "smollm2-135m"  # -p model= wins
    with served_as("Qwen/Qwen3-4B-Instruct-2507") as server:  # vLLM serves the hub id
        assert policy_model("", server.url) == "qwen3-4b-instruct-2507"
    assert policy_model("", "") == "smollm2-135m"  # nothing external: the embedded default


def test_external_server_with_an_unknown_model_id_needs_the_model_named(served_as, tmp_path):
    with served_as("my-finetune") as server, pytest.raises(ConfigError, match=r"serves 'my-finetune'.*-p model=PATH"):
        validate.main(["--base-url", server.base_url, "--layers", "token_roundtrip", "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()  # refused before any layer ran


@pytest.mark.slow
def test_validate_checks_the_external_servers_own_tokenizer(served_as, tiny_model_dir, tmp_path):
    with served_as(str(tiny_model_dir)) as server:
        code = validate.main(["--base-url", server.base_url, "--layers", "token_roundtrip",
                              "--out", str(tmp_path / "run")])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert code == 0, summary
    assert summary["parameters"]["model"] == str(tiny_model_dir)
    assert summary["parameters"]["layers"]["token_roundtrip"]["model"] == str(tiny_model_dir)


def committed_copy(tmp_path, monkeypatch, layer_file: str) -> Path:
    """A git checkout holding the committed validation notebooks; the runner reads them from it. Returns the
    path of `layer_file` in it."""
    import shutil
    import subprocess

    from gymnb.validation import runner

    root = tmp_path / "repo"
    folder = root / "notebooks" / "validation"
    shutil.copytree(runner.NOTEBOOKS_DIR, folder)
    git = ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "shipped"], check=True)
    monkeypatch.setattr(runner, "REPO_ROOT", root)
    monkeypatch.setattr(runner, "NOTEBOOKS_DIR", folder)
    return folder / layer_file


def edit_parameters_cell(path, old: str, new: str) -> None:
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    assert old in cell.source
    cell.source = cell.source.replace(old, new)
    nbformat.write(nb, str(path))


@pytest.mark.slow
def test_a_hand_edited_notebook_does_not_change_a_headless_run(tmp_path, monkeypatch, tiny_model_dir):
    """JupyterLab autosaves a hand-set parameters cell; `gymnb validate` must still run the committed defaults
    and say that the file on disk differs."""
    path = committed_copy(tmp_path, monkeypatch, "02_token_roundtrip.ipynb")
    edit_parameters_cell(path, "extra_strings: list = []", 'extra_strings: list = ["left over from a session"]')
    run_dir = tmp_path / "run"
    assert validate.main(["--layers", "token_roundtrip", "-p", f"model={tiny_model_dir}",
                          "--out", str(run_dir)]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["parameters"]["layers"]["token_roundtrip"]["extra_strings"] == []
    note = summary["parameters"]["notebook_notes"]["token_roundtrip"]
    assert "differs from the committed notebook" in note and "left over from a session" in note
    assert "differs from the committed notebook" in (run_dir / "index.html").read_text()
    from gymnb.validation.checks.roundtrip import ROUNDTRIP_CASES

    figures = summary["layers"]["token_roundtrip"]["figures"]
    assert figures["num_cases"] == len(ROUNDTRIP_CASES)  # the edited extra string was not checked


def test_every_run_records_the_rollouts_it_reads(tmp_path):
    """Layers 04 and 05 read this run's rollouts, and the path they read is a resolved parameter."""
    resolved = resolve_parameters(["token_continuity", "gradient_flow"], {},
                                  shared=validate.run_defaults(tmp_path / "run", {}))
    expected = str((tmp_path / "run" / "03_rollout_collection" / "rollouts.jsonl").resolve())
    assert resolved["token_continuity"]["rollouts_path"] == expected
    assert resolved["gradient_flow"]["rollouts_path"] == expected
    assert validate.run_defaults(tmp_path, {"rollouts_path": "/data/r.jsonl"}) == {}
