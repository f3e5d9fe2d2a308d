"""Report stage: one self-contained `index.html` and a machine-readable `summary.json` for a validation run.

index.html shows PASS/FAIL per layer with its reason, key figures, checks, the plots, any HTML details a layer
produced (e.g. the token view of a continuity divergence), each executed notebook, and the resolved parameters.
It is the one file to mail to a colleague: plots are data URIs, each executed notebook is embedded (an iframe
`srcdoc`, script-free, so no CDN is needed), and every link is an anchor inside the file. The per-layer
`notebook.html` files beside it are the same exports, for whoever has the whole folder.

summary.json example:
    {"passed": false, "run_id": "20250101-120000", "layers": {"http_endpoint": {"status": "pass", "reason": "",
     "figures": {...}, "checks": [...], "notebook_html": "01_http_endpoint/notebook.html", "seconds": 3.1}, ...},
     "parameters": {...}}
"""

from __future__ import annotations

import datetime as dt
import html
import json
import os
from pathlib import Path

from gymnb.validation.checks.plots import embed_png
from gymnb.validation.checks.result import LAYERS, check_mark, format_figure
from gymnb.validation.runner import NotebookRun

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2rem auto;max-width:1100px;
  color:#1f2328;padding:0 1rem}
h1{margin-bottom:.2rem} .sub{color:#59636e;margin-top:0}
.badge{display:inline-block;padding:.15rem .6rem;border-radius:1rem;color:#fff;font-weight:600}
.pass{background:#1a7f37} .fail{background:#cf222e}
table{border-collapse:collapse;margin:.5rem 0 1rem} td,th{border:1px solid #d1d9e0;padding:.3rem .6rem;
  text-align:left;vertical-align:top} th{background:#f6f8fa}
section{border-top:2px solid #d1d9e0;margin-top:2rem;padding-top:.5rem}
pre{white-space:pre-wrap;margin:0;font-size:.85rem} img{max-width:100%;border:1px solid #d1d9e0;margin:.3rem}
.reason{color:#cf222e;font-weight:600} code{font-size:.85rem}
.note{background:#fff8c5;border:1px solid #d4a72c;padding:.4rem .6rem;border-radius:4px}
iframe.notebook{width:100%;height:80vh;border:1px solid #d1d9e0}
"""


def build_summary(runs: list[NotebookRun], run_dir: Path, parameters: dict, run_id: str) -> dict:
    """The run as plain data: overall verdict and, per layer, status, reason, figures, checks and links."""
    layers = {}
    for run in runs:
        r = run.results
        layers[run.layer] = {
            "status": r.get("status", "fail"),
            "reason": r.get("reason", ""),
            "figures": r.get("figures", {}),
            "checks": r.get("checks", []),
            "plots": [relative_link(run.output_dir / name, run_dir) for name in r.get("plots", [])],
            "notebook_html": relative_link(run.html_path, run_dir) if run.html_path else None,
            "notebook": relative_link(run.notebook_path, run_dir),
            "seconds": r.get("seconds", round(run.seconds, 1)),
            "notebook_note": run.note,
        }
    passed = bool(layers) and all(entry["status"] == "pass" for entry in layers.values())
    return {"passed": passed, "run_id": run_id, "layers": layers, "parameters": parameters}


def relative_link(path: Path, base: Path) -> str:
    return Path(os.path.relpath(Path(path).resolve(), Path(base).resolve())).as_posix()


def badge(status: str) -> str:
    cls = "pass" if status == "pass" else "fail"
    return f'<span class="badge {cls}">{html.escape(status.upper())}</span>'


def render_overview(summary: dict) -> str:
    rows = []
    for layer, entry in summary["layers"].items():
        figures = ", ".join(f"{k} = {format_figure(v, k)}" for k, v in list(entry["figures"].items())[:4])
        link = (f'<a href="#notebook-{layer}">notebook</a>' if entry["notebook_html"]
                else html.escape(entry["notebook"]))
        headline = (entry["reason"].splitlines() or [""])[0]  # the full reason is in the layer's section
        reason = f'<div class="reason">{html.escape(headline)}</div>' if entry["status"] != "pass" else ""
        rows.append(f'<tr><td><a href="#{layer}">{html.escape(LAYERS[layer])}</a></td><td>{badge(entry["status"])}'
                    f"</td><td>{reason}{html.escape(figures)}</td><td>{entry['seconds']} s</td><td>{link}</td></tr>")
    return ("<table><tr><th>layer</th><th>status</th><th>key figures</th><th>time</th><th>details</th></tr>"
            + "".join(rows) + "</table>")


# What a layer's verdict means, where a reader could take it for more (or less) than it is.
LAYER_SCOPE = {
    "rollout_collection": "Judges completeness, not answer quality: every rollout came back whole, with a reward "
                          "and token fields. A mean reward of 0 passes here; the benchmark notebooks judge quality.",
}


def render_layer(run: NotebookRun, entry: dict) -> str:
    r = run.results
    checks = "".join(
        f"<tr><td>{check_mark(c['ok'])}</td><td>{html.escape(c['name'])}</td>"
        f"<td><pre>{html.escape(c.get('detail', ''))}</pre></td></tr>" for c in r.get("checks", []))
    figures = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(format_figure(v, k))}</td></tr>"
                      for k, v in r.get("figures", {}).items())
    plots = "".join(embed_png(run.output_dir / name) for name in r.get("plots", []))
    # the headline only: the full text is the failing check's detail just below, shown once
    headline = (entry["reason"].splitlines() or [""])[0]
    reason = f'<p class="reason">{html.escape(headline)}</p>' if entry["status"] != "pass" else ""
    link = (f'<p><a href="#notebook-{run.layer}">executed notebook</a></p>' if entry["notebook_html"] else "")
    note = f'<p class="note">{html.escape(run.note)}</p>' if run.note else ""
    scope = f'<p class="sub">{html.escape(LAYER_SCOPE[run.layer])}</p>' if run.layer in LAYER_SCOPE else ""
    return (f'<section id="{run.layer}"><h2>{html.escape(LAYERS[run.layer])} {badge(entry["status"])}</h2>'
            f"{scope}{reason}{note}{link}<table><tr><th></th><th>check</th><th>detail</th></tr>{checks}</table>"
            + (f"<h3>Key figures</h3><table>{figures}</table>" if figures else "")
            + (f"<div>{plots}</div>" if plots else "")
            + r.get("details_html", "") + "</section>")


def render_notebooks(runs: list[NotebookRun]) -> str:
    """Each executed notebook embedded whole (its export is already script-free and self-contained)."""
    parts = []
    for run in runs:
        if run.html_path is None or not Path(run.html_path).exists():
            continue
        page = Path(run.html_path).read_text(encoding="utf-8")
        parts.append(f'<section id="notebook-{run.layer}"><h2>Executed notebook: {html.escape(LAYERS[run.layer])}'
                     f'</h2><iframe class="notebook" title="{html.escape(LAYERS[run.layer])} notebook" '
                     f'srcdoc="{html.escape(page, quote=True)}"></iframe></section>')
    return "".join(parts)


def render_parameters(parameters: dict) -> str:
    text = html.escape(json.dumps(parameters, indent=2, default=str))
    return f'<section id="parameters"><h2>Resolved parameters</h2><pre>{text}</pre></section>'


def render_report(summary: dict, runs: list[NotebookRun]) -> str:
    verdict = "All layers passed" if summary["passed"] else "Some layers failed"
    status = "pass" if summary["passed"] else "fail"
    layers = "".join(render_layer(run, summary["layers"][run.layer]) for run in runs)
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>gymnb validation {summary['run_id']}</title>"
        f"<style>{STYLE}</style></head><body><h1>gymnb integration validation {badge(status)}</h1>"
        f"<p class='sub'>{verdict} &middot; run {html.escape(summary['run_id'])}</p>"
        f"{render_overview(summary)}{layers}{render_parameters(summary['parameters'])}{render_notebooks(runs)}"
        "</body></html>"
    )


def write_report(run_dir: str | Path, runs: list[NotebookRun], parameters: dict,
                 run_id: str | None = None) -> tuple[Path, Path]:
    """Write `index.html` and `summary.json` into `run_dir`; return their paths."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    run_id = run_id or run_dir.name or dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    summary = build_summary(runs, run_dir, parameters, run_id)
    summary_path = run_dir / "summary.json"
    summary_path.write_text(json.dumps(summary, indent=2, default=str))
    index_path = run_dir / "index.html"
    index_path.write_text(render_report(summary, runs), encoding="utf-8")
    return index_path, summary_path
