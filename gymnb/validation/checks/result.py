"""Validation stage, shared by all five layers: the result a layer notebook builds, displays and writes.

A layer is a list of named checks plus key figures and plots. It passes when it ran at least one check and
every check passed. `write_results` is the notebook's last cell: it writes `results.json` (what the runner
and the HTML report read) and then raises `LayerFailed` with the first failing check, so papermill marks the
notebook failed with a real message while the report still gets every figure.

results.json example:
    {"layer": "token_roundtrip", "status": "fail", "reason": "round trip: 1 of 14 strings changed ids",
     "checks": [{"name": "round trip", "ok": false, "detail": "..."}],
     "figures": {"num_strings": 14, "num_unstable": 1}, "plots": ["roundtrip.png"],
     "details_html": "<table>...</table>"}
"""

from __future__ import annotations

import dataclasses
import html
import json
from pathlib import Path

from gymnb.core.errors import GymnbError

LAYERS = {
    "http_endpoint": "HTTP endpoint",
    "token_roundtrip": "Token round-trip",
    "rollout_collection": "Rollout collection",
    "token_continuity": "Token continuity",
    "gradient_flow": "Gradient flow",
}
RESULTS_FILE = "results.json"


class LayerFailed(GymnbError):
    """A validation layer ran to the end and at least one of its checks failed."""


@dataclasses.dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""


@dataclasses.dataclass
class LayerResult:
    """What one layer found: checks, key figures (name -> number or short text), plot files, HTML details."""

    layer: str
    checks: list[Check] = dataclasses.field(default_factory=list)
    figures: dict = dataclasses.field(default_factory=dict)
    plots: list[str] = dataclasses.field(default_factory=list)  # file names inside the layer's output dir
    details_html: str = ""  # e.g. the token view of a divergence; shown in the notebook and the report
    output_dir: str = ""  # where the plots are; not written to results.json (the runner knows the folder)

    def __post_init__(self):
        if self.layer not in LAYERS:
            raise GymnbError(f"unknown layer {self.layer!r}; layers are {list(LAYERS)}")

    def add(self, name: str, ok: bool, detail: str = "") -> bool:
        """Record one check; returns `ok` so callers can skip checks that depend on it."""
        self.checks.append(Check(name, bool(ok), detail))
        return bool(ok)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    @property
    def status(self) -> str:
        return "pass" if self.passed else "fail"

    @property
    def reason(self) -> str:
        """The first failing check, as `name: detail` ("" when the layer passed)."""
        if not self.checks:
            return "no check ran"
        failed = [c for c in self.checks if not c.ok]
        if not failed:
            return ""
        first = failed[0]
        more = f" (and {len(failed) - 1} more failing checks)" if len(failed) > 1 else ""
        return f"{first.name}: {first.detail}{more}" if first.detail else f"{first.name}{more}"

    def to_dict(self) -> dict:
        return {
            "layer": self.layer,
            "status": self.status,
            "reason": self.reason,
            "checks": [dataclasses.asdict(c) for c in self.checks],
            "figures": self.figures,
            "plots": self.plots,
            "details_html": self.details_html,
        }

    def _plots_html(self) -> str:
        from gymnb.validation.checks.plots import embed_png  # the report embeds plots the same way

        return "".join(embed_png(Path(self.output_dir) / name) for name in self.plots)

    def _repr_html_(self) -> str:
        colour = "#1a7f37" if self.passed else "#cf222e"
        td = "<td style='text-align:left;vertical-align:top'>"  # JupyterLab right-aligns table cells
        rows = "".join(
            f"<tr>{td}{check_mark(c.ok)}</td>{td}{html.escape(c.name)}</td>"
            f"{td}<pre style='margin:0;white-space:pre-wrap'>{html.escape(c.detail)}</pre></td></tr>"
            for c in self.checks
        )
        figures = "".join(f"<tr>{td}{html.escape(str(k))}</td>{td}{html.escape(format_figure(v, k))}</td></tr>"
                          for k, v in self.figures.items())
        return (
            f"<h3 style='color:{colour}'>{LAYERS[self.layer]}: {self.status.upper()}</h3>"
            f"<table>{rows}</table><h4>Key figures</h4><table>{figures}</table>{self._plots_html()}"
            f"{self.details_html}"
        )


def check_mark(ok: bool) -> str:
    """A coloured ok/FAIL label (plain text: headless browsers often lack emoji fonts)."""
    colour = "#1a7f37" if ok else "#cf222e"
    return f"<b style='color:{colour}'>{'ok' if ok else 'FAIL'}</b>"


# Figures whose meaning is in the digits after the point (healthy runs read 1.000008, the bound is 1.05).
PRECISE_FIGURES = {"token_mult_prob_error": 6, "max_abs_logprob_diff": 6}


def format_figure(value, name: str = "") -> str:
    """Floats to 4 significant digits without exponents for everyday magnitudes (14020 ms, not 1.402e+04);
    figures in PRECISE_FIGURES with their fixed digits; everything else as text."""
    if not isinstance(value, float):
        return str(value)
    if name in PRECISE_FIGURES:
        return f"{value:.{PRECISE_FIGURES[name]}f}"
    if 1e4 <= abs(value) < 1e15:
        return f"{value:.0f}"
    return f"{value:.4g}"


def write_results(result: LayerResult, output_dir: str | Path = ".", *, raise_on_fail: bool = True) -> Path:
    """Write `results.json` into `output_dir`; raise LayerFailed naming the first failing check.

    Notebooks with an explorer write with `raise_on_fail=False`, show the explorer, and end with
    `raise_if_failed`: Run All stops at the first raising cell, and the explorer matters most on a failure."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULTS_FILE
    path.write_text(json.dumps(result.to_dict(), indent=2, default=str))
    if raise_on_fail:
        raise_if_failed(result)
    return path


def raise_if_failed(result: LayerResult) -> None:
    """Raise LayerFailed naming the first failing check (papermill then marks the run failed)."""
    if not result.passed:
        raise LayerFailed(f"{LAYERS[result.layer]} failed: {result.reason}")
