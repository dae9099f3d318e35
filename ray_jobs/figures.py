"""Figures as files: each job draws with :mod:`semprobe.analysis.figures` and saves here."""

from __future__ import annotations

import io
import posixpath
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from semprobe.analysis.architecture import OpGraph, architecture_figure, architecture_svg, layout
from semprobe.ray_jobs.storage import Output

if TYPE_CHECKING:  # matplotlib is imported by the functions that draw (analysis.figures, architecture_figure)
    from matplotlib.figure import Figure


def save_figure(output: Output, figure: Figure, *parts: str, dpi: int = 110) -> bytes:
    """Write ``figure`` as a PNG at ``OUT/<parts>``, atomically; returns its bytes (the report embeds them)."""
    buf = io.BytesIO()
    figure.savefig(buf, format="png", dpi=dpi)
    output.write_bytes(buf.getvalue(), *parts)
    return buf.getvalue()


@dataclass(frozen=True)
class Diagram:
    """One model's architecture diagram as written: the SVG text (the report inlines it, for its tooltips), the
    PNG's bytes, their paths under OUT, and the word model whose accuracies colour it."""

    svg: str
    png: bytes
    svg_path: str
    png_path: str
    word_model: str


def save_architecture(
    output: Output, graph: OpGraph, scores: Sequence[dict[str, Any]], model: str, key: str, word_model: str
) -> Diagram:
    """Draw ``model``'s architecture coloured by its 2 vs. 2 accuracy against ``word_model`` (``scores`` rows) and
    write ``figures/<key>_architecture.svg`` and ``.png``."""
    rows = [r for r in scores if r["model"] == model and r["word_model"] == word_model]
    rows.sort(key=lambda r: r["layer_index"])
    lay = layout(graph, [r["layer"] for r in rows])
    title = f"{model}\n2 vs. 2 accuracy against {word_model}"  # two lines: a narrow network stays compact
    svg = architecture_svg(lay, rows, title, ident="arch-" + re.sub(r"[^A-Za-z0-9_-]", "-", key))
    svg_name, png_name = f"{key}_architecture.svg", f"{key}_architecture.png"
    output.write_bytes(svg.encode(), "figures", svg_name)
    png = save_figure(output, architecture_figure(lay, rows, title), "figures", png_name, dpi=200)
    return Diagram(svg, png, posixpath.join("figures", svg_name), posixpath.join("figures", png_name), word_model)
