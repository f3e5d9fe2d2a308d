"""The token explorer as users meet it: notebook 04 run in a real JupyterLab, driven in headless Chromium.

A real `jupyter lab` server on loopback opens notebook 04 parameterized against a policy server that re-tokenizes
history (`splice=False`, what `gymnb serve --no-splice` runs) and a recorded rollouts file with one broken
rollout. Run All must show the live explorer although the layer fails, opened on a divergence, and its
next-divergence button must change the view. Screenshots go to `$GYMNB_SCREENSHOTS` when it is set.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from browser import launch
from rollout_builders import build_rollout, naive_client

from gymnb.validation.runner import NOTEBOOKS_DIR


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def recorded_rollouts(tokenizer, path: Path) -> Path:
    """Two multi-turn rollouts: one spliced (continuous), one whose client re-tokenized the history. The first
    turn was generated as a non-canonical split, as sampling does, so re-tokenizing it changes the ids."""
    from gymnb.validation.checks.roundtrip import noncanonical_ids

    chat = [{"role": "user", "content": "Say something about jeans."}]
    text = "Skinny jeans are back."
    turns = [{"text": text, "gen_ids": noncanonical_ids(tokenizer, text), "user_after": "Why?"}, {"text": "Fashion."}]
    rows = [build_rollout(tokenizer, chat, turns), build_rollout(tokenizer, chat, turns, client=naive_client)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def start_lab(root: Path, tmp: Path) -> tuple[subprocess.Popen, str]:
    """`jupyter lab` on a loopback port with its own settings, workspaces and runtime folders."""
    port, token = free_port(), secrets.token_hex(16)
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp / "runtime"), "JUPYTERLAB_SETTINGS_DIR": str(tmp / "settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(tmp / "workspaces"), "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
           f"--ServerApp.port={port}", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
           "--ServerApp.port_retries=0", "--LabApp.extension_manager=readonly"]  # readonly: no PyPI queries
    if os.geteuid() == 0:  # CI containers run as root
        cmd.append("--allow-root")
    log = (tmp / "lab.log").open("w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"jupyter lab exited:\n{(tmp / 'lab.log').read_text()[-3000:]}")
        try:
            urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
            return proc, f"{url}/lab/tree/04.ipynb?token={token}"
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise AssertionError(f"jupyter lab did not answer within 120 s:\n{(tmp / 'lab.log').read_text()[-3000:]}")


def accept_kernel_dialog(page) -> None:
    """A fresh JupyterLab (no saved settings) may ask which kernel to start: take the proposed Python 3."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_selector(".jp-Dialog .jp-mod-accept", timeout=15_000)
    except PlaywrightTimeout:  # no dialog: the kernel started on its own
        return
    page.locator(".jp-Dialog .jp-mod-accept").click()


def dismiss_news_toast(page) -> None:
    """JupyterLab asks whether to fetch Jupyter news; answer No (no network, and a clear screenshot)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.locator(".jp-toast-button", has_text="No").first.click(timeout=10_000)
    except PlaywrightTimeout:  # no toast this time
        return


def run_all_and_click(url: str, shots: Path) -> tuple[str, str, str]:
    """Open the notebook, Run All, wait for the explorer, click next divergence: (view before, view after,
    the notebook's text at the end)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    with sync_playwright() as play:
        browser = launch(play)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=120_000)
            accept_kernel_dialog(page)
            dismiss_news_toast(page)
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000)
            page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
            page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
            view = page.locator(".gnb-explorer .gnb-explorer-view")
            try:
                view.wait_for(state="visible", timeout=300_000)
            except PlaywrightTimeout:
                page.screenshot(path=str(shots / "explorer_missing.png"), full_page=True)
                raise AssertionError("no explorer after Run All; the notebook shows:\n"
                                     + page.locator(".jp-Notebook").inner_text()[-4000:]) from None
            page.locator(".gnb-explorer").scroll_into_view_if_needed()
            before = view.inner_text()
            page.screenshot(path=str(shots / "explorer_before_click.png"))
            page.locator(".gnb-next-divergence").click()
            page.wait_for_function("(old) => document.querySelector('.gnb-explorer-view').innerText !== old",
                                   arg=before, timeout=30_000)
            after = view.inner_text()
            page.locator(".gnb-explorer").scroll_into_view_if_needed()
            page.screenshot(path=str(shots / "explorer_after_click.png"))
            page.wait_for_selector(".jp-OutputArea-output:has-text('LayerFailed')", timeout=120_000)
            return before, after, page.locator(".jp-Notebook").inner_text()
        finally:
            browser.close()


@pytest.mark.slow
def test_explorer_runs_live_in_jupyterlab_on_a_failing_layer(tiny_model_dir, tokenizer, tmp_path):
    import papermill

    from gymnb.policy.server import PolicyServer

    root = tmp_path / "lab"
    root.mkdir()
    shots = Path(os.environ.get("GYMNB_SCREENSHOTS") or tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    rollouts = recorded_rollouts(tokenizer, tmp_path / "rollouts.jsonl")
    with PolicyServer.start(str(tiny_model_dir), model_id="tiny", splice=False) as server:
        papermill.execute_notebook(str(NOTEBOOKS_DIR / "04_token_continuity.ipynb"), str(root / "04.ipynb"),
                                   prepare_only=True, kernel_name="python3",
                                   parameters={"base_url": server.url, "model": str(tiny_model_dir),
                                               "rollouts_path": str(rollouts), "probe_max_tokens": 4,
                                               "output_dir": str(tmp_path / "out")})
        lab, url = start_lab(root, tmp_path)
        try:
            before, after, notebook_text = run_all_and_click(url, shots)
        finally:
            lab.terminate()
            lab.wait(timeout=30)
    # opened on the first divergence: a probe, which sent the token fields, so the server is at fault
    assert "probe:" in before and "breaks continuity" in before and "Server at fault" in before
    assert before != after and "breaks continuity" in after
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["status"] == "fail" and results["figures"]["num_broken"] >= 3
    assert "LayerFailed" in notebook_text  # the last cell failed the run after the explorer was shown
    for name in ("explorer_before_click.png", "explorer_after_click.png"):
        assert (shots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shutil.rmtree(tmp_path / "runtime", ignore_errors=True)
