"""Figures, as matplotlib Figure objects (the caller saves them)."""

from __future__ import annotations

from typing import Any, Sequence

import matplotlib
from matplotlib.figure import Figure


def layer_curves(scores: Sequence[dict[str, Any]], model: str, alpha: float) -> Figure:
    """2 vs. 2 accuracy through the layers of one CNN, one line per word model (Figs. 1-3 of the 2021 paper).

    ``scores`` are rows of the scores table; the model's mean-over-sets rows
    (set_index None) are drawn: accuracy with a +-1 std band over image sets, the
    permutation null's mean +-2 std in grey, chance at 0.5, filled markers
    where BHY finds the layer significant at ``alpha`` and hollow where it does not.
    """
    rows = [r for r in scores if r["set_index"] is None and r["model"] == model]
    words = list(dict.fromkeys(r["word_model"] for r in rows))
    # A bare Figure, not pyplot's: no display needed, and nothing kept alive between calls.
    fig = Figure(figsize=(max(7.0, 0.12 * len(rows) / max(len(words), 1)), 4.2), layout="tight")
    ax = fig.subplots()
    colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, wm in enumerate(words):
        colour = colours[i % len(colours)]
        line = sorted((r for r in rows if r["word_model"] == wm), key=lambda r: r["layer_index"])
        x = range(len(line))
        acc = [r["accuracy"] for r in line]
        std = [r["std"] for r in line]
        ax.plot(x, acc, color=colour, label=f"{wm} ({line[0]['n_concepts']} concepts, {line[0]['n_pairs']} pairs)")
        ax.fill_between(x, [a - s for a, s in zip(acc, std)], [a + s for a, s in zip(acc, std)], color=colour, alpha=0.2, lw=0)
        if line[0]["null_mean"] is not None:
            ax.fill_between(x, [r["null_mean"] - 2 * r["null_std"] for r in line], [r["null_mean"] + 2 * r["null_std"] for r in line],
                            color="grey", alpha=0.15, lw=0)
        sig = [bool(r["significant"]) for r in line]
        ax.scatter([j for j in x if sig[j]], [acc[j] for j in x if sig[j]], color=colour, zorder=3, s=18)
        ax.scatter([j for j in x if not sig[j]], [acc[j] for j in x if not sig[j]], facecolors="white", edgecolors=colour,
                   zorder=3, s=18)
    ax.axhline(0.5, color="black", lw=0.6, ls=":", label="chance")
    ax.set_title(f"{model}: 2 vs. 2 through the layers")
    ax.set_xlabel("layer (input to output)")
    ax.set_ylabel("2 vs. 2 accuracy (mean over image sets)")
    ax.legend(fontsize=8, loc="upper left")
    ax.text(0.99, 0.01, f"band: +-1 std over sets; grey: permutation null +-2 std; filled: significant after BHY at {alpha}",
            transform=ax.transAxes, ha="right", va="bottom", fontsize=7, color="dimgrey")
    return fig
