"""The layout is the architecture: the import graph, read with ``ast``, keeps its rules.

- ``ray_jobs`` -> (``actors``, ``datasets``) -> ``analysis``: no import points back;
- ``analysis`` is pure math: it imports neither Ray nor any other room;
- no job module imports another job module (shared machinery has modules of its own);
- no cycle anywhere.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROOMS = ("analysis", "datasets", "actors", "ray_jobs")
# What each room may import of the others.
ALLOWED = {
    "analysis": set(),
    "datasets": {"analysis"},
    "actors": {"analysis"},
    "ray_jobs": {"analysis", "datasets", "actors"},
}
# The jobs the CLI dispatches to, each one command; `semprobe extract` runs the extraction stage that every
# extracting job shares (ray_jobs/extraction.py), so that module is machinery, not a job.
JOBS = {"run", "affine", "misclassified", "adversarial", "train", "dynamics", "compare"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(["semprobe", *parts[:-1]] + ([] if parts[-1] == "__init__" else [parts[-1]]))


def import_graph() -> dict[str, set[str]]:
    """semprobe module -> the semprobe modules it imports (at the top or inside functions)."""
    modules = {module_name(p): p for room in ROOMS for p in sorted((ROOT / room).rglob("*.py"))}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("semprobe."):
                for alias in node.names:  # `from semprobe.datasets import schema` imports a module
                    found.add(
                        f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                    )
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("semprobe.")}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def third_party(path: Path, top_level_only: bool = False) -> set[str]:
    """The top-level packages a module imports (only at its top level, with ``top_level_only``)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    names = {a.name.split(".")[0] for n in nodes if isinstance(n, ast.Import) for a in n.names}
    return names | {n.module.split(".")[0] for n in nodes if isinstance(n, ast.ImportFrom) and n.module}


def room(module: str) -> str:
    return module.split(".")[1]


def test_the_graph_is_read():
    graph = import_graph()
    assert "semprobe.analysis.twovtwo" in graph["semprobe.analysis.scores"]
    assert "semprobe.ray_jobs.scheduler" in graph["semprobe.ray_jobs.run"]
    assert {f"semprobe.ray_jobs.{job}" for job in JOBS} <= set(graph)


def test_imports_point_one_way():
    wrong = [
        f"{a} imports {b}"
        for a, targets in import_graph().items()
        for b in targets
        if room(b) != room(a) and room(b) not in ALLOWED[room(a)]
    ]
    assert not wrong


@pytest.mark.parametrize("path", sorted((ROOT / "analysis").glob("*.py")), ids=lambda p: p.name)
def test_analysis_is_pure_math(path):
    """No Ray and no file formats; polars only inside the function that returns a DataFrame, so that the
    math imports where only numpy and torch are installed (a GPU node's image)."""
    assert not third_party(path) & {"ray", "pyarrow", "fsspec"}
    assert not third_party(path, top_level_only=True) & {"polars", "pandas", "matplotlib"} - {
        "matplotlib" if path.name == "figures.py" else ""
    }


def test_no_job_module_imports_another():
    graph = import_graph()
    jobs = {f"semprobe.ray_jobs.{job}" for job in JOBS}
    assert not [f"{a} imports {b}" for a in jobs for b in graph[a] if b in jobs]


def test_no_cycles():
    graph, state, cycles = import_graph(), {}, []

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(path[path.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles
