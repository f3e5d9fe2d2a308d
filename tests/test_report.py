"""Report stage: index.html + summary.json from constructed layer results, and a real headless-Chromium render."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path

from gymnb.validation.checks.plots import plot_histogram
from gymnb.validation.checks.result import LAYERS, LayerResult
from gymnb.validation.report import write_report
from gymnb.validation.runner import NotebookRun

DIVERGENCE_HTML = "<div class='tokenview'>first divergence at model call 2, token 17</div>"


def make_run(run_dir: Path, layer: str, result: LayerResult, *, with_html: bool = True) -> NotebookRun:
    stem = {"http_endpoint": "01_http_endpoint", "token_roundtrip": "02_token_roundtrip",
            "rollout_collection": "03_rollout_collection", "token_continuity": "04_token_continuity",
            "gradient_flow": "05_gradient_flow"}[layer]
    out = run_dir / stem
    out.mkdir(parents=True, exist_ok=True)
    html_path = out / "notebook.html"
    if with_html:
        html_path.write_text("<html>executed</html>")
    results = result.to_dict()
    results["seconds"] = 1.5
    return NotebookRun(layer, out, out / "notebook.ipynb", html_path if with_html else None, results, {}, 1.5)


def constructed_runs(run_dir: Path) -> list[NotebookRun]:
    runs = []
    for layer in LAYERS:
        result = LayerResult(layer)
        result.add("first check", True, "fine")
        result.figures["num_items"] = 3
        if layer == "rollout_collection":
            result.plots.append(plot_histogram([0.0, 1.0, 1.0, 0.5], run_dir / "03_rollout_collection",
                                               "reward_histogram", title="Rewards", xlabel="reward").name)
        if layer == "token_continuity":
            result.add("every multi-turn rollout is continuous", False, "rollout 1: model call 2 diverges at token 17")
            result.details_html = DIVERGENCE_HTML
        runs.append(make_run(run_dir, layer, result, with_html=layer != "gradient_flow"))
    return runs


def test_summary_has_every_layer_and_fails_when_one_layer_fails(tmp_path):
    runs = constructed_runs(tmp_path)
    _, summary_path = write_report(tmp_path, runs, {"base_url": "http://127.0.0.1:1"}, run_id="run-1")
    summary = json.loads(summary_path.read_text())
    assert summary["passed"] is False
    assert list(summary["layers"]) == list(LAYERS)
    statuses = {layer: entry["status"] for layer, entry in summary["layers"].items()}
    assert statuses == {**{layer: "pass" for layer in LAYERS}, "token_continuity": "fail"}
    continuity = summary["layers"]["token_continuity"]
    assert continuity["reason"].startswith("every multi-turn rollout is continuous: rollout 1: model call 2")
    assert summary["layers"]["http_endpoint"]["notebook_html"] == "01_http_endpoint/notebook.html"
    assert summary["layers"]["gradient_flow"]["notebook_html"] is None
    assert summary["parameters"] == {"base_url": "http://127.0.0.1:1"}


def test_all_passing_layers_pass(tmp_path):
    runs = []
    for layer in LAYERS:
        result = LayerResult(layer)
        result.add("the one check", True)
        runs.append(make_run(tmp_path, layer, result))
    _, summary_path = write_report(tmp_path, runs, {})
    assert json.loads(summary_path.read_text())["passed"] is True


def test_index_is_self_contained_with_embedded_plot_links_and_divergence(tmp_path):
    runs = constructed_runs(tmp_path)
    index, _ = write_report(tmp_path, runs, {"env": "workplace_assistant"}, run_id="run-1")
    page = index.read_text()
    png = (tmp_path / "03_rollout_collection" / "reward_histogram.png").read_bytes()
    assert f"data:image/png;base64,{base64.b64encode(png).decode()}" in page
    assert 'src="http' not in page and "<link" not in page and "<script" not in page  # nothing fetched
    # the executed notebook travels inside the page: a link to a sibling file breaks for whoever gets index.html
    assert 'href="04_token_continuity/notebook.html"' not in page and 'href="#notebook-token_continuity"' in page
    assert 'id="notebook-token_continuity"' in page and 'srcdoc="&lt;html&gt;executed&lt;/html&gt;"' in page
    assert DIVERGENCE_HTML in page
    assert "rollout 1: model call 2 diverges at token 17" in page
    assert "workplace_assistant" in page  # resolved parameters shown


def test_missing_plot_is_named_not_fatal(tmp_path):
    result = LayerResult("gradient_flow", plots=["logprob_diff.png"])
    result.add("gradients", True)
    index, _ = write_report(tmp_path, [make_run(tmp_path, "gradient_flow", result)], {})
    assert "plot logprob_diff.png is missing" in index.read_text()


def screenshot(page: Path, png: Path, profile: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Chromium is not installed: `apt-get install -y chromium` (.ci/run does this)"
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--window-size=1200,1400", f"--screenshot={png}", page.as_uri()]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    assert png.exists(), f"chromium wrote no screenshot (exit {proc.returncode}):\n{proc.stderr[-2000:]}"


def count_near(image, rgb: tuple[int, int, int], tolerance: int = 30) -> int:
    return sum(n for n, colour in image.getcolors(maxcolors=1 << 24)
               if all(abs(a - b) <= tolerance for a, b in zip(colour[:3], rgb)))


def test_report_renders_in_headless_chromium(tmp_path):
    from PIL import Image

    write_report(tmp_path / "run", constructed_runs(tmp_path / "run"), {"base_url": "http://127.0.0.1:1"})
    png = tmp_path / "shot.png"
    screenshot(tmp_path / "run" / "index.html", png, tmp_path / "profile")
    image = Image.open(png).convert("RGB")
    assert image.size == (1200, 1400)
    colours = image.getcolors(maxcolors=1 << 24)
    assert len(colours) > 50, f"screenshot looks blank: {len(colours)} distinct colours"
    assert count_near(image, (0xCF, 0x22, 0x2E)) > 200, "the red FAIL badges are not visible"
    assert count_near(image, (0x1A, 0x7F, 0x37)) > 200, "the green PASS badges are not visible"


def test_layer_without_checks_fails():
    result = LayerResult("http_endpoint")
    assert result.status == "fail" and result.reason == "no check ran"


def test_index_opened_alone_offline_carries_every_notebook_and_every_link_resolves(tmp_path):
    """index.html copied to a folder of its own, opened from file:// with the network cut: nothing is requested
    from outside the file, every link is an anchor that resolves, and each executed notebook is inside."""
    import os

    from browser import open_alone_offline

    from gymnb.validation.runner import NOTEBOOKS_DIR, export_html

    runs = constructed_runs(tmp_path / "run")
    for run in runs:  # real nbconvert exports (lab template), as the runner writes them
        if run.html_path is not None:
            export_html(NOTEBOOKS_DIR / f"{run.output_dir.name}.ipynb", run.html_path)
            assert "<script" not in run.html_path.read_text()
    index, _ = write_report(tmp_path / "run", runs, {"base_url": "http://127.0.0.1:1"})
    shots = Path(os.environ.get("GYMNB_SCREENSHOTS") or tmp_path)
    seen = open_alone_offline(index, tmp_path / "elsewhere", screenshot=shots / "report_alone_offline.png")
    assert seen["requests_out"] == [] and seen["broken"] == []
    hrefs = [link["href"] for link in seen["links"]]
    assert "#notebook-token_continuity" in hrefs and "#token_continuity" in hrefs
    assert "gradient_flow" not in {h.removeprefix("#notebook-") for h in hrefs}  # that layer has no export
    assert len(seen["frame_links"]) >= 4  # the notebooks' own heading anchors, inside their frames
