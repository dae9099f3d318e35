"""The annotated architecture diagram (Dharmaretnam et al. 2021, appendix Figs. C.8 and C.9): a CNN's graph with
each probed layer coloured by its 2 vs. 2 accuracy. Pure: the graph comes in as names and edges, the layout and
the drawings (an SVG document with hover tooltips, a matplotlib Figure) go out.

The layout is layered (Sugiyama): nodes on ranks by longest path from the input, an edge that spans several ranks
routed through one bend point per rank it passes (so a residual connection runs beside the block it skips),
barycentre sweeps to order each rank (parallel branches side by side), and x positions pulled towards the
neighbours' mean. Runs of unprobed operations (one in, one out) collapse into one small grey node, so Lite0's
hundreds of operations stay readable; every probed layer keeps a node of its own. A long network is cut into
columns at ranks that hold a single node and no passing edge, read left to right like a page.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape
from typing import Any

from semprobe.analysis.errors import InputError

# matplotlib is imported inside the drawing functions: the graph and its layout import where only numpy and torch
# are (the layer catalog imports OpGraph on every model actor).

CMAP = "viridis"
# Drawing units (SVG pixels; the PNG scales them): rank pitch, box height, font size and a character's width.
RANK, BOX_H, FONT, CHAR, GAP, DOT = 30.0, 18.0, 10.0, 6.1, 14.0, 4.0
COLUMN_GAP = 60.0


@dataclass(frozen=True)
class OpGraph:
    """A traced model's operations in execution (topological) order: ``names[i]`` runs op ``ops[i]`` (a short
    type, e.g. ``Conv2d`` or ``add``) on the outputs of its ``edges`` sources."""

    names: tuple[str, ...]
    ops: tuple[str, ...]
    edges: tuple[tuple[int, int], ...]

    def __post_init__(self):
        for a, b in self.edges:
            if not 0 <= a < b < len(self.names):
                raise InputError(f"edge {a} -> {b} is not forward in execution order of {len(self.names)} operations")


@dataclass
class Node:
    """One drawn node: a probed layer (``probed``), a run of unprobed operations, or a bend point (``dummy``)."""

    members: list[str]
    ops: list[str]
    probed: bool
    dummy: bool = False
    rank: int = 0
    x: float = 0.0
    y: float = 0.0
    column: int = 0

    @property
    def name(self) -> str:
        return self.members[0]

    @property
    def label(self) -> str:
        return self.name if self.probed else ""

    @property
    def width(self) -> float:
        if self.dummy:
            return 0.0
        return max(40.0, CHAR * len(self.label) + 12.0) if self.probed else 2 * DOT


@dataclass
class Layout:
    """Positions of the diagram: ``nodes`` (real ones in topological order, then bend points), ``edges`` as
    polylines of (x, y) points from source to target, and the drawing's width and height."""

    nodes: list[Node]
    edges: list[list[tuple[float, float]]] = field(default_factory=list)
    width: float = 0.0
    height: float = 0.0

    def probed(self) -> list[Node]:
        return [n for n in self.nodes if n.probed]


def collapse(graph: OpGraph, probed: Sequence[str]) -> tuple[list[Node], list[tuple[int, int]]]:
    """Merge each unprobed operation into its predecessor's node when that is an unprobed run it alone follows
    (the predecessor has one successor, the operation one predecessor). Returns the nodes in topological order
    and the edges between them.

    Every name in ``probed`` must be an operation of ``graph``; each keeps a node of its own.
    """
    chosen = set(probed)
    missing = sorted(chosen - set(graph.names))
    if missing:
        raise InputError(f"layer '{missing[0]}' is not an operation of the traced graph: choose from its node names")
    preds: list[list[int]] = [[] for _ in graph.names]
    succs: list[list[int]] = [[] for _ in graph.names]
    for a, b in dict.fromkeys(graph.edges):
        preds[b].append(a)
        succs[a].append(b)
    group = [0] * len(graph.names)
    nodes: list[Node] = []
    for i, (name, op) in enumerate(zip(graph.names, graph.ops)):
        p = preds[i][0] if len(preds[i]) == 1 else None
        # A run may interleave with a parallel branch's in execution order: edges still point forward, as only
        # its first op has a source outside it and only its last a target.
        if name not in chosen and p is not None and len(succs[p]) == 1 and not nodes[group[p]].probed:
            group[i] = group[p]
            nodes[group[i]].members.append(name)
            nodes[group[i]].ops.append(op)
            continue
        group[i] = len(nodes)
        nodes.append(Node([name], [op], name in chosen))
    edges = list(dict.fromkeys((group[a], group[b]) for a, b in graph.edges if group[a] != group[b]))
    return nodes, edges


