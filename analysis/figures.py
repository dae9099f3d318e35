"""Figures, as matplotlib Figure objects (the caller saves them)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from scipy.cluster.hierarchy import leaves_list, linkage
from scipy.spatial.distance import squareform

from semprobe.analysis.errors import InputError

MAX_TICKS = 15  # layer names on an axis: more than this overlap, even rotated, at a paper's column width
MAX_LABEL = 28  # characters of a tick label; longer names keep their head and tail
X_AXES = ("names", "depth")  # --x: what a layer curve's x axis shows
DEPTH_LABEL = "relative depth (layer position / (number of layers - 1))"


def short(name: str, limit: int = MAX_LABEL) -> str:
    """``name`` cut to ``limit`` characters around an ellipsis: layer names and checkpoint paths run long, and their
    head (the stage) and tail (the operation) are what tell them apart."""
    if len(name) <= limit:
        return name
    head = (limit - 3) // 2
    return f"{name[:head]}...{name[len(name) - (limit - 3 - head) :]}"


def short_layer(name: str, limit: int = MAX_LABEL) -> str:
    """A layer's name cut to ``limit`` characters from the front, at a dot where it can: the tail holds the stage,
    block and operation that tell layers apart ('...stage3.block7.conv_pwl.bn')."""
    if len(name) <= limit:
        return name
    parts = name.split(".")
    for k in range(1, len(parts)):
        tail = ".".join(parts[k:])
        if len(tail) + 3 <= limit:
            return f"...{tail}"
    return f"...{name[len(name) - (limit - 3) :]}"


def thinned_ticks(n: int, max_ticks: int = MAX_TICKS) -> list[int]:
    """Positions (0..n-1) of the layers whose names label an axis: every layer up to ``max_ticks``, else
    ``max_ticks`` evenly spaced ones, the first and the last included (position i * (n - 1) / (max_ticks - 1),
    rounded half up)."""
    if n <= max_ticks:
        return list(range(n))
    # integer arithmetic: round half up, the same on every platform (np.round rounds half to even)
    return sorted({(2 * i * (n - 1) + max_ticks - 1) // (2 * (max_ticks - 1)) for i in range(max_ticks)})


def relative_depth(n: int) -> list[float]:
    """Each of ``n`` layers' relative depth: its position in the catalog's order (input to output) over n - 1, so
    that CNNs with different numbers of layers share one axis from 0 (first probed layer) to 1 (last)."""
    return [i / (n - 1) if n > 1 else 0.0 for i in range(n)]


def _layer_axis(ax, layers: Sequence[str], x: str) -> list[float]:
    """The x positions of ``layers`` (in order) on ``ax`` for ``x`` (names or depth), with its ticks and label."""
    if x not in X_AXES:
        raise InputError(f"unknown x axis '{x}': choose one of {', '.join(X_AXES)}")
    if x == "depth":
        ax.set_xlim(-0.02, 1.02)
        ax.set_xlabel(DEPTH_LABEL)
        return relative_depth(len(layers))
    ticks = thinned_ticks(len(layers))
    ax.set_xticks(
        ticks, [short_layer(layers[i]) for i in ticks], rotation=45, ha="right", rotation_mode="anchor", fontsize=7
    )
    ax.set_xticks(range(len(layers)), minor=True)  # a small tick at every layer, named or not
    ax.set_xlabel(
        "layer (input to output" + (f"; {len(ticks)} of {len(layers)} named" if len(ticks) < len(layers) else "") + ")"
    )
    return list(range(len(layers)))


def _footnote(ax, text: str) -> None:
    """A small grey note in the axes' lower right corner: how to read the figure."""
    ax.text(0.99, 0.01, text, transform=ax.transAxes, ha="right", va="bottom", fontsize=7, color="dimgrey")


def _significance_markers(ax, x, y, significant, colour, label: str, size: float = 18) -> None:
    """Filled markers where ``significant``, hollow elsewhere; the two scatter artists carry gids
    ``<label>:significant`` and ``<label>:not significant`` (tests and SVG readers find them by it)."""
    sig = [bool(s) for s in significant]
    for filled, gid in ((True, "significant"), (False, "not significant")):
        points = [(a, b) for a, b, s in zip(x, y, sig) if s == filled]
        style = {"color": colour} if filled else {"facecolors": "white", "edgecolors": colour}
        ax.scatter(
            [a for a, _ in points],
            [b for _, b in points],
            zorder=3,
            s=size,
            linewidths=0.9,
            gid=f"{label}:{gid}",
            **style,
        )


