"""The data behind each figure, checked against references computed here: the layer names on the axis, the
relative depths, which markers are filled, the clustering order, the matrices as drawn, the concepts ranked."""

import math
from fractions import Fraction

import numpy as np
import pytest
from scipy.cluster.hierarchy import leaves_list, linkage
from scipy.spatial.distance import squareform

from semprobe.analysis.errors import InputError
from semprobe.analysis.figures import (
    MAX_TICKS,
    cluster_order,
    compare_curves,
    concept_heatmap,
    concept_ranking,
    first_best_last,
    layer_curves,
    one_vs_two_figure,
    relative_depth,
    short,
    short_layer,
    similarity_heatmaps,
    thinned_ticks,
)


def reference_ticks(n: int, m: int = 15) -> list[int]:
    """Every layer up to m; else the layers nearest i (n - 1) / (m - 1), i = 0..m-1, halves rounded up."""
    if n <= m:
        return list(range(n))
    return sorted({math.floor(Fraction(i * (n - 1), m - 1) + Fraction(1, 2)) for i in range(m)})


def artist(ax, gid):
    (found,) = [c for c in ax.collections if c.get_gid() == gid]
    return found


def points(ax, gid) -> list[tuple[float, float]]:
    return [tuple(map(float, p)) for p in artist(ax, gid).get_offsets()]


