"""The architecture diagram on traced models: a small one with parallel branches and a residual, and Lite0."""

import xml.etree.ElementTree as ET

import matplotlib
import numpy as np
import pytest
import torch
from torch import nn

from semprobe.actors.layers import LayerCatalog
from semprobe.actors.zoo import load_model
from semprobe.analysis.architecture import architecture_svg, layout

SVG = "{http://www.w3.org/2000/svg}"


class Small(nn.Module):
    """A stem, an Inception-like block (two branches, concatenated), a residual block, a classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.b1 = nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU())
        self.b2 = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.res = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([self.b1(x), self.b2(x)], 1)
        x = torch.relu(self.res(x) + x)
        return self.fc(torch.flatten(self.pool(x), 1))


def scores(names):
    """Made-up scores, one per probed layer, spread over the colour bar."""
    acc = np.linspace(0.45, 0.9, len(names))
    return [
        {
            "layer": n,
            "layer_index": i,
            "accuracy": float(a),
            "std": 0.02,
            "p_bhy": 0.01 if i % 3 else 0.3,
            "significant": bool(i % 3),
            "n_concepts": 50,
        }
        for i, (n, a) in enumerate(zip(names, acc))
    ]


def reference_edges(catalog: LayerCatalog) -> set[tuple[str, str]]:
    """The data edges, by name, read off the fx graph's arguments by hand; the softmax after the logits."""
    named = {node.name: q for node, q in catalog._qualname.items()}
    edges = set()
    for node in catalog.module.graph.nodes:
        stack = [*node.args, *node.kwargs.values()]
        while stack:
            a = stack.pop()
            if isinstance(a, (list, tuple)):
                stack.extend(a)
            elif isinstance(a, torch.fx.Node) and a.name in named and node.name in named:
                edges.add((named[a.name], named[node.name]))
    logits = catalog.kinds["logits"][0]
    return edges | {(logits, catalog.kinds["softmax"][0])}


def check_diagram(catalog: LayerCatalog, spec: str):
    """Every probed layer once, in execution order, every edge downward, and each box in its score's colour."""
    graph = catalog.graph()
    assert list(graph.names) == catalog.names()
    assert {(graph.names[a], graph.names[b]) for a, b in graph.edges} == reference_edges(catalog)
    probed = [layer.name for layer in catalog.select(spec)]
    lay = layout(graph, probed)
    node_of = {m: n for n in lay.nodes if not n.dummy for m in n.members}
    assert sorted(node_of) == sorted(graph.names)  # every operation drawn, in exactly one node
    assert [n.name for n in lay.probed()] == probed and all(len(n.members) == 1 for n in lay.probed())
    for a, b in graph.edges:  # topological: every edge runs to a later rank (or stays inside a collapsed run)
        u, v = node_of[graph.names[a]], node_of[graph.names[b]]
        assert u is v or u.rank < v.rank
    rows = scores(probed)
    root = ET.fromstring(architecture_svg(lay, rows, "t"))
    groups = root.findall(f".//{SVG}g[@class='layer']")
    assert [g.get("data-layer") for g in groups] == probed
    acc = [r["accuracy"] for r in rows]
    lo, hi = min(0.5, np.floor(min(acc) * 20) / 20), max(np.ceil(max(acc) * 20) / 20, 0.6)
    for g, r in zip(groups, rows):
        ref = matplotlib.colormaps["viridis"]((r["accuracy"] - lo) / (hi - lo))
        assert g.find(f"{SVG}rect").get("fill") == "#" + "".join(f"{round(c * 255):02x}" for c in ref[:3])
    return graph, lay


def test_small_model_branches_side_by_side_and_residual_beside():
    catalog = LayerCatalog(Small(), 16)
    graph, lay = check_diagram(catalog, "activations,concat,logits,softmax")
    by = {n.name: n for n in lay.nodes if not n.dummy}
    assert "b1.1" in by and "b2.2" in by  # the branches' ReLUs
    one, two = by["b1.1"], by["b2.2"]
    # b2 has one op more than b1 (its batch norm), so its ReLU sits a rank lower; both sit beside each other
    assert abs(one.rank - two.rank) <= 1 and one.x != two.x
    # the residual: the cat's output skips res.0/res.1 to the add, through bend points off the main path
    bends = [n for n in lay.nodes if n.dummy and n.name.startswith("cat->")]
    assert bends and all(b.x != by["res.0"].x for b in bends)


@pytest.fixture(scope="module")
def lite0_catalog():
    loaded = load_model("efficientnet_lite0")  # the packaged real weights
    return LayerCatalog(loaded.module, loaded.preprocess.size)


@pytest.mark.parametrize("spec", ["blocks", "pixels,activations,pool,logits,softmax"])
def test_lite0_every_probed_layer_once_in_order_in_its_colour(lite0_catalog, spec):
    graph, lay = check_diagram(lite0_catalog, spec)
    assert len(graph.names) > 150  # hundreds of operations ...
    assert sum(not n.dummy for n in lay.nodes) < len(graph.names) * 0.6  # ... collapsed to stay readable
    # each of Lite0's 9 residual adds gets its skip connection drawn beside the block
    adds = [n for n in lay.nodes if not n.dummy and any(m.endswith(".add") for m in n.members)]
    assert len(adds) == 9

    def ends_at(point, node):  # on the node's box (or dot)
        half_w, half_h = (node.width / 2, 9) if node.probed else (4, 4)
        return abs(point[0] - node.x) <= half_w + 1e-9 and abs(point[1] - node.y) <= half_h + 1e-9

    assert all(sum(ends_at(p[-1], a) for p in lay.edges) == 2 for a in adds)
