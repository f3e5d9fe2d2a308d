"""Validation stage: the PNG plots of the layer notebooks (drawn without pyplot, so no backend state leaks).

Each function saves `<output_dir>/<name>.png` and returns a `Plot`, which Jupyter displays inline and whose
file name goes into the layer's results so the HTML report can embed it.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

PASS_COLOUR, FAIL_COLOUR, NEUTRAL_COLOUR = "#2da44e", "#cf222e", "#0969da"


class Plot:
    """A saved PNG; displays itself in a notebook."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.name = self.path.name

    def _repr_png_(self) -> bytes:
        return self.path.read_bytes()

    def __repr__(self) -> str:
        return f"Plot({self.path})"


def save_figure(fig: Figure, output_dir: str | Path, name: str) -> Plot:
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return Plot(path)


def plot_histogram(values, output_dir, name: str, *, title: str, xlabel: str, bins=20, colour=NEUTRAL_COLOUR,
                   log_y: bool = False, vline: float | None = None) -> Plot:
    """A histogram of `values` (an empty list draws an empty, labelled axis rather than failing)."""
    fig = Figure(figsize=(6, 3.2))
    ax = fig.add_subplot()
    values = list(values)
    if values:
        ax.hist(values, bins=bins, color=colour, edgecolor="white")
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    if vline is not None:
        ax.axvline(vline, color=FAIL_COLOUR, linestyle="--", linewidth=1)
    if log_y and values:
        ax.set_yscale("log")
    else:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts: no 0.5 ticks
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    return save_figure(fig, output_dir, name)


def plot_bars(labels: list[str], values: list[float], ok: list[bool], output_dir, name: str, *, title: str,
              xlabel: str) -> Plot:
    """Horizontal bars, green where the item passed and red where it failed."""
    fig = Figure(figsize=(6, 0.6 + 0.28 * max(len(labels), 1)))
    ax = fig.add_subplot()
    colours = [PASS_COLOUR if good else FAIL_COLOUR for good in ok]
    ax.barh(range(len(labels)), values, color=colours)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    if all(float(v).is_integer() for v in values):  # e.g. model calls: no fractional ticks
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    return save_figure(fig, output_dir, name)


def embed_png(path: Path) -> str:
    """An <img> with the PNG inlined as a data URI (missing files are named, not fatal)."""
    if not path.exists():
        return f"<p>plot {html.escape(path.name)} is missing</p>"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'