def _order(ranks: list[list[int]], preds: list[list[int]], succs: list[list[int]], sweeps: int = 4) -> None:
    """Barycentre crossing reduction, in place: alternate downward and upward sweeps. Ties keep the current order,
    so branches keep execution order left to right and bend points (appended last) go right of the main path."""
    for sweep in range(sweeps):
        down = sweep % 2 == 0
        sequence = ranks[1:] if down else ranks[-2::-1]
        for rank in sequence:
            position = {}
            for r in ranks:
                position.update((n, i) for i, n in enumerate(r))
            neighbours = preds if down else succs
            keys = {}
            for i, n in enumerate(rank):
                near = [position[m] for m in neighbours[n]]
                keys[n] = (sum(near) / len(near) if near else i, i)
            rank.sort(key=keys.__getitem__)


def _place(ranks: list[list[int]], nodes: list[Node], preds, succs, passes: int = 6) -> None:
    """x of each node: its neighbours' mean, then pushed apart to the nodes' widths, rank by rank."""
    for k in range(passes):
        down = k % 2 == 0
        for rank in ranks if down else ranks[::-1]:
            neighbours = preds if down else succs
            want = []
            for n in rank:
                # a real node follows its real neighbours: bend points beside it must not pull the main path
                near = [nodes[m].x for m in neighbours[n] if nodes[n].dummy or not nodes[m].dummy] or [
                    nodes[m].x for m in neighbours[n]
                ]
                want.append(sum(near) / len(near) if near else nodes[n].x)
            xs = list(want)
            for i in range(1, len(rank)):
                lo = xs[i - 1] + (nodes[rank[i - 1]].width + nodes[rank[i]].width) / 2 + GAP
                xs[i] = max(xs[i], lo)
            # keep the rank's real nodes where they wanted to be, so the main path runs straight past bend points
            moved = [(w - x) for n, w, x in zip(rank, want, xs) if not nodes[n].dummy] or [
                w - x for w, x in zip(want, xs)
            ]
            shift = sum(moved) / len(moved)
            for n, x in zip(rank, xs):
                nodes[n].x = x + shift


