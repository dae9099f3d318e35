"""Figures, as matplotlib Figure objects (the caller saves them)."""

from __future__ import annotations

from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # no display on cluster nodes and CI

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def twovtwo_figure(scores: Sequence[dict[str, Any]], alpha: float) -> Figure:
    """2 vs. 2 accuracy by layer, one panel per word model and one line per CNN (Figs. 1-3 of the 2021 paper).

    ``scores`` are rows of the scores table; the mean-over-sets rows (set_index
    None) are drawn: accuracy with +-1 std over sets, the permutation null's
    mean +-2 std as a grey band, filled markers where BHY finds the layer
    significant at ``alpha``, hollow where it does not.
    """
    rows = [r for r in scores if r["set_index"] is None]
    words = list(dict.fromkeys(r["word_model"] for r in rows))
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(words), figsize=(7 * len(words), 4.2), squeeze=False)
    for ax, wm in zip(axes[0], words):
        for colour, model in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4, models):
            line = sorted((r for r in rows if r["word_model"] == wm and r["model"] == model), key=lambda r: r["layer_index"])
            if not line:
                continue
            x = list(range(len(line)))
            acc = [r["accuracy"] for r in line]
            std = [r["std"] for r in line]
            ax.plot(x, acc, color=colour, label=f"{model} ({line[0]['n_concepts']} concepts, {line[0]['n_pairs']} pairs)")
            ax.fill_between(x, [a - s for a, s in zip(acc, std)], [a + s for a, s in zip(acc, std)], color=colour, alpha=0.15)
            if line[0]["null_mean"] is not None:
                lo = [r["null_mean"] - 2 * r["null_std"] for r in line]
                hi = [r["null_mean"] + 2 * r["null_std"] for r in line]
                ax.fill_between(x, lo, hi, color="grey", alpha=0.2, lw=0)
            sig = [bool(r["significant"]) for r in line]
            ax.scatter([i for i, s in zip(x, sig) if s], [a for a, s in zip(acc, sig) if s], color=colour, zorder=3, s=18)
            ax.scatter([i for i, s in zip(x, sig) if not s], [a for a, s in zip(acc, sig) if not s], facecolors="white",
                       edgecolors=colour, zorder=3, s=18)
        ax.axhline(0.5, color="black", lw=0.6, ls=":")
        ax.set_title(f"2 vs. 2 against {wm}")
        ax.set_xlabel("layer (input to output)")
        ax.set_ylabel("2 vs. 2 accuracy (mean over image sets)")
        ax.legend(fontsize=8, loc="upper left")
        ax.text(0.99, 0.01, f"filled: significant after BHY at {alpha}; grey: permutation null +-2 std",
                transform=ax.transAxes, ha="right", va="bottom", fontsize=7, color="dimgrey")
    fig.tight_layout()
    return fig