def layer_curves(scores: Sequence[dict[str, Any]], model: str, alpha: float, x: str = "names") -> Figure:
    """2 vs. 2 accuracy through the layers of one CNN, one line per word model (Figs. 1-3 of the 2021 paper).

    ``scores`` are rows of the scores table (means over image sets); the model's are
    drawn: accuracy with a +-1 std band over image sets, the
    permutation null's mean +-2 std in grey, chance at 0.5, filled markers
    where BHY finds the layer significant at ``alpha`` and hollow where it does not.
    ``x``: ``names`` labels the axis with the layers' names (at most ``MAX_TICKS``, evenly thinned, see
    :func:`thinned_ticks`); ``depth`` puts the layers at their relative depth (:func:`relative_depth`).
    """
    rows = [r for r in scores if r["model"] == model]
    word_models = list(dict.fromkeys(r["word_model"] for r in rows))
    # A bare Figure, not pyplot's: no display needed, and nothing kept alive between calls.
    fig = Figure(figsize=(7.5, 4.6), layout="constrained")
    ax = fig.subplots()
    colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, word_model in enumerate(word_models):
        colour = colours[i % len(colours)]
        line = sorted((r for r in rows if r["word_model"] == word_model), key=lambda r: r["layer_index"])
        if i == 0:
            xs = _layer_axis(ax, [r["layer"] for r in line], x)
        acc = [r["accuracy"] for r in line]
        std = [r["std"] for r in line]
        ax.plot(
            xs, acc, color=colour, label=f"{word_model} ({line[0]['n_concepts']} concepts, {line[0]['n_pairs']} pairs)"
        )
        ax.fill_between(
            xs, [a - s for a, s in zip(acc, std)], [a + s for a, s in zip(acc, std)], color=colour, alpha=0.2, lw=0
        )
        if line[0]["null_mean"] is not None:
            ax.fill_between(
                xs,
                [r["null_mean"] - 2 * r["null_std"] for r in line],
                [r["null_mean"] + 2 * r["null_std"] for r in line],
                color="grey",
                alpha=0.15,
                lw=0,
            )
        _significance_markers(ax, xs, acc, [r["significant"] for r in line], colour, word_model)
    ax.axhline(0.5, color="black", lw=0.6, ls=":", label="chance")
    ax.set_title(f"{model}: 2 vs. 2 through the layers")
    ax.set_ylabel("2 vs. 2 accuracy (mean over image sets)")
    ax.grid(axis="y", color="0.92", lw=0.6)
    ax.legend(fontsize=8, loc="upper left")
    _footnote(ax, f"band: +-1 std over sets; grey: permutation null +-2 std; filled: significant after BHY at {alpha}")
    return fig


