"""The architecture diagram's pure parts: collapsing, the layered layout, colours, the SVG and the Figure."""

import xml.etree.ElementTree as ET

import matplotlib
import numpy as np
import pytest
from matplotlib.patches import FancyBboxPatch

from semprobe.analysis.architecture import (
    OpGraph,
    accuracy_norm,
    architecture_figure,
    architecture_svg,
    collapse,
    layer_colours,
    layout,
)
from semprobe.analysis.errors import InputError

SVG = "{http://www.w3.org/2000/svg}"

# An Inception-like block whose two branches interleave in execution order, then a residual connection.
OPS = [
    ("x", "input", []),
    ("conv1", "Conv2d", ["x"]),
    ("relu1", "ReLU", ["conv1"]),
    ("b1_conv", "Conv2d", ["relu1"]),
    ("b2_conv", "Conv2d", ["relu1"]),
    ("b1_bn", "BatchNorm2d", ["b1_conv"]),
    ("b2_bn", "BatchNorm2d", ["b2_conv"]),
    ("b1_relu", "ReLU", ["b1_bn"]),
    ("b2_relu", "ReLU", ["b2_bn"]),
    ("cat", "cat", ["b1_relu", "b2_relu"]),
    ("conv3", "Conv2d", ["cat"]),
    ("bn3", "BatchNorm2d", ["conv3"]),
    ("add", "add", ["bn3", "cat"]),
    ("relu3", "ReLU", ["add"]),
    ("pool", "AdaptiveAvgPool2d", ["relu3"]),
    ("fc", "Linear", ["pool"]),
]
PROBED = ["relu1", "b1_relu", "b2_relu", "cat", "relu3", "fc"]


def graph() -> OpGraph:
    index = {name: i for i, (name, _, _) in enumerate(OPS)}
    edges = tuple((index[a], index[name]) for name, _, sources in OPS for a in sources)
    return OpGraph(tuple(n for n, _, _ in OPS), tuple(o for _, o, _ in OPS), edges)


def rows(names, accuracies=None):
    accuracies = accuracies if accuracies is not None else np.linspace(0.48, 0.83, len(names))
    return [
        {
            "layer": name,
            "layer_index": i,
            "accuracy": float(a),
            "std": 0.01 * (i + 1),
            "p_bhy": 0.001 * (i + 1) if i % 2 else 0.2 + i / 100,
            "significant": bool(i % 2),
            "n_concepts": 40 + i,
        }
        for i, (name, a) in enumerate(zip(names, accuracies))
    ]


def test_collapse_merges_runs_of_unprobed_ops_and_keeps_every_probed_layer():
    nodes, edges = collapse(graph(), PROBED)
    groups = [n.members for n in nodes]
    assert groups == [
        ["x", "conv1"],
        ["relu1"],
        ["b1_conv", "b1_bn"],  # merged across b2_conv, which runs between them
        ["b2_conv", "b2_bn"],
        ["b1_relu"],
        ["b2_relu"],
        ["cat"],
        ["conv3", "bn3"],
        ["add"],
        ["relu3"],
        ["pool"],
        ["fc"],
    ]
    assert [n.probed for n in nodes] == [m[0] in PROBED for m in groups]
    g = {name: i for i, members in enumerate(groups) for name in members}
    expected = {(g[a], g[name]) for name, _, sources in OPS for a in sources if g[a] != g[name]}
    assert set(edges) == expected and len(edges) == len(expected)
    assert all(a < b for a, b in edges)  # topological order


def test_layout_ranks_branches_side_by_side_and_routes_the_residual_beside_the_block():
    lay = layout(graph(), PROBED)
    real = [n for n in lay.nodes if not n.dummy]
    by = {n.name: n for n in real}
    # every probed layer exactly once, in execution order
    assert [n.name for n in lay.probed()] == PROBED
    assert sum(n.name == "cat" for n in lay.nodes) == 1
    # ranks: longest path from the input, by hand
    nodes, edges = collapse(graph(), PROBED)
    rank = [0] * len(nodes)
    for b in range(len(nodes)):
        rank[b] = max([rank[a] + 1 for a, bb in edges if bb == b], default=0)
    assert [n.rank for n in real] == rank
    assert all(n.y == pytest.approx(66 + 30 * n.rank) for n in real)  # one column: y follows the rank
    # the branches share a rank, side by side, boxes apart
    left, right = by["b1_relu"], by["b2_relu"]
    assert left.rank == right.rank and right.x - left.x >= (left.width + right.width) / 2
    # the residual cat -> add spans two ranks: one bend point, off the main path (beside conv3/bn3)
    (bend,) = [n for n in lay.nodes if n.dummy]
    assert bend.rank == by["conv3"].rank and abs(bend.x - by["conv3"].x) >= by["conv3"].width / 2
    # one polyline per edge, from the source's border to the target's, in order
    assert len(lay.edges) == len(edges)

    def on_border(point, node):
        half_w, half_h = (node.width / 2, 9) if node.probed else (4, 4)
        dx, dy = abs(point[0] - node.x), abs(point[1] - node.y)
        inside = dx <= half_w + 1e-9 and dy <= half_h + 1e-9
        return inside and (abs(dx - half_w) < 1e-9 or abs(dy - half_h) < 1e-9)

    for a, b in edges:
        assert sum(on_border(p[0], real[a]) and on_border(p[-1], real[b]) for p in lay.edges) == 1
    # the residual: a bracket on the right, out of cat's right side, down past conv3/bn3 and into add's
    residual = next(p for p in lay.edges if on_border(p[0], by["cat"]) and on_border(p[-1], by["add"]))
    cat, add = by["cat"], by["add"]
    assert residual == [
        (cat.x + cat.width / 2, cat.y),
        (bend.x, cat.y),
        (bend.x, add.y),
        (add.x + add.width / 2, add.y),
    ]
    assert bend.x >= max(by[n].x + by[n].width / 2 for n in ("cat", "conv3", "add")) + 14


