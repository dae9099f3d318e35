"""Figures as files: each job draws with :mod:`semprobe.analysis.figures` and saves here."""

from __future__ import annotations

import io

from matplotlib.figure import Figure

from semprobe.ray_jobs.storage import Output


def save_figure(output: Output, figure: Figure, *parts: str, dpi: int = 110) -> bytes:
    """Write ``figure`` as a PNG at ``OUT/<parts>``, atomically; returns its bytes (the report embeds them)."""
    buf = io.BytesIO()
    figure.savefig(buf, format="png", dpi=dpi)
    output.write_bytes(buf.getvalue(), *parts)
    return buf.getvalue()
