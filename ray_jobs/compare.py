"""``semprobe compare RUN...``: the layer curves of several finished runs, and of every CNN in them, overlaid on
one axis of relative depth (layer position / (number of layers - 1)), so that CNNs with 16 and 200 layers can be
read against each other.

It reads each run's ``config.json``, ``summary.json`` (written last: the run finished) and ``scores.parquet``,
and never writes inside a run. Significance is each run's own (BHY within its ``--family``, at its ``--alpha``).

Layout under OUT::

    config.json            the resolved config
    compare.parquet        one row per point of the figure (datasets.schema.COMPARE)
    figures/compare.png    the figure
"""

from __future__ import annotations

import posixpath
from typing import Any

import pyarrow as pa

from semprobe.analysis.errors import InputError
from semprobe.analysis.figures import compare_curves, relative_depth
from semprobe.datasets import schema
from semprobe.ray_jobs.config import CompareConfig
from semprobe.ray_jobs.figures import save_figure
from semprobe.ray_jobs.startup import check_same_experiment, write_resolved
from semprobe.ray_jobs.storage import Output

FINISHED = ("config.json", "scores.parquet", "summary.json")  # what a finished `semprobe run` folder holds
NEEDED_COLUMNS = ("model", "layer", "layer_index", "word_model", "accuracy", "std", "p_bhy", "significant")


def read_run(run: str) -> pa.Table:
    """A finished run's scores table; an InputError naming the folder and what it lacks otherwise."""
    source = Output(run)
    missing = [name for name in FINISHED if not source.exists(name)]
    if missing:
        raise InputError(
            f"{run} is not a finished semprobe run (no {', '.join(missing)}): name output folders of "
            f"`semprobe run` that finished (they hold {', '.join(FINISHED)})"
        )
    scores = source.read_table("scores.parquet")
    lacking = [c for c in NEEDED_COLUMNS if c not in scores.column_names]
    if lacking or "models" not in source.read_json("config.json").get("identity", {}):
        raise InputError(
            f"{run} is not the output of `semprobe run` (its scores lack {', '.join(lacking) or 'nothing'}; its "
            f"config is another command's): name output folders of `semprobe run`"
        )
    return scores


def _run_names(runs: list[str]) -> dict[str, str]:
    """Each run's name in the legend: its folder's name, or its path when two runs share a folder name."""
    names = {run: posixpath.basename(run.rstrip("/")) for run in runs}
    clash = len(set(names.values())) < len(names)
    return {run: run if clash else name for run, name in names.items()}


def compare_rows(cfg: CompareConfig) -> list[dict[str, Any]]:
    """The figure's points: per run, CNN and word model (``--words``, or all), the layers in the catalog's order
    with their relative depth; each curve's ``label`` names only what varies between the curves."""
    tables = {run: read_run(run).to_pylist() for run in cfg.runs}  # every run checked before anything is drawn
    found = list(dict.fromkeys(r["word_model"] for rows in tables.values() for r in rows))
    unknown = [w for w in cfg.words or [] if w not in found]
    if unknown:
        raise InputError(f"unknown word model '{unknown[0]}' for these runs: choose from {', '.join(found)}")
    words = cfg.words or found
    names = _run_names(cfg.runs)
    curves = {
        (run, r["model"], r["word_model"]): None
        for run, rows in tables.items()
        for r in rows
        if r["word_model"] in words
    }
    varies = [len({key[i] for key in curves}) > 1 for i in range(3)]
    out = []
    for run, model, word_model in curves:
        parts = [names[run], model, word_model]
        label = " · ".join(p for p, v in zip(parts, varies) if v) or model
        line = sorted(
            (r for r in tables[run] if r["model"] == model and r["word_model"] == word_model),
            key=lambda r: r["layer_index"],
        )
        for r, depth in zip(line, relative_depth(len(line))):
            out.append({"run": run, "label": label, **{c: r[c] for c in NEEDED_COLUMNS}, "depth": depth})
    return out


def run_compare(cfg: CompareConfig, log=print) -> dict[str, Any]:
    """Read the runs, write OUT/config.json, OUT/compare.parquet and OUT/figures/compare.png; returns a summary."""
    rows = compare_rows(cfg)  # bad input before any write
    output = Output(cfg.out)
    check_same_experiment(output, cfg)
    write_resolved(output, cfg, check_storage=False)  # the driver alone reads the runs and writes OUT
    table = pa.Table.from_pylist(rows, schema=schema.COMPARE)
    output.write_table(schema.stamp(table, cfg.experiment_id()), "compare.parquet")
    curves = [
        {
            "label": label,
            "accuracy": [r["accuracy"] for r in rows if r["label"] == label],
            "significant": [r["significant"] for r in rows if r["label"] == label],
        }
        for label in dict.fromkeys(r["label"] for r in rows)
    ]
    words = list(dict.fromkeys(r["word_model"] for r in rows))
    title = "2 vs. 2 through the layers" + (f" against {words[0]}" if len(words) == 1 else "")
    save_figure(output, compare_curves(curves, title), "figures", "compare.png", dpi=200)
    figure = posixpath.join(output.uri, "figures", "compare.png")
    log(f"compare: {len(curves)} curve(s) from {len(cfg.runs)} run(s): {figure}")
    return {"experiment_id": cfg.experiment_id(), "curves": [c["label"] for c in curves], "figure": figure}