def layout(graph: OpGraph, probed: Sequence[str], ranks_per_column: int = 40) -> Layout:
    """Lay out ``graph`` with the ``probed`` layers as labelled nodes (see the module docstring)."""
    nodes, edges = collapse(graph, probed)
    real = len(nodes)
    rank = [0] * real
    for a, b in sorted(edges, key=lambda e: e[1]):  # topological: sources precede targets
        rank[b] = max(rank[b], rank[a] + 1)
    for n, r in zip(nodes, rank):
        n.rank = r
    # One bend point per rank an edge passes.
    chains: list[list[int]] = []
    for a, b in edges:
        chain = [a]
        for r in range(rank[a] + 1, rank[b]):
            nodes.append(Node([f"{nodes[a].name}->{nodes[b].name}"], [], False, dummy=True, rank=r))
            chain.append(len(nodes) - 1)
        chains.append([*chain, b])
    preds: list[list[int]] = [[] for _ in nodes]
    succs: list[list[int]] = [[] for _ in nodes]
    for chain in chains:
        for u, v in zip(chain, chain[1:]):
            preds[v].append(u)
            succs[u].append(v)
    n_ranks = max(rank, default=0) + 1
    ranks: list[list[int]] = [[] for _ in range(n_ranks)]
    for i, n in enumerate(nodes):
        ranks[n.rank].append(i)
    _order(ranks, preds, succs)
    _place(ranks, nodes, preds, succs)
    # A skipping edge whose bend points are the last of their ranks runs clear of the boxes it passes, on their
    # right, as a bracket: how residual connections are drawn in papers.
    side: set[int] = set()
    for k, chain in enumerate(chains):
        inner = chain[1:-1]
        if inner and all(ranks[nodes[d].rank][-1] == d for d in inner):
            span = range(nodes[chain[0]].rank, nodes[chain[-1]].rank + 1)
            right = max(nodes[i].x + nodes[i].width / 2 for r in span for i in ranks[r] if not nodes[i].dummy)
            for d in inner:
                nodes[d].x = max(nodes[d].x, right + GAP)
            side.add(k)

    # Columns: cut after ranks that hold one real node and nothing passing it, near even shares of the ranks.
    cuts = [r for r in range(n_ranks - 1) if len(ranks[r]) == 1 and not nodes[ranks[r][0]].dummy]
    n_columns = max(1, math.ceil(n_ranks / ranks_per_column))
    chosen_cuts: list[int] = []
    for k in range(1, n_columns):
        target = k * n_ranks / n_columns
        later = (c for c in cuts if not chosen_cuts or c > chosen_cuts[-1])
        best = min(later, key=lambda c: abs(c + 1 - target), default=None)
        if best is not None:
            chosen_cuts.append(best)
    starts = [0] + [c + 1 for c in chosen_cuts]
    column_of_rank = [sum(r >= s for s in starts) - 1 for r in range(n_ranks)]
    lefts, rights = {}, {}
    for n in nodes:
        c = column_of_rank[n.rank]
        n.column = c
        lefts[c] = min(lefts.get(c, math.inf), n.x - n.width / 2)
        rights[c] = max(rights.get(c, -math.inf), n.x + n.width / 2)
    offset, x0 = {}, 20.0
    for c in range(len(starts)):
        offset[c] = x0 - lefts[c]
        x0 += rights[c] - lefts[c] + COLUMN_GAP
    top = 66.0  # room for a title of two lines and the edges that enter a column from above
    for n in nodes:
        n.x += offset[n.column]
        n.y = top + (n.rank - starts[n.column]) * RANK
    height = top + max(n.rank - starts[n.column] for n in nodes) * RANK + 30.0 if nodes else top
    out = Layout(nodes, width=x0 - COLUMN_GAP + 20.0, height=height)
    for k, chain in enumerate(chains):
        points = [(nodes[i].x, nodes[i].y) for i in chain]
        a, b = nodes[chain[0]], nodes[chain[-1]]
        if k in side and a.column == b.column:
            x = max(p[0] for p in points[1:-1])
            points = [(a.x, a.y), (x, a.y), (x, b.y), (b.x, b.y)]
        if a.column != b.column:  # the edge that leaves a column: down, across the gap, into the next one's top
            gap_x = rights[a.column] + offset[a.column] + COLUMN_GAP / 2
            points = [
                (a.x, a.y),
                (a.x, a.y + RANK / 2),
                (gap_x, a.y + RANK / 2),
                (gap_x, b.y - RANK / 2),
                (b.x, b.y - RANK / 2),
                (b.x, b.y),
            ]
        points[0] = _border(a, points[1])
        points[-1] = _border(b, points[-2])
        out.edges.append(points)
    return out


def _border(node: Node, toward: tuple[float, float]) -> tuple[float, float]:
    """Where the segment from the node's centre to ``toward`` leaves its box (or dot): edges end at the border."""
    half_w, half_h = (node.width / 2, BOX_H / 2) if node.probed else (DOT, DOT) if not node.dummy else (0, 0)
    dx, dy = toward[0] - node.x, toward[1] - node.y
    s = min(half_w / abs(dx) if dx else math.inf, half_h / abs(dy) if dy else math.inf, 1.0)
    return (node.x + s * dx, node.y + s * dy)


