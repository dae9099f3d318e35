"""The run's figures beyond its layer curves, drawn from what the run stored: heatmaps of the similarity matrices
and the per-concept pass rates through the layers (the math and the drawing are in ``analysis.figures``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from semprobe.analysis.figures import cluster_order, concept_heatmap, first_best_last, similarity_heatmaps
from semprobe.ray_jobs.storage import Output
from semprobe.ray_jobs.store import matrices, similarity_file, word_similarity_file


def stored_matrix(output: Output, parts: Sequence[str], concept_ids: Sequence[str]) -> np.ndarray:
    """A stored similarity matrix, rows and columns in the order of ``concept_ids`` (float64)."""
    table = output.read_table(*parts)
    position = {c: i for i, c in enumerate(table["concept_ids"][0].as_py())}
    index = [position[c] for c in concept_ids]
    return matrices(table)[0].astype(np.float64)[np.ix_(index, index)]


def similarity_figure(output: Output, model_plan, scores: Sequence[dict[str, Any]], words: Sequence[str]) -> Figure:
    """Heatmaps of a run's matrices for one model: its first, best and last layer (the CNN matrix, mean over the
    image sets; best: the highest 2 vs. 2 accuracy, mean over the word models) and each word model's, the
    concepts in the order of a hierarchical clustering of the first word model's matrix (average linkage on
    1 - r: ``analysis.figures.cluster_order``).

    ``model_plan`` is the run's ``scheduler.ModelPlan``: where the matrices are (``key``), the concepts, the sets.
    """
    rows = [r for r in scores if r["model"] == model_plan.model]
    layers = [name for name, _ in sorted(model_plan.layers, key=lambda item: item[1])]
    accuracy = [float(np.mean([r["accuracy"] for r in rows if r["layer"] == layer])) for layer in layers]
    ids = model_plan.concept_ids
    panels = []
    for role, layer in first_best_last(layers, accuracy):
        sets = [stored_matrix(output, similarity_file(model_plan.key, layer, k), ids) for k in model_plan.set_indices]
        panels.append((f"{role}: {layer}\n2 vs. 2 {accuracy[layers.index(layer)]:.3f}", np.mean(sets, axis=0)))
    word_matrices = [stored_matrix(output, word_similarity_file(model_plan.key, wm), ids) for wm in words]
    panels += [(f"word model: {wm}", m) for wm, m in zip(words, word_matrices)]
    return similarity_heatmaps(
        panels,
        model_plan.words[words[0]],
        cluster_order(word_matrices[0]),
        f"{model_plan.model}: concept x concept Pearson r over {len(ids)} concepts (CNN layers: mean over "
        f"{len(model_plan.set_indices)} image set(s))\nconcepts ordered by average-linkage clustering of the "
        f"{words[0]} matrix (distance 1 - r)",
    )


def concept_figures(concept_scores: Sequence[dict[str, Any]], model: str, words: Sequence[str], x: str) -> dict:
    """word model -> the figure of per-concept pass rates through ``model``'s layers (``analysis.figures.
    concept_heatmap``: the 20 best and the 20 worst concepts)."""
    return {
        wm: concept_heatmap(
            [r for r in concept_scores if r["model"] == model and r["word_model"] == wm],
            f"{model} against {wm}: per-concept 2 vs. 2 pass rate",
            x=x,
        )
        for wm in words
    }
