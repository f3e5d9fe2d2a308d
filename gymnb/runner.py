"""Notebook runner stage: inspect -> parameterize -> execute (papermill) -> export HTML (nbconvert) -> results.

Each layer notebook runs in its own folder `<run_dir>/<notebook stem>/` with `output_dir` pointing there, so its
plots and `results.json` land next to the executed `notebook.ipynb` and `notebook.html`. A notebook that dies
before its last cell still gets a result: a failure whose reason is the exception papermill recorded, so one
broken layer never hides the others.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import yaml

from gymnb.checks.result import LAYERS, RESULTS_FILE
from gymnb.config import API_KEY_ENV, REPO_ROOT, split_override
from gymnb.errors import ConfigError, GymnbError

NOTEBOOKS_DIR = REPO_ROOT / "notebooks" / "validation"
LAYER_NOTEBOOKS = {
    "http_endpoint": "01_http_endpoint.ipynb",
    "token_roundtrip": "02_token_roundtrip.ipynb",
    "rollout_collection": "03_rollout_collection.ipynb",
    "token_continuity": "04_token_continuity.ipynb",
    "gradient_flow": "05_gradient_flow.ipynb",
}
KERNEL_NAME = "python3"


@dataclasses.dataclass
class NotebookRun:
    """One executed layer notebook and what it reported."""

    layer: str
    output_dir: Path
    notebook_path: Path  # the executed notebook
    html_path: Path | None  # its HTML export (None if even the export failed)
    results: dict  # results.json, or a failure synthesized from the execution error
    parameters: dict  # the values papermill injected
    seconds: float

    @property
    def passed(self) -> bool:
        return self.results.get("status") == "pass"


def notebook_path(layer: str) -> Path:
    if layer not in LAYER_NOTEBOOKS:
        raise ConfigError(f"unknown layer {layer!r}; layers are {list(LAYER_NOTEBOOKS)}")
    return NOTEBOOKS_DIR / LAYER_NOTEBOOKS[layer]


def check_kernel() -> None:
    """Fail fast, with the fix, when the Jupyter kernel the notebooks run on is not installed."""
    from jupyter_client.kernelspec import KernelSpecManager

    if KERNEL_NAME not in KernelSpecManager().find_kernel_specs():
        raise ConfigError(f"no Jupyter kernel named {KERNEL_NAME!r}: the validation notebooks run on it. Fix: "
                          f"`{sys.executable} -m ipykernel install --sys-prefix --name {KERNEL_NAME}` "
                          "(`make install` does this)")


def inspect_parameters(path: str | Path) -> dict[str, dict]:
    """The notebook's parameters cell: name -> {"default", "type", "help"} (help = the trailing comment)."""
    import papermill

    found = papermill.inspect_notebook(str(path))
    return {name: {"default": p["default"], "type": p["inferred_type_name"], "help": p["help"]}
            for name, p in found.items()}


def parse_parameter_overrides(items: list[str]) -> dict:
    """`key=value` strings to a dict; values parsed as YAML scalars (`4` -> 4, `true` -> True, `a,b` stays text)."""
    params = {}
    for item in items:
        key, raw = split_override(item, form="key=value (e.g. -p num_rows=4)")
        try:
            params[key] = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            params[key] = raw
        if params[key] is None:
            params[key] = raw
    return params


def resolve_parameters(layers: list[str], params: dict, shared: dict | None = None) -> dict[str, dict]:
    """Per layer, the subset of `shared` and then `params` its notebook declares, typed like the defaults.

    A key of `params` (the user's) that no notebook of the suite declares is an error naming the key and listing
    the known ones; `shared` values (URLs the runner fills in) go only to the notebooks that declare them.
    """
    declared = {layer: inspect_parameters(notebook_path(layer)) for layer in LAYER_NOTEBOOKS}
    known = sorted({name for names in declared.values() for name in names})
    declared = {layer: declared[layer] for layer in layers}
    unknown = [key for key in params if key not in known]
    if unknown:
        raise ConfigError(f"unknown notebook parameter(s) {unknown}; the notebooks declare {known}")
    merged = {**(shared or {}), **params}
    resolved = {}
    for layer, names in declared.items():
        resolved[layer] = {key: coerce_value(key, value, names[key]["type"])
                           for key, value in merged.items() if key in names}
    return resolved


def coerce_value(key: str, value, declared_type: str):
    """Match a command-line value to the type of the parameter's default (papermill's inferred type name)."""
    if declared_type == "str":
        return value if isinstance(value, str) else str(value)
    if declared_type == "float" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if declared_type == "list" and isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    expected = {"int": int, "float": float, "bool": bool, "list": list, "dict": dict}.get(declared_type)
    if expected is not None and (not isinstance(value, expected) or
                                 (expected is int and isinstance(value, bool))):
        raise ConfigError(f"parameter {key!r} must be {declared_type}, got {value!r}")
    return value