def fake_scores(model, names, word_models, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for wm in word_models:
        for i, name in enumerate(names):
            acc = float(rng.uniform(0.4, 0.9))
            rows.append(
                {
                    "model": model,
                    "layer": name,
                    "layer_index": i,
                    "word_model": wm,
                    "accuracy": acc,
                    "std": 0.01,
                    "n_concepts": 20,
                    "n_pairs": 190,
                    "null_mean": 0.5,
                    "null_std": 0.03,
                    "significant": bool(rng.random() < 0.5),
                }
            )
    return rows


@pytest.mark.parametrize("n", [1, 2, 14, 15, 16, 17, 29, 40, 81, 212])
def test_thinned_ticks_are_evenly_spaced_names_first_and_last_included(n):
    ticks = thinned_ticks(n)
    assert ticks == reference_ticks(n)
    assert len(ticks) <= MAX_TICKS == 15 and ticks[0] == 0 and ticks[-1] == n - 1
    assert relative_depth(n) == ([0.0] if n == 1 else [i / (n - 1) for i in range(n)])


def test_short_keeps_head_and_tail():
    assert short("blocks.1.0.bn3") == "blocks.1.0.bn3"
    name = "features.denseblock4.denselayer16.conv2"
    assert short(name) == name[:12] + "..." + name[-13:] and len(short(name)) == 28


def reference_layer_label(name: str) -> str:
    """A long layer name loses whole leading components ('features.', ...) until it fits 28 characters with '...'."""
    parts = name.split(".")
    while len(name) > 28 and len(parts) > 1 and len(".".join(parts)) + 3 > 28:
        parts = parts[1:]
    tail = ".".join(parts)
    if len(name) <= 28:
        return name
    return "..." + tail if len(tail) + 3 <= 28 else "..." + name[-25:]


def test_long_layer_names_keep_their_tail():
    for name in ["features.stage3.block7.conv_pwl.bn", "a" * 40, "x." + "b" * 30, "blocks.1.0.bn3"]:
        assert short_layer(name) == reference_layer_label(name) and len(short_layer(name)) <= 28
    assert short_layer("features.stage3.block7.conv_pwl.bn") == "...stage3.block7.conv_pwl.bn"


@pytest.mark.parametrize("n", [6, 40])
def test_layer_curve_names_the_layers_thinned_and_fills_exactly_the_significant(n):
    names = [f"features.denseblock{i // 4}.denselayer{i % 4}.conv2" for i in range(n)]
    rows = fake_scores("cnn", names, ["glove-50d", "w2v"])
    ax = layer_curves(rows, "cnn", 0.05).axes[0]
    expected = reference_ticks(n)
    assert list(ax.get_xticks()) == expected
    assert [t.get_text() for t in ax.get_xticklabels()] == [reference_layer_label(names[i]) for i in expected]
    for wm in ("glove-50d", "w2v"):
        line = [r for r in rows if r["word_model"] == wm]
        assert points(ax, f"{wm}:significant") == [(i, r["accuracy"]) for i, r in enumerate(line) if r["significant"]]
        assert points(ax, f"{wm}:not significant") == [
            (i, r["accuracy"]) for i, r in enumerate(line) if not r["significant"]
        ]
        assert list(artist(ax, f"{wm}:not significant").get_facecolor()[0]) == [1, 1, 1, 1]  # hollow


def test_layer_curve_on_relative_depth():
    names = [f"l{i}" for i in range(9)]
    rows = fake_scores("cnn", names, ["glove-50d"], seed=3)
    ax = layer_curves(rows, "cnn", 0.05, x="depth").axes[0]
    assert points(ax, "glove-50d:significant") == [
        (i / 8, r["accuracy"]) for i, r in enumerate(rows) if r["significant"]
    ]
    assert "relative depth" in ax.get_xlabel()
    with pytest.raises(InputError, match="unknown x axis 'deep': choose one of names, depth"):
        layer_curves(rows, "cnn", 0.05, x="deep")


def test_one_vs_two_names_its_layers():
    rows = [
        {"group": g, "layer": f"mixed_{i}", "layer_index": i, "accuracy": 0.5 + i / 50, "n": 9, "significant": i > 1}
        for g in ("all", "top") for i in range(20)
    ]  # fmt: skip
    ax = one_vs_two_figure(rows, "t").axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == [f"mixed_{i}" for i in reference_ticks(20)]


def test_compare_overlays_curves_on_relative_depth_filled_where_significant():
    curves = [
        {"label": "resnet", "accuracy": [0.5, 0.6, 0.7, 0.8, 0.75], "significant": [False, True, True, True, None]},
        {"label": "lite0", "accuracy": [0.55, 0.65, 0.7], "significant": [True, False, True]},
    ]
    ax = compare_curves(curves).axes[0]
    for c in curves:
        n = len(c["accuracy"])
        filled = [(i / (n - 1), a) for i, (a, s) in enumerate(zip(c["accuracy"], c["significant"])) if s]
        hollow = [(i / (n - 1), a) for i, (a, s) in enumerate(zip(c["accuracy"], c["significant"])) if not s]
        assert points(ax, f"{c['label']}:significant") == filled
        assert points(ax, f"{c['label']}:not significant") == hollow
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["resnet", "lite0", "chance"]


def block_words(seed=0):
    """Word vectors in three clear groups, shuffled: r within a group near 1, across near 0."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, 50))
    group = rng.permutation(np.repeat([0, 1, 2], [4, 5, 3]))
    vectors = centres[group] + 0.3 * rng.normal(size=(12, 50))
    return np.corrcoef(vectors).astype(np.float32), group


def test_cluster_order_is_scipys_average_linkage_on_one_minus_r():
    r, group = block_words()
    distance = 1.0 - r.astype(np.float64)
    distance = (distance + distance.T) / 2
    np.fill_diagonal(distance, 0)
    expected = leaves_list(linkage(squareform(distance), method="average"))
    assert cluster_order(r).tolist() == expected.tolist()
    ordered = group[cluster_order(r)]
    assert sum(ordered[i] != ordered[i + 1] for i in range(11)) == 2  # each group contiguous
    with pytest.raises(InputError, match="square matrix"):
        cluster_order(np.ones((3, 2)))


def test_heatmaps_draw_each_matrix_in_the_clustering_order():
    r, _ = block_words(1)
    rng = np.random.default_rng(2)
    cnn = np.corrcoef(rng.normal(size=(12, 30)))
    labels = [f"word{i}" for i in range(12)]
    order = cluster_order(r)
    fig = similarity_heatmaps([("layer", cnn), ("words", r)], labels, order)
    for ax, m in zip(fig.axes, (cnn, r)):
        drawn = np.asarray(ax.images[0].get_array())
        reference = np.array([[m[i, j] for j in order] for i in order], np.float64)
        np.testing.assert_array_equal(drawn, reference)
        limit = max(abs(reference[i, j]) for i in range(12) for j in range(12) if i != j)
        assert ax.images[0].get_clim() == pytest.approx((-limit, limit))
        assert [t.get_text() for t in ax.get_yticklabels()] == [labels[i] for i in order]


def test_first_best_last():
    assert first_best_last(["a", "b", "c", "d"], [0.5, 0.8, 0.8, 0.6]) == [("first", "a"), ("best", "b"), ("last", "d")]
    assert first_best_last(["a", "b", "c"], [0.5, 0.6, 0.9]) == [("first", "a"), ("best, last", "c")]
    assert first_best_last(["a"], [0.5]) == [("first, best, last", "a")]


def concept_rows(w=50, layers=7, seed=0):
    rng = np.random.default_rng(seed)
    rates = rng.uniform(0, 1, size=(w, layers)).round(3)
    rows = [
        {"layer": f"L{j}", "layer_index": j, "concept_id": f"n{i:03d}", "word": f"w{i}",
         "pass_rate": float(rates[i, j])}
        for i in range(w) for j in range(layers)
    ]  # fmt: skip
    return rows, rates


def test_concepts_figure_shows_the_20_best_and_20_worst_by_mean_pass_rate():
    rows, rates = concept_rows()
    means = {f"n{i:03d}": sum(rates[i]) / len(rates[i]) for i in range(len(rates))}
    ranked = sorted(means, key=lambda c: (-means[c], c))
    best, worst = concept_ranking(rows)
    assert (best, worst) == (ranked[:20], ranked[-20:])
    fig = concept_heatmap(rows, "t")
    axes = [ax for ax in fig.axes if ax.images]
    for ax, concepts in zip(axes, (best, worst)):
        drawn = np.asarray(ax.images[0].get_array())
        np.testing.assert_array_equal(drawn, np.array([rates[int(c[1:])] for c in concepts]))
        assert [t.get_text() for t in ax.get_yticklabels()] == [f"w{int(c[1:])} ({c})" for c in concepts]
        assert list(ax.get_xticks()) == list(range(7))
    assert [t.get_text() for t in axes[-1].get_xticklabels()] == [f"L{j}" for j in range(7)]  # under the last panel
    deep = [ax for ax in concept_heatmap(rows, "t", x="depth").axes if ax.images][-1]
    assert list(deep.get_xticks()) == pytest.approx([0, 1.2, 2.4, 3.6, 4.8, 6])  # depth d at column d (n - 1)
    assert [t.get_text() for t in deep.get_xticklabels()] == ["0.0", "0.2", "0.4", "0.6", "0.8", "1.0"]
    small, _ = concept_rows(w=13)
    assert concept_ranking(small) == (sorted({r["concept_id"] for r in small}, key=lambda c: (
        -np.mean([r["pass_rate"] for r in small if r["concept_id"] == c]), c)), [])  # fmt: skip
    assert len([ax for ax in concept_heatmap(small, "t").axes if ax.images]) == 1