def compare_curves(curves: Sequence[dict[str, Any]], title: str = "2 vs. 2 through the layers") -> Figure:
    """Several CNNs or runs on one axis of relative depth (:func:`relative_depth`), one line per curve.

    ``curves``: dicts with ``label``, and ``accuracy`` and ``significant`` (BHY, as the run decided it; None
    without permutations) per layer in the catalog's order. Filled markers: significant; hollow: not.
    """
    fig = Figure(figsize=(7.5, 4.6), layout="constrained")
    ax = fig.subplots()
    colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", "-.", ":"]  # past ten curves the colours repeat: the line style still tells them apart
    for i, curve in enumerate(curves):
        colour = colours[i % len(colours)]
        xs = relative_depth(len(curve["accuracy"]))
        ax.plot(xs, curve["accuracy"], styles[(i // len(colours)) % len(styles)], color=colour, lw=1.3,
                label=curve["label"])  # fmt: skip
        _significance_markers(ax, xs, curve["accuracy"], curve["significant"], colour, curve["label"], size=16)
    ax.axhline(0.5, color="black", lw=0.6, ls=":", label="chance")
    ax.set_xlim(-0.02, 1.02)
    ax.set_xlabel(DEPTH_LABEL)
    ax.set_ylabel("2 vs. 2 accuracy (mean over image sets)")
    ax.set_title(title)
    ax.grid(axis="y", color="0.92", lw=0.6)
    ax.legend(fontsize=7, loc="upper left", ncol=1 if len(curves) < 6 else 2)
    _footnote(ax, "filled: significant after BHY (each run's own family and alpha); hollow: not")
    return fig


def cluster_order(word_matrix: np.ndarray) -> np.ndarray:
    """The order of the concepts that puts similar words together: the leaves of a hierarchical clustering
    (average linkage, UPGMA) of the word matrix, with distance 1 - r between concepts.

    Parameters
    ----------
    word_matrix : (w, w) array
        Pearson r between the concepts' word vectors.

    Returns
    -------
    (w,) int array, a permutation of 0..w-1 (scipy's ``leaves_list``)
    """
    r = np.asarray(word_matrix, np.float64)
    if r.ndim != 2 or r.shape[0] != r.shape[1] or r.shape[0] < 2:
        raise InputError(f"cluster_order needs a square matrix of at least 2 concepts, got shape {r.shape}")
    distance = 1.0 - (r + r.T) / 2  # symmetric to the last bit: float32 matrices come back with rounding asymmetry
    np.fill_diagonal(distance, 0.0)
    return leaves_list(linkage(squareform(np.clip(distance, 0.0, None), checks=False), method="average"))


def first_best_last(layers: Sequence[str], accuracy: Sequence[float]) -> list[tuple[str, str]]:
    """(role, layer) for the first layer, the best (highest ``accuracy``; the earliest of a tie) and the last, in
    that order; a layer that plays two roles appears once, its roles joined ('first, best')."""
    best = max(range(len(layers)), key=lambda i: (accuracy[i], -i))
    roles: dict[int, list[str]] = {}
    for role, i in (("first", 0), ("best", best), ("last", len(layers) - 1)):
        roles.setdefault(i, []).append(role)
    return [(", ".join(names), layers[i]) for i, names in sorted(roles.items())]


def similarity_heatmaps(
    panels: Sequence[tuple[str, np.ndarray]], labels: Sequence[str], order: Sequence[int], title: str = ""
) -> Figure:
    """The w x w matrices of ``panels`` (title, matrix), side by side, rows and columns in ``order``.

    Each panel has its own diverging colour scale, symmetric about r = 0 and set by its largest off-diagonal
    |r| (the diagonal, 1, would wash out a layer whose correlations stay small); concepts are named on the axes
    while there are few enough to read (at most 60).
    """
    order = np.asarray(order)
    w = len(order)
    cols = min(len(panels), 4)  # first, best, last and one word model: one row
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(3.6 * cols + 0.6, 3.5 * rows + 0.5), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    off = ~np.eye(w, dtype=bool)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, (name, matrix) in zip(axes.flat, panels):
        shown = np.asarray(matrix, np.float64)[np.ix_(order, order)]
        limit = float(np.abs(shown[off]).max()) or 1.0
        image = ax.imshow(shown, cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        if w <= 60:
            names = [short(labels[i], 16) for i in order]
            size = 7 if w <= 25 else 5
            ax.set_xticks(range(w), names, rotation=90, fontsize=size)
            ax.set_yticks(range(w), names, fontsize=size)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
        fig.colorbar(image, ax=ax, shrink=0.8, label="Pearson r")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def concept_ranking(rows: Sequence[dict[str, Any]], n: int = 20) -> tuple[list[str], list[str]]:
    """The ``n`` best and ``n`` worst concepts by their mean pass rate over the layers (ties: concept id), best
    first in each; with at most 2n concepts, all of them in the first list, best first, and none in the second."""
    by_concept: dict[str, list[float]] = {}
    for r in rows:
        by_concept.setdefault(r["concept_id"], []).append(r["pass_rate"])
    ranked = sorted(by_concept, key=lambda c: (-sum(by_concept[c]) / len(by_concept[c]), c))
    if len(ranked) <= 2 * n:
        return ranked, []
    return ranked[:n], ranked[-n:]


def concept_heatmap(rows: Sequence[dict[str, Any]], title: str, n: int = 20, x: str = "names") -> Figure:
    """Per-concept pass rates through the layers: one row per concept, one column per layer, for the ``n`` best and
    the ``n`` worst concepts (:func:`concept_ranking`); chance (0.5) white, red above, blue below.

    ``rows`` are one (model, word model)'s rows of the concept scores table (layer, layer_index, concept_id, word,
    pass_rate). ``x`` as in :func:`layer_curves` (with ``depth`` the columns are labelled by relative depth).
    """
    layers = [name for _, name in sorted({(r["layer_index"], r["layer"]) for r in rows})]
    column = {name: j for j, name in enumerate(layers)}
    rate = {(r["concept_id"], r["layer"]): r["pass_rate"] for r in rows}
    word = {r["concept_id"]: r["word"] for r in rows}
    best, worst = concept_ranking(rows, n)
    groups = [(f"the {len(best)} best", best), (f"the {len(worst)} worst", worst)] if worst else [("all", best)]
    height = sum(len(g) for _, g in groups)
    fig = Figure(figsize=(7.5, 1.2 + 0.16 * height + 0.5 * len(groups)), layout="constrained")
    axes = fig.subplots(len(groups), 1, squeeze=False, height_ratios=[len(g) for _, g in groups])[:, 0]
    for ax, (name, concepts) in zip(axes, groups):
        grid = np.full((len(concepts), len(layers)), np.nan)
        for i, c in enumerate(concepts):
            for layer in layers:
                grid[i, column[layer]] = rate.get((c, layer), np.nan)
        image = ax.imshow(grid, cmap="RdBu_r", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
        ax.set_yticks(range(len(concepts)), [short(f"{word[c]} ({c})", 24) for c in concepts], fontsize=6)
        ax.set_ylabel(f"{name} concepts", fontsize=8)
        ax.set_xticks(range(len(layers)), minor=True)  # a small tick at every layer
        if x == "depth":  # column j sits at depth j / (n - 1): ticks at round depths, between columns if need be
            depths = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0] if len(layers) > 1 else [0.0]
            ax.set_xticks([d * (len(layers) - 1) for d in depths], [f"{d:.1f}" for d in depths], fontsize=7)
            ax.set_xlabel(DEPTH_LABEL, fontsize=8)
        else:
            ticks = thinned_ticks(len(layers))
            ax.set_xticks(ticks, [short_layer(layers[j]) for j in ticks], rotation=45, ha="right",
                          rotation_mode="anchor", fontsize=7)  # fmt: skip
            ax.set_xlabel("layer (input to output)", fontsize=8)
    for ax in axes[:-1]:  # one layer axis, under the last panel
        ax.tick_params(labelbottom=False)
        ax.set_xlabel("")
    fig.colorbar(image, ax=list(axes), label="pass rate (fraction of the concept's pairs passed)", shrink=0.9)
    axes[0].set_title(f"{title}\nconcepts ranked by their mean pass rate over the layers; chance 0.5", fontsize=9)
    return fig


def affine_heatmap(scores: Sequence[dict[str, Any]], names: Sequence[str], method: str) -> Figure:
    """The N x N table in the thesis's format: rows source, columns target, accuracy in each cell,
    shaded by the percent change from the source CNN alone (the diagonal)."""
    cell = {(r["source"], r["target"]): r for r in scores if r["method"] == method}
    n = len(names)
    change = [[cell[(s, t)]["pct_change_vs_source"] or 0.0 for t in names] for s in names]
    fig = Figure(figsize=(1.1 * n + 3, 0.9 * n + 2), layout="constrained")
    ax = fig.subplots()
    labels = [short(name) for name in names]  # checkpoint paths run long
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
        xs = _layer_axis(ax, [r["layer"] for r in line], "names")
        (drawn,) = ax.plot(xs, acc, label=f"{group} (n = {line[0]['n']})", **style)
        sig = [bool(r["significant"]) for r in line]
        ax.scatter(
            [i for i, s in zip(xs, sig) if s],
            [a for a, s in zip(acc, sig) if s],
            color=drawn.get_color(),
            s=18,
            zorder=3,
        )
    ax.axhline(0.5, color="black", lw=0.6, ls=":", label="chance")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(f"1 vs. 2 accuracy ({sides})")
    ax.legend(fontsize=8)
    _footnote(ax, "filled: significant after BHY")
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
