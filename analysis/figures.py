"""Figures, as matplotlib Figure objects (the caller saves them)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib
from matplotlib.figure import Figure


def layer_curves(scores: Sequence[dict[str, Any]], model: str, alpha: float) -> Figure:
    """2 vs. 2 accuracy through the layers of one CNN, one line per word model (Figs. 1-3 of the 2021 paper).

    ``scores`` are rows of the scores table (means over image sets); the model's are
    drawn: accuracy with a +-1 std band over image sets, the
    permutation null's mean +-2 std in grey, chance at 0.5, filled markers
    where BHY finds the layer significant at ``alpha`` and hollow where it does not.
    """
    rows = [r for r in scores if r["model"] == model]
    word_models = list(dict.fromkeys(r["word_model"] for r in rows))
    # A bare Figure, not pyplot's: no display needed, and nothing kept alive between calls.
    fig = Figure(figsize=(max(7.0, 0.12 * len(rows) / max(len(word_models), 1)), 4.2), layout="tight")
    ax = fig.subplots()
    colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, word_model in enumerate(word_models):
        colour = colours[i % len(colours)]
        line = sorted((r for r in rows if r["word_model"] == word_model), key=lambda r: r["layer_index"])
        x = range(len(line))
        acc = [r["accuracy"] for r in line]
        std = [r["std"] for r in line]
        ax.plot(
            x, acc, color=colour, label=f"{word_model} ({line[0]['n_concepts']} concepts, {line[0]['n_pairs']} pairs)"
        )
        ax.fill_between(
            x, [a - s for a, s in zip(acc, std)], [a + s for a, s in zip(acc, std)], color=colour, alpha=0.2, lw=0
        )
        if line[0]["null_mean"] is not None:
            ax.fill_between(
                x,
                [r["null_mean"] - 2 * r["null_std"] for r in line],
                [r["null_mean"] + 2 * r["null_std"] for r in line],
                color="grey",
                alpha=0.15,
                lw=0,
            )
        sig = [bool(r["significant"]) for r in line]
        ax.scatter([j for j in x if sig[j]], [acc[j] for j in x if sig[j]], color=colour, zorder=3, s=18)
        ax.scatter(
            [j for j in x if not sig[j]],
            [acc[j] for j in x if not sig[j]],
            facecolors="white",
            edgecolors=colour,
            zorder=3,
            s=18,
        )
    ax.axhline(0.5, color="black", lw=0.6, ls=":", label="chance")
    ax.set_title(f"{model}: 2 vs. 2 through the layers")
    ax.set_xlabel("layer (input to output)")
    ax.set_ylabel("2 vs. 2 accuracy (mean over image sets)")
    ax.legend(fontsize=8, loc="upper left")
    ax.text(
        0.99,
        0.01,
        f"band: +-1 std over sets; grey: permutation null +-2 std; filled: significant after BHY at {alpha}",
        transform=ax.transAxes,
        ha="right",
        va="bottom",
        fontsize=7,
        color="dimgrey",
    )
    return fig


def affine_heatmap(scores: Sequence[dict[str, Any]], names: Sequence[str], method: str) -> Figure:
    """The N x N table in the thesis's format: rows source, columns target, accuracy in each cell,
    shaded by the percent change from the source CNN alone (the diagonal)."""
    cell = {(r["source"], r["target"]): r for r in scores if r["method"] == method}
    n = len(names)
    change = [[cell[(s, t)]["pct_change_vs_source"] or 0.0 for t in names] for s in names]
    fig = Figure(figsize=(1.1 * n + 3, 0.9 * n + 2), layout="constrained")
    ax = fig.subplots()
    labels = [name if len(name) <= 28 else f"{name[:12]}...{name[-12:]}" for name in names]  # checkpoint paths run long
    limit = max(1.0, max(abs(v) for row in change for v in row))
    image = ax.imshow(change, cmap="RdBu", vmin=-limit, vmax=limit)
    for i, s in enumerate(names):
        for j, t in enumerate(names):
            dark = abs(change[i][j]) > limit / 2
            ax.text(
                j,
                i,
                f"{100 * cell[(s, t)]['accuracy']:.1f}",
                ha="center",
                va="center",
                fontsize=9,
                color="white" if dark else "black",
            )
    ax.set_xticks(range(n), labels, rotation=30, ha="right")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("target CNN (its classifier)")
    ax.set_ylabel("source CNN (its features)")
    ax.set_title(
        f"{method} maps: top-1 accuracy (%)\nshaded by change from the source CNN alone (diagonal)", fontsize=10
    )
    fig.colorbar(image, ax=ax, label="% change vs. source")
    return fig


def one_vs_two_figure(
    rows: Sequence[dict[str, Any]], title: str, sides: str = "true class beats predicted", overall: str | None = None
) -> Figure:
    """1 vs. 2 accuracy through the layers, one line per group, chance (0.5) marked, BHY-significant layers filled.

    ``sides`` names what a pass means (the y label); the group ``overall``, if any, is drawn black and bold.
    """
    fig = Figure(figsize=(7.0, 4.0), layout="constrained")
    ax = fig.subplots()
    for group in dict.fromkeys(r["group"] for r in rows):
        line = sorted((r for r in rows if r["group"] == group), key=lambda r: r["layer_index"])
        acc = [r["accuracy"] for r in line]
        style = {"color": "black", "lw": 2.2} if group == overall else {"lw": 1.2}
        (drawn,) = ax.plot(range(len(line)), acc, label=f"{group} (n = {line[0]['n']})", **style)
        sig = [bool(r["significant"]) for r in line]
        ax.scatter(
            [i for i, s in enumerate(sig) if s],
            [a for a, s in zip(acc, sig) if s],
            color=drawn.get_color(),
            s=18,
            zorder=3,
        )
    ax.axhline(0.5, color="black", lw=0.6, ls=":", label="chance")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("layer (input to output)")
    ax.set_ylabel(f"1 vs. 2 accuracy ({sides})")
    ax.legend(fontsize=8)
    ax.text(
        0.99,
        0.01,
        "filled: significant after BHY",
        transform=ax.transAxes,
        ha="right",
        va="bottom",
        fontsize=7,
        color="dimgrey",
    )
    return fig


def adversarial_panel(panel: Sequence[tuple[Any, str, Sequence[tuple[Any, str]]]]) -> Figure:
    """Example adversarial images: one row per source, its clean image first, then an image per target.

    ``panel``: (clean (h, w, 3) uint8, its title, [(adversarial (h, w, 3) uint8, its title), ...]) per row.
    """
    cols = 1 + max((len(attacked) for _, _, attacked in panel), default=0)
    fig = Figure(figsize=(1.9 * cols, 2.1 * max(len(panel), 1)), layout="constrained")
    axes = fig.subplots(max(len(panel), 1), cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for row, (clean, title, attacked) in zip(axes, panel):
        for ax, (image, label) in zip(row, [(clean, title), *attacked]):
            ax.imshow(image)
            ax.set_title(label, fontsize=8)
    return fig


def training_dynamics(
    rows: Sequence[dict[str, Any]], errors: dict[str, Sequence[dict[str, Any]]], word_model: str, alpha: float
) -> Figure:
    """Fig. 4 of the 2021 paper: per training run, train/test error by epoch beside 2 vs. 2 by epoch, one line
    per layer.

    ``rows`` are rows of the dynamics table (means over image sets; those of
    ``word_model`` are drawn), keyed to runs by their ``run_label``;
    ``errors`` maps each run label to its per-epoch rows (epoch, train_error,
    test_error). One figure row per run; one 2 vs. 2 panel per image split.
    Filled markers: significant after BHY at ``alpha``.
    """
    rows = [r for r in rows if r["word_model"] == word_model]
    runs = list(errors)
    splits = sorted(
        {r["split"] for r in rows}, key=lambda s: (s != "train", s)
    )  # training images first, as in the paper
    layers = sorted({(r["layer_index"], r["layer"]) for r in rows})
    fig = Figure(figsize=(4.2 * (1 + len(splits)), 3.4 * len(runs) + 0.4), layout="constrained")
    axes = fig.subplots(len(runs), 1 + len(splits), squeeze=False)
    low = min([r["accuracy"] for r in rows] + [0.45]) - 0.02
    high = max([r["accuracy"] for r in rows] + [0.55]) + 0.02
    colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(runs):
        ax = axes[i][0]
        history = sorted(errors[run], key=lambda h: h["epoch"])
        for column, style in (("train_error", "-"), ("test_error", "--")):
            ax.plot(
                [h["epoch"] for h in history],
                [h[column] for h in history],
                style,
                color="black",
                label=column.replace("_", " "),
            )
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{run}: error")
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
        for j, split in enumerate(splits):
            ax = axes[i][1 + j]
            for k, (_, layer) in enumerate(layers):
                line = sorted(
                    (r for r in rows if r["run_label"] == run and r["split"] == split and r["layer"] == layer),
                    key=lambda r: r["epoch"],
                )
                if not line:
                    continue
                colour = colours[k % len(colours)]
                x, y = [r["epoch"] for r in line], [r["accuracy"] for r in line]
                ax.plot(x, y, color=colour, label=layer, lw=1.2)
                sig = [bool(r["significant"]) for r in line]
                ax.scatter(
                    [a for a, s in zip(x, sig) if s], [b for b, s in zip(y, sig) if s], color=colour, s=12, zorder=3
                )
                ax.scatter(
                    [a for a, s in zip(x, sig) if not s],
                    [b for b, s in zip(y, sig) if not s],
                    facecolors="white",
                    edgecolors=colour,
                    s=12,
                    zorder=3,
                )
            ax.axhline(0.5, color="black", lw=0.6, ls=":")
            ax.set_ylim(low, high)  # one scale for every 2 vs. 2 panel, so runs and splits compare at a glance
            ax.set_title(f"{run}: 2 vs. 2 on {split} images ({word_model})")
            ax.set_xlabel("epoch")
            ax.set_ylabel("2 vs. 2 accuracy")
            ax.legend(fontsize=6, ncol=2)
    fig.suptitle(
        f"training dynamics: filled markers significant after BHY at {alpha}; dotted line: chance",
        fontsize=8,
        color="dimgrey",
    )
    return fig