def execute_notebook(input_path: Path, output_path: Path, parameters: dict, *, cwd: Path,
                     timeout: float | None = None) -> str | None:
    """Run one notebook with papermill; return None on success or the failure reason (`Type: message`)."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    try:
        papermill.execute_notebook(str(input_path), str(output_path), parameters=parameters,
                                   kernel_name=KERNEL_NAME, cwd=str(cwd), progress_bar=False,
                                   execution_timeout=timeout,
                                   # The kernel logs transport warnings and its shutdown to our stderr: noise.
                                   extra_arguments=["--IPKernelApp.log_level=CRITICAL"])
    except PapermillExecutionError as exc:
        return f"{exc.ename}: {exc.evalue} (cell {exc.exec_count})"
    except Exception as exc:  # noqa: BLE001 - kernel death, timeout, bad notebook: the layer fails, the rest run
        return f"{type(exc).__name__}: {exc}"
    return None


def export_html(nb_path: Path, html_path: Path) -> Path:
    """The executed notebook as standalone HTML (nbconvert embeds image outputs as data URIs)."""
    import nbformat
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(template_name="lab")
    body, _ = exporter.from_notebook_node(nbformat.read(str(nb_path), as_version=4))
    html_path.write_text(body, encoding="utf-8")
    return html_path


def collect_results(layer: str, output_dir: Path, error: str | None) -> dict:
    """The notebook's results.json; if it never got written, a failure carrying the execution error."""
    path = output_dir / RESULTS_FILE
    if path.exists():
        results = json.loads(path.read_text())
        if error and results.get("status") == "pass":  # a cell after the results cell failed
            results.update(status="fail", reason=error)
        return results
    reason = error or f"the notebook finished without writing {RESULTS_FILE}"
    return {"layer": layer, "status": "fail", "reason": reason,
            "checks": [{"name": "notebook ran to the end", "ok": False, "detail": reason}],
            "figures": {}, "plots": [], "details_html": ""}


def run_notebook(layer: str, run_dir: Path, parameters: dict, *, timeout: float | None = None) -> NotebookRun:
    """Execute one layer's notebook into `run_dir/<stem>/`, export it to HTML and read its results."""
    source = notebook_path(layer)
    out = Path(run_dir) / source.stem
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS_FILE).unlink(missing_ok=True)  # never report a stale result
    parameters = {**parameters, "output_dir": str(out.resolve())}
    executed = out / "notebook.ipynb"
    start = time.perf_counter()
    error = execute_notebook(source, executed, parameters, cwd=out, timeout=timeout)
    seconds = time.perf_counter() - start
    html_path = None
    if executed.exists():
        try:
            html_path = export_html(executed, out / "notebook.html")
        except Exception as exc:  # noqa: BLE001 - a broken export must not hide the layer's verdict
            error = error or f"HTML export failed: {type(exc).__name__}: {exc}"
    results = collect_results(layer, out, error)
    results["seconds"] = round(seconds, 1)
    return NotebookRun(layer, out, executed, html_path, results, parameters, seconds)


@contextlib.contextmanager
def kernel_api_key(api_key: str | None):
    """$GYMNB_API_KEY set for the kernels started inside (they inherit this process's environment).

    The key goes to the kernels this way and never as a papermill parameter: parameters are written into the
    executed notebook and its HTML, the files a report shares.
    """
    previous = os.environ.get(API_KEY_ENV)
    if api_key:
        os.environ[API_KEY_ENV] = api_key
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(API_KEY_ENV, None)
        else:
            os.environ[API_KEY_ENV] = previous


def run_layers(run_dir: Path, parameters: dict[str, dict], *, timeout: float | None = None,
               progress: bool = True, api_key: str | None = None) -> list[NotebookRun]:
    """Run the given layers in order (`parameters`: layer -> its resolved parameters; `api_key` reaches the
    kernels through the environment, see kernel_api_key)."""
    from tqdm.auto import tqdm

    bar = tqdm(list(parameters), desc="validation layers", unit="notebook", disable=not progress)
    with kernel_api_key(api_key):
        runs = [run_one_layer(bar, layer, run_dir, parameters[layer], timeout) for layer in bar]
    return runs


def run_one_layer(bar, layer: str, run_dir: Path, parameters: dict, timeout: float | None) -> NotebookRun:
    if parameters.get("api_key"):
        raise ConfigError("the API key must not be a notebook parameter (papermill writes parameters into the "
                          f"executed notebook): pass run_layers(api_key=...) or set ${API_KEY_ENV}")
    bar.set_postfix_str(LAYERS[layer])
    run = run_notebook(layer, run_dir, parameters, timeout=timeout)
    bar.write(f"{LAYERS[layer]:<20} {run.results['status'].upper():<5} {run.seconds:6.1f} s"
              + (f"  {run.results.get('reason', '')}" if not run.passed else ""))
    return run


def raise_for_errors(runs: list[NotebookRun]) -> None:
    """Raise GymnbError naming every failed layer and its reason."""
    failed = [run for run in runs if not run.passed]
    if failed:
        lines = [f"- {LAYERS[r.layer]}: {r.results.get('reason', '')} (see {r.html_path or r.notebook_path})"
                 for r in failed]
        raise GymnbError(f"{len(failed)} of {len(runs)} validation layers failed:\n" + "\n".join(lines))
