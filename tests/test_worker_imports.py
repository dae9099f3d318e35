"""A Ray worker imports the module of every task or actor it runs (functions are pickled by reference): those
modules import only what their tasks use, so a worker running a Gram, 2 vs. 2, permutation, affine or 1 vs. 2
task starts in the seconds torch takes, not the ten that timm, torchvision and Ray Data add. The model code
(timm, torchvision), Ray Data, the figures (matplotlib), the report (polars), BHY (statsmodels) and the attack
(foolbox) are imported by the functions that use them.
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("timm", "torchvision", "ray.data", "polars", "matplotlib", "statsmodels", "foolbox")
# The modules that hold Ray tasks or actors, as of this writing; test_the_task_modules_are_found keeps it whole.
TASK_MODULES = {
    "semprobe.ray_jobs.scheduler": "gram_task, matrix_task, stacked_task",
    "semprobe.ray_jobs.failure_analysis": "layer_task (1 vs. 2)",
    "semprobe.ray_jobs.fused": "_probe_budget",
    "semprobe.ray_jobs.affine": "AffineWorker",
    "semprobe.ray_jobs.adversarial": "AttackWorker",
    "semprobe.ray_jobs.bench": "_plain_training (ray.remote(...) in bench_train)",
    "semprobe.ray_jobs.shared_storage": "look, _Holder (ray.remote(...) at run time)",
}


def _uses_ray_remote(path: Path) -> bool:
    """Whether the module applies ``ray.remote``, as a decorator or called (``ray.remote(num_cpus=0)(f)``)."""
    tree = ast.parse(path.read_text())
    return any(
        isinstance(node, ast.Attribute)
        and node.attr == "remote"
        and isinstance(node.value, ast.Name)
        and node.value.id == "ray"
        for node in ast.walk(tree)
    )


def task_modules() -> set[str]:
    found = set()
    for room in ("analysis", "datasets", "actors", "ray_jobs"):
        for path in sorted((ROOT / room).rglob("*.py")):
            if _uses_ray_remote(path):
                found.add(".".join(["semprobe", room, *path.relative_to(ROOT / room).with_suffix("").parts]))
    return found


# Imports each module in turn and records which heavy packages appeared with it. sys.modules only grows, so an
# empty record for every module means no module imports any of them, whichever order they come in. The last two
# entries: the ImageNet class list (read from timm's folder without importing timm), and a control that the
# probe sees a heavy import when there is one (the attacker's foolbox).
PROBE = """
import importlib, json, sys
HEAVY = {heavy!r}
record = {{}}
def step(label, action):
    before = {{m for m in HEAVY if m in sys.modules}}
    action()
    record[label] = sorted(m for m in HEAVY if m in sys.modules and m not in before)
for name in {modules!r}:
    step(name, lambda: importlib.import_module(name))
step("imagenet_classes()", lambda: len(importlib.import_module("semprobe.datasets.classes").imagenet_classes()))
step("semprobe.actors.attack", lambda: importlib.import_module("semprobe.actors.attack"))
print(json.dumps(record))
"""


def test_the_task_modules_are_found():
    assert task_modules() == set(TASK_MODULES)


def test_task_modules_import_no_model_code_data_pipeline_figures_or_report():
    modules = sorted(task_modules())
    code = PROBE.format(heavy=HEAVY, modules=modules)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout.splitlines()[-1])
    assert {name: record[name] for name in modules} == {name: [] for name in modules}
    assert record["imagenet_classes()"] == []
    assert record["semprobe.actors.attack"] == ["foolbox"]  # the probe sees an import when there is one


def test_the_decode_stage_imports_no_model_code():
    """Ray Data's decode tasks run ``decode_shard``/``decode_units`` in CPU workers of their own (unless fused with
    the model actors): the module they import is this light one, not the extraction's, which imports torch."""
    from semprobe.ray_jobs import extraction

    assert {extraction.decode_shard.__module__, extraction.decode_units.__module__} == {
        "semprobe.ray_jobs.decode_stage"
    }
    code = PROBE.format(heavy=(*HEAVY, "torch"), modules=["semprobe.ray_jobs.decode_stage"])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1])["semprobe.ray_jobs.decode_stage"] == []