def test_a_long_chain_wraps_into_columns_read_left_to_right():
    n = 100
    chain = OpGraph(tuple(f"l{i}" for i in range(n)), ("ReLU",) * n, tuple((i, i + 1) for i in range(n - 1)))
    lay = layout(chain, chain.names, ranks_per_column=40)
    assert [x.name for x in lay.probed()] == list(chain.names)
    columns = [x.column for x in lay.nodes]
    assert columns == sorted(columns) and set(columns) == {0, 1, 2}
    for a, b in zip(lay.nodes, lay.nodes[1:]):  # down a column, or on to the next one's top, further right
        assert (b.column == a.column and b.y > a.y) or (b.column == a.column + 1 and b.x > a.x and b.y < a.y)


def test_colours_follow_the_colour_bar():
    r = rows(PROBED)
    acc = [x["accuracy"] for x in r]
    lo, hi = 0.45, 0.85  # by hand: floor(0.48 * 20) / 20 and ceil(0.83 * 20) / 20
    norm = accuracy_norm(acc)
    assert (norm.vmin, norm.vmax) == (lo, hi)
    assert (accuracy_norm([0.61, 0.62]).vmin, accuracy_norm([0.61, 0.62]).vmax) == (0.5, 0.65)  # from chance
    viridis = matplotlib.colormaps["viridis"]
    for x, (layer, colour) in zip(r, layer_colours(r).items()):
        ref = viridis((x["accuracy"] - lo) / (hi - lo))
        assert layer == x["layer"]
        assert colour == "#" + "".join(f"{round(c * 255):02x}" for c in ref[:3])


def test_svg_parses_and_each_layer_carries_its_colour_outline_and_numbers():
    r = rows(PROBED)
    lay = layout(graph(), PROBED)
    text = architecture_svg(lay, r, "tiny: 2 vs. 2", ident="arch-tiny")
    root = ET.fromstring(text)
    assert root.tag == f"{SVG}svg" and root.get("id") == "arch-tiny"
    groups = root.findall(f".//{SVG}g[@class='layer']")
    assert [g.get("data-layer") for g in groups] == PROBED  # each once, in execution order
    colours = layer_colours(r)
    for g, x in zip(groups, r):
        rect = g.find(f"{SVG}rect")
        assert rect.get("fill") == colours[x["layer"]] == g.get("data-fill")
        assert rect.get("stroke") == ("black" if x["significant"] else "#999")
        assert g.find(f"{SVG}text").text == x["layer"]
        tip = g.get("data-tip").split("\n")
        assert tip == g.find(f"{SVG}title").text.split("\n")
        assert tip[0] == x["layer"]
        assert f"{x['accuracy']:.3f} ± {x['std']:.3f}" in tip[1]
        assert f"p_bhy {x['p_bhy']:.4f}" in tip[2] and ("significant" in tip[2]) == x["significant"]
        assert tip[3] == f"n_concepts {x['n_concepts']}"
    # unprobed runs: small grey dots, one per collapsed node
    dots = root.findall(f".//{SVG}g[@class='ops']/{SVG}circle")
    assert len(dots) == sum(not n.probed and not n.dummy for n in lay.nodes) == 6
    assert len(root.findall(f".//{SVG}g[@class='edges']/{SVG}polyline")) == len(lay.edges)


def test_no_score_for_a_probed_layer_or_a_bad_id_is_an_input_error():
    lay = layout(graph(), PROBED)
    with pytest.raises(InputError, match="no score for probed layer 'relu1'"):
        architecture_svg(lay, rows(PROBED[1:]), "t")
    with pytest.raises(InputError, match="diagram id"):
        architecture_svg(lay, rows(PROBED), "t", ident="a b")
    with pytest.raises(InputError, match="'nope' is not an operation"):
        layout(graph(), ["nope"])


def test_figure_draws_each_layer_once_in_its_colour():
    r = rows(PROBED)
    fig = architecture_figure(layout(graph(), PROBED), r, "tiny")
    boxes = [p for p in fig.axes[0].patches if isinstance(p, FancyBboxPatch)]
    assert len(boxes) == len(PROBED)
    colours = layer_colours(r)
    assert [matplotlib.colors.to_hex(b.get_facecolor()) for b in boxes] == [colours[x["layer"]] for x in r]
    assert [b.get_linewidth() > 1 for b in boxes] == [x["significant"] for x in r]
    labels = [t.get_text() for t in fig.axes[0].texts]
    assert all(labels.count(name) == 1 for name in PROBED)
