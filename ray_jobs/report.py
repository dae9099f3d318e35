"""The run's report: what was measured, on how much, and what survived BHY (Markdown)."""

from __future__ import annotations

import posixpath
from typing import Any

import polars as pl
import pyarrow as pa

from ray_jobs.storage import Output


def _fmt(x: Any, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def write_report(output: Output, cfg, scores: pa.Table, concept_scores: pa.Table, plans: dict[str, Any]) -> str:
    """Write OUT/report.md and return its path or URI."""
    df = pl.from_arrow(scores).filter(pl.col("set_index").is_null())
    concepts = pl.from_arrow(concept_scores).filter(pl.col("set_index").is_null())
    lines = [
        f"# semprobe run {cfg.experiment_id()}",
        "",
        f"Images `{cfg.images}` · CNNs {', '.join(f'`{m}`' for m in cfg.models)} · word models "
        f"{', '.join(f'`{w}`' for w in cfg.words)} · layers `{cfg.layers}` · {cfg.sets} image set(s) of one image per "
        f"concept · {cfg.permutations} permutations (seed {cfg.seed}) · BHY at alpha {cfg.alpha} over all "
        f"{df.height} tests (every CNN x layer x word model).",
        "",
        "![2 vs. 2 by layer](figures/twovtwo.png)",
        "",
    ]
    for (model, wm), part in df.sort("layer_index").group_by(["model", "word_model"], maintain_order=True):
        first, last = part.row(0, named=True), part.row(-1, named=True)
        w, pairs = first["n_concepts"], first["n_pairs"]
        lines += [f"## {model} against {wm}", ""]
        note = (f"Every accuracy below is the fraction of **{pairs} concept pairs** passed, from **{w} concepts**"
                f" (mean over {cfg.sets} image set(s)).")
        if first["null_std"] is not None:
            note += (f" Under permuted labels the accuracy scatters by about {first['null_std']:.3f} (std), so differences"
                     f" between layers smaller than about {2 * first['null_std']:.2f} are within noise.")
        if w < 50:
            note += (" With so few concepts the curve is noisy: read it as a demonstration of the pipeline, not as a "
                     "measurement (the papers use several hundred concepts).")
        lines += [note, ""]
        n_sig = int(part["significant"].fill_null(False).sum())
        lines += [
            f"First layer `{first['layer']}`: {first['accuracy']:.3f}; last layer `{last['layer']}`: {last['accuracy']:.3f}. "
            f"{n_sig} of {part.height} layers significant after BHY.",
            "",
            "| # | layer | accuracy | std over sets | null mean +- std | p | p (BHY) | significant |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in part.iter_rows(named=True):
            null = "-" if r["null_mean"] is None else f"{r['null_mean']:.3f} +- {r['null_std']:.3f}"
            sig = "-" if r["significant"] is None else ("yes" if r["significant"] else "no")
            std = _fmt(r["std"]) if cfg.sets > 1 else "-"
            lines.append(f"| {r['layer_index']} | `{r['layer']}` | {r['accuracy']:.3f} | {std} | {null} | "
                         f"{_fmt(r['p_value'], '.4f')} | {_fmt(r['p_bhy'], '.4f')} | {sig} |")
        top = concepts.filter((pl.col("model") == model) & (pl.col("word_model") == wm) & (pl.col("layer") == last["layer"]))
        top = top.sort(["pass_rate", "concept_id"], descending=[True, False])
        best = ", ".join(f"{r['word']} {r['pass_rate']:.2f}" for r in top.head(5).iter_rows(named=True))
        worst = ", ".join(f"{r['word']} {r['pass_rate']:.2f}" for r in top.tail(5).iter_rows(named=True))
        lines += ["", f"Concepts the last layer represents best (pass rate): {best}; worst: {worst}.", ""]
    lines += [
        "Tables: `scores.parquet` (one row per CNN x layer x word model x set, and the mean over sets with set_index null), "
        "`concept_scores.parquet` (pass rate per concept), `tests/` (pair counts and the null), `similarity/` (the matrices).",
        "",
    ]
    with output.open_atomic("report.md") as f:
        f.stream.write("\n".join(lines).encode())
    return posixpath.join(output.uri, "report.md")
