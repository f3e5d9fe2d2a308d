"""Notebook runner stage: inspect -> parameterize -> execute (papermill) -> export HTML (nbconvert) -> results.

Each layer notebook runs in its own folder `<run_dir>/<notebook stem>/` with `output_dir` pointing there, so its
plots and `results.json` land next to the executed `notebook.ipynb` and `notebook.html`. A notebook that dies
before its last cell still gets a result: a failure whose reason is the exception papermill recorded, so one
broken layer never hides the others.

What a headless run executes is fixed by its arguments and the documented defaults, never by edits saved in
the notebooks (JupyterLab autosaves a hand-set parameters cell): the runner executes each notebook as committed
in git (`shipped_notebook`) and injects every parameter it declares, defaults included, so the report lists each
value the run used. A notebook whose file on disk differs from the committed one is named in a note.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

from gymnb.core.config import API_KEY_ENV, REPO_ROOT, split_override
from gymnb.core.errors import ConfigError, GymnbError
from gymnb.validation.checks.result import LAYERS, RESULTS_FILE

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
    note: str = ""  # e.g. "the file on disk differs from the committed notebook"

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


def inspect_parameters(notebook) -> dict[str, dict]:
    """The notebook's parameters cell: name -> {"default", "type", "help"} (help = the trailing comment).

    `notebook` is a path or a notebook node; `default` is the value (papermill reports its source text).
    """
    import papermill

    found = papermill.inspect_notebook(notebook if not isinstance(notebook, Path) else str(notebook))
    return {name: {"default": literal_default(p["default"]), "type": p["inferred_type_name"], "help": p["help"]}
            for name, p in found.items()}


def literal_default(source: str):
    try:
        return ast.literal_eval(source)
    except (ValueError, SyntaxError):
        return source


def cell_sources(nb) -> list[tuple[str, str]]:
    """What a reader edits: cell types and sources (outputs, counts and metadata change on every run)."""
    return [(cell.cell_type, "".join(cell.source)) for cell in nb.cells]


def shipped_notebook(layer: str):
    """(notebook node, note): the layer's notebook as committed (git HEAD) and a note when the file on disk
    differs from it. Without git (or an uncommitted notebook) the file on disk runs, and the note says so."""
    import nbformat

    path = notebook_path(layer)
    on_disk = nbformat.read(str(path), as_version=4)
    try:
        relative = path.relative_to(REPO_ROOT).as_posix()
        text = subprocess.run(["git", "-C", str(REPO_ROOT), "show", f"HEAD:{relative}"], capture_output=True,
                              text=True, check=True, timeout=30).stdout
        committed = nbformat.reads(text, as_version=4)
    except (OSError, ValueError, subprocess.SubprocessError):
        return on_disk, f"{path.name}: no committed version to compare with (not a git checkout); ran the file on disk"
    if cell_sources(committed) == cell_sources(on_disk):
        return committed, ""
    return committed, (f"{path.name} on disk differs from the committed notebook ({describe_edits(committed, on_disk)}); "
                       "gymnb validate ran the committed one with the parameters listed below. Commit the edits to "
                       "run them headless, or set values with -p KEY=VALUE")


def describe_edits(committed, edited) -> str:
    """A short account of hand edits: changed parameter lines, else the number of changed cells."""
    def parameter_lines(nb) -> list[str]:
        cells = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
        return "".join(cells[0].source).splitlines() if cells else []

    changed = [line.split("#")[0].strip() for line in parameter_lines(edited) if line not in parameter_lines(committed)]
    if changed:
        return "parameters cell: " + "; ".join(changed[:3]) + (" ..." if len(changed) > 3 else "")
    old, new = cell_sources(committed), cell_sources(edited)
    num_changed = sum(a != b for a, b in zip(old, new)) + abs(len(old) - len(new))
    return f"{num_changed} cell(s) edited"


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
    """Per layer, every parameter its notebook declares: the committed default, overridden by `shared` and then
    `params`, typed like the default.

    A key of `params` (the user's) that no notebook of the suite declares is an error naming the key and listing
    the known ones; `shared` values (URLs the runner fills in) go only to the notebooks that declare them.
    """
    declared = {layer: inspect_parameters(shipped_notebook(layer)[0]) for layer in LAYER_NOTEBOOKS}
    known = sorted({name for names in declared.values() for name in names})
    unknown = [key for key in params if key not in known]
    if unknown:
        raise ConfigError(f"unknown notebook parameter(s) {unknown}; the notebooks declare {known}")
    merged = {**(shared or {}), **params}
    resolved = {}
    for layer in layers:
        names = declared[layer]
        resolved[layer] = {key: coerce_value(key, merged[key], info["type"]) if key in merged else info["default"]
                           for key, info in names.items()}
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


def execute_notebook(notebook, output_path: Path, parameters: dict, *, cwd: Path,
                     timeout: float | None = None) -> str | None:
    """Run one notebook (a path or a node) with papermill; None on success, else the reason (`Type: message`)."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    try:
        papermill.execute_notebook(str(notebook) if isinstance(notebook, Path) else notebook, str(output_path),
                                   parameters=parameters,
                                   kernel_name=KERNEL_NAME, cwd=str(cwd), progress_bar=False,
                                   execution_timeout=timeout,
                                   # The kernel logs transport warnings and its shutdown to our stderr: noise.
                                   extra_arguments=["--IPKernelApp.log_level=CRITICAL"])
    except PapermillExecutionError as exc:
        return f"{exc.ename}: {exc.evalue} (cell {exc.exec_count})"
    except Exception as exc:  # noqa: BLE001 - kernel death, timeout, bad notebook: the layer fails, the rest run
        return f"{type(exc).__name__}: {exc}"
    return None


SCRIPT = re.compile(r"<script\b[^>]*>.*?</script>", re.DOTALL | re.IGNORECASE)


def export_html(nb_path: Path, html_path: Path) -> Path:
    """The executed notebook as standalone HTML that needs no network: nbconvert embeds image outputs as data
    URIs and inlines its CSS; its scripts (require.js, MathJax, mermaid from a CDN) are dropped, since a static
    export runs none of its outputs' code and the notebooks write no LaTeX."""
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(str(nb_path), as_version=4)
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if "text/html" in data:  # a widget's static view (the explorer carries one); no widget runs here
                data.pop("application/vnd.jupyter.widget-view+json", None)
    body, _ = HTMLExporter(template_name="lab").from_notebook_node(nb)
    html_path.write_text(SCRIPT.sub("", body), encoding="utf-8")
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
    source, note = shipped_notebook(layer)
    out = Path(run_dir) / notebook_path(layer).stem
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
    return NotebookRun(layer, out, executed, html_path, results, parameters, seconds, note)


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