def accuracy_norm(accuracies: Sequence[float]):
    """The colour bar's range, a ``matplotlib.colors.Normalize``: from chance (0.5), or below it if a layer is, to
    the best accuracy, in steps of 0.05."""
    from matplotlib.colors import Normalize

    lo = min([0.5, *(math.floor(a * 20) / 20 for a in accuracies)])
    hi = max([lo + 0.1, *(math.ceil(a * 20) / 20 for a in accuracies)])
    return Normalize(lo, hi)


def layer_colours(rows: Sequence[dict[str, Any]]) -> dict[str, str]:
    """Each layer's fill, ``#rrggbb``: its accuracy on the colour bar (:func:`accuracy_norm`, viridis)."""
    import matplotlib
    from matplotlib.colors import to_hex

    norm, cmap = accuracy_norm([r["accuracy"] for r in rows]), matplotlib.colormaps[CMAP]
    return {r["layer"]: to_hex(cmap(norm(r["accuracy"]))) for r in rows}


def _fmt(x: Any, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def tooltip(row: dict[str, Any]) -> list[str]:
    """The lines of a probed layer's tooltip."""
    return [
        row["layer"],
        f"2 vs. 2 accuracy {row['accuracy']:.3f} ± {_fmt(row['std'], '.3f')} (std over sets)",
        f"p_bhy {_fmt(row['p_bhy'], '.4f')}{' (significant)' if row['significant'] else ''}",
        f"n_concepts {row['n_concepts']}",
    ]


def _check(rows: Sequence[dict[str, Any]], lay: Layout) -> dict[str, dict[str, Any]]:
    by_layer = {r["layer"]: r for r in rows}
    unknown = sorted({n.name for n in lay.probed()} - set(by_layer))
    if unknown:
        raise InputError(f"no score for probed layer '{unknown[0]}': the scores name {', '.join(sorted(by_layer))}")
    return by_layer


_SCRIPT = """(function(){var s=document.getElementById('IDENT');var t=s.querySelector('.tip');
var bg=t.querySelector('rect'),tx=t.querySelector('text');
s.querySelectorAll('.layer').forEach(function(g){var ti=g.querySelector('title');if(ti)ti.remove();
g.addEventListener('mouseenter',function(){var lines=g.dataset.tip.split('\\n');tx.textContent='';
lines.forEach(function(l,i){var sp=document.createElementNS(s.namespaceURI,'tspan');
sp.setAttribute('x',8);sp.setAttribute('dy',i?'1.25em':'1.1em');sp.textContent=l;tx.appendChild(sp)});
var b=g.querySelector('rect'),x=+b.getAttribute('x')+ +b.getAttribute('width')+6,y=+b.getAttribute('y');
var w=Math.max.apply(null,lines.map(function(l){return l.length}))*6.4+16,h=lines.length*13+10;
var W=+s.getAttribute('width');if(x+w>W)x=Math.max(0,+b.getAttribute('x')-w-6);
bg.setAttribute('width',w);bg.setAttribute('height',h);t.setAttribute('transform','translate('+x+','+y+')');
t.setAttribute('visibility','visible')});
g.addEventListener('mouseleave',function(){t.setAttribute('visibility','hidden')})})})();"""


def _content_width(lay: Layout, title: str) -> float:
    """The drawing's width: the graph's, or the title's (its longest line, over the key) when a narrow network's
    title runs longer."""
    return max(lay.width, 8.0 * max(map(len, title.split("\n"))) - 70)


def architecture_svg(lay: Layout, rows: Sequence[dict[str, Any]], title: str, ident: str = "arch") -> str:
    """The diagram as an SVG document: probed layers as labelled boxes filled by accuracy (black outline when
    significant after BHY), unprobed runs as small grey dots, a colour bar, ``title`` (lines split at newlines);
    hovering a layer shows its tooltip (:func:`tooltip`). ``rows`` are the scores rows of one model and word model,
    one per probed layer; ``ident`` is the SVG's id and prefixes the others (letters, digits, ``-`` and ``_``), so
    several diagrams can sit in one HTML page. Without scripts, each layer's ``<title>`` gives the same text as the
    browser's own tooltip."""
    import matplotlib
    from matplotlib.colors import to_hex

    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", ident):
        raise InputError(f"diagram id '{ident}' must be a letter then letters, digits, '-' or '_'")
    by_layer, colours = _check(rows, lay), layer_colours(rows)
    norm = accuracy_norm([r["accuracy"] for r in rows])
    content = _content_width(lay, title)
    bar_w = 16.0
    width, height = content + 110.0, max(lay.height, 260.0)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" id="{escape(ident)}" class="architecture" width="{width:.0f}" '
        'style="overflow:visible" '  # a tooltip wider than a small diagram stays readable in the page
        f'height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}" font-family="DejaVu Sans, sans-serif" '
        f'font-size="{FONT:.0f}">',
        f'<defs><marker id="{escape(ident)}-arrow" viewBox="0 0 6 6" refX="6" refY="3" markerWidth="5" '
        'markerHeight="5" orient="auto"><path d="M0,0 L6,3 L0,6 z" fill="#777"/></marker>'
        f'<linearGradient id="{escape(ident)}-bar" x1="0" y1="1" x2="0" y2="0">'
        + "".join(
            f'<stop offset="{k / 10:.1f}" stop-color="{to_hex(matplotlib.colormaps[CMAP](k / 10))}"/>'
            for k in range(11)
        )
        + "</linearGradient></defs>",
        f'<rect width="{width:.0f}" height="{height:.0f}" fill="white"/>',
        '<text x="20" y="8" font-size="13" font-weight="bold">'
        + "".join(f'<tspan x="20" dy="1.25em">{escape(line)}</tspan>' for line in title.split("\n"))
        + "</text>",
        '<g class="edges" fill="none" stroke="#888" stroke-width="1">',
    ]
    for points in lay.edges:
        d = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
        out.append(f'<polyline points="{d}" marker-end="url(#{escape(ident)}-arrow)"/>')
    out.append('</g><g class="ops" fill="#bbb">')
    for n in lay.nodes:
        if not n.dummy and not n.probed:
            ops = ", ".join(dict.fromkeys(n.ops))
            out.append(
                f'<circle cx="{n.x:.1f}" cy="{n.y:.1f}" r="{DOT:.0f}"><title>{escape(n.name)}'
                f"{f' (+{len(n.members) - 1} more)' if len(n.members) > 1 else ''}: {escape(ops)}</title></circle>"
            )
    out.append("</g>")
    for n in lay.probed():
        r = by_layer[n.name]
        fill = colours[n.name]
        ink = "white" if norm(r["accuracy"]) < 0.55 else "black"
        lines = tooltip(r)  # a newline in an attribute is written &#10;, or XML parsers turn it into a space
        stroke = 'stroke="black" stroke-width="2.2"' if r["significant"] else 'stroke="#999" stroke-width="0.6"'
        out.append(
            f'<g class="layer" data-layer="{escape(n.name)}" data-tip="{"&#10;".join(map(escape, lines))}" '
            f'data-fill="{fill}"><title>{escape(chr(10).join(lines))}</title>'
            f'<rect x="{n.x - n.width / 2:.1f}" y="{n.y - BOX_H / 2:.1f}" width="{n.width:.1f}" height="{BOX_H:.0f}" '
            f'rx="3" fill="{fill}" {stroke}/>'
            f'<text x="{n.x:.1f}" y="{n.y + FONT / 2 - 1.5:.1f}" text-anchor="middle" fill="{ink}">'
            f"{escape(n.label)}</text></g>"
        )
    bx, by, bh = content + 30.0, 50.0, 160.0
    out += [
        f'<g class="colorbar"><rect x="{bx:.0f}" y="{by:.0f}" width="{bar_w:.0f}" height="{bh:.0f}" '
        f'fill="url(#{escape(ident)}-bar)" stroke="#444" stroke-width="0.6"/>',
        *(
            f'<text x="{bx + bar_w + 4:.0f}" y="{by + bh * (1 - k / 4) + 3:.1f}" font-size="9">'
            f"{norm.vmin + k / 4 * (norm.vmax - norm.vmin):.2f}</text>"
            for k in range(5)
        ),
        f'<text x="{bx - 6:.0f}" y="{by + bh / 2:.0f}" font-size="9" text-anchor="middle" '
        f'transform="rotate(-90 {bx - 6:.0f} {by + bh / 2:.0f})">2 vs. 2 accuracy</text>',
        f'<rect x="{bx:.0f}" y="{by + bh + 16:.0f}" width="{bar_w:.0f}" height="10" fill="white" stroke="black" '
        'stroke-width="2.2"/>',
        f'<text x="{bx + bar_w + 4:.0f}" y="{by + bh + 25:.0f}" font-size="9">BHY</text>',
        f'<circle cx="{bx + bar_w / 2:.0f}" cy="{by + bh + 40:.0f}" r="{DOT:.0f}" fill="#bbb"/>',
        f'<text x="{bx + bar_w + 4:.0f}" y="{by + bh + 43:.0f}" font-size="9">ops</text></g>',
        '<g class="tip" visibility="hidden" pointer-events="none"><rect rx="3" fill="#ffffe8" stroke="#444" '
        'stroke-width="0.8"/><text font-size="11"></text></g>',
        f"<script><![CDATA[{_SCRIPT.replace('IDENT', ident)}]]></script>",
        "</svg>",
    ]
    return "\n".join(out)


def architecture_figure(lay: Layout, rows: Sequence[dict[str, Any]], title: str):
    """The diagram as a matplotlib Figure for papers: the SVG's drawing (:func:`architecture_svg`), with a colour
    bar and a key; 100 drawing units to the inch. Returns a ``matplotlib.figure.Figure``."""
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.patches import Circle, FancyBboxPatch

    by_layer, colours = _check(rows, lay), layer_colours(rows)
    norm = accuracy_norm([r["accuracy"] for r in rows])
    content = _content_width(lay, title)
    scale = 100.0
    fig = Figure(figsize=((content + 90) / scale, max(lay.height, 260) / scale))
    ax = fig.add_axes((0, 0, content / (content + 90), 1))
    ax.set_xlim(0, content)
    ax.set_ylim(max(lay.height, 260), 0)  # y runs down, as in the SVG
    ax.axis("off")
    font = FONT * 72 / scale  # drawing units to points
    for points in lay.edges:
        xs, ys = zip(*points)
        ax.plot(xs[:-1], ys[:-1], color="#888", lw=0.7, zorder=1, solid_joinstyle="round")
        ax.annotate(
            "",
            xy=points[-1],
            xytext=points[-2],
            arrowprops={"arrowstyle": "-|>", "color": "#888", "lw": 0.7, "shrinkA": 0, "shrinkB": 0},
            zorder=1,
        )
    for n in lay.nodes:
        if n.dummy:
            continue
        if not n.probed:
            ax.add_patch(Circle((n.x, n.y), DOT, color="#bbb", zorder=2))
            continue
        r = by_layer[n.name]
        ax.add_patch(
            FancyBboxPatch(
                (n.x - n.width / 2, n.y - BOX_H / 2),
                n.width,
                BOX_H,
                boxstyle="round,pad=0,rounding_size=3",
                facecolor=colours[n.name],
                edgecolor="black" if r["significant"] else "#999",
                lw=1.6 if r["significant"] else 0.4,
                zorder=3,
            )
        )
        ink = "white" if norm(r["accuracy"]) < 0.55 else "black"
        ax.text(n.x, n.y, n.label, ha="center", va="center", fontsize=font, color=ink, zorder=4)
    ax.text(20, 10, title, fontsize=13 * 72 / scale, weight="bold", va="top", linespacing=1.25)
    cax = fig.add_axes((1 - 60 / (content + 90), 0.55, 14 / (content + 90), 0.35))
    fig.colorbar(matplotlib.cm.ScalarMappable(norm, CMAP), cax=cax, label="2 vs. 2 accuracy")
    cax.tick_params(labelsize=6)
    cax.yaxis.label.set_size(7)
    fig.text(
        1 - 75 / (content + 90),
        0.5,
        "black outline:\nsignificant\nafter BHY\n\ngrey dots:\nunprobed ops",
        fontsize=6,
        va="top",
        color="#333",
    )
    return fig
