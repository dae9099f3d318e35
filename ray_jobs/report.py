"""The run's report: one self-contained HTML file (figures inline) that opens offline.

It says what was measured, on how many concepts and pairs, what survived BHY,
and what was skipped and why.
"""

from __future__ import annotations

import base64
import posixpath
from html import escape
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from semprobe.ray_jobs.storage import Output

STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:13px;margin:.5em 0}
td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}
td:nth-child(2),th:nth-child(2){text-align:left}.note{background:#f6f6f0;padding:.6em 1em;border-left:3px solid #cc9}
code{font-size:90%}img{max-width:100%}details{margin:.4em 0}"""


def _f(x: Any, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _model_section(cfg, model: str, part: pl.DataFrame, concepts: pl.DataFrame, png: bytes, plan) -> list[str]:
    pre = plan.preprocess
    html = [
        f"<h2>{escape(model)}</h2>",
        f"<p>Weights <code>{escape(plan.weights)}</code> · layers <code>{escape(plan.config.layers)}</code> · "
        f"input {pre.size}x{pre.size} crops of images resized to {pre.resize_size} (shorter side)</p>",
        f'<img alt="2 vs. 2 through the layers of {escape(model)}" '
        f'src="data:image/png;base64,{base64.b64encode(png).decode()}">',
    ]
    for (word_model,), rows in part.sort("layer_index").group_by(["word_model"], maintain_order=True):
        first, last = rows.row(0, named=True), rows.row(-1, named=True)
        w, pairs = first["n_concepts"], first["n_pairs"]
        note = (
            f"Every accuracy here is the fraction of <b>{pairs} concept pairs</b> passed, from <b>{w} concepts</b> "
            f"(mean over {cfg.sets} image set(s))."
        )
        if first["null_std"] is not None:
            note += (
                f" Under permuted labels the accuracy scatters by about {first['null_std']:.3f} (std): differences "
                f"between layers below about {2 * first['null_std']:.2f} are within noise."
            )
        if w < 50:
            note += (
                " With so few concepts the curve is noisy: read it as a demonstration of the pipeline, not as a "
                "measurement (the papers use several hundred concepts)."
            )
        n_sig = int(rows["significant"].fill_null(False).sum())
        html += [
            f"<h3>against {escape(word_model)}</h3>",
            f'<p class="note">{note}</p>',
            f"<p>First layer <code>{escape(first['layer'])}</code>: {first['accuracy']:.3f}; last layer "
            f"<code>{escape(last['layer'])}</code>: {last['accuracy']:.3f}. <b>{n_sig} of {rows.height}</b> layers "
            f"significant after BHY at {cfg.alpha}.</p>",
        ]
        html.append(
            _table(
                ["#", "layer", "accuracy", "std over sets", "null mean", "null std", "p", "p (BHY)", "significant"],
                [
                    [
                        r["layer_index"],
                        r["layer"],
                        _f(r["accuracy"]),
                        _f(r["std"]) if cfg.sets > 1 else "-",
                        _f(r["null_mean"]),
                        _f(r["null_std"]),
                        _f(r["p_value"], ".4f"),
                        _f(r["p_bhy"], ".4f"),
                        "-" if r["significant"] is None else ("yes" if r["significant"] else "no"),
                    ]
                    for r in rows.iter_rows(named=True)
                ],
            )
        )
        top = concepts.filter(
            (pl.col("model") == model) & (pl.col("word_model") == word_model) & (pl.col("layer") == last["layer"])
        )
        top = top.sort(["pass_rate", "concept_id"], descending=[True, False])
        best = ", ".join(f"{r['word']} {r['pass_rate']:.2f}" for r in top.head(5).iter_rows(named=True))
        worst = ", ".join(f"{r['word']} {r['pass_rate']:.2f}" for r in top.tail(5).iter_rows(named=True))
        html.append(
            f"<p>Concepts the last layer represents best (pass rate): {escape(best)}; worst: {escape(worst)}.</p>"
        )
    return html


def _coverage(model: str, plan, left_out: list[str], errors: pa.Table) -> list[str]:
    """Concept matching, set drawing and image errors: what was skipped and why."""
    lemma = {c.concept_id: (c.lemmas[0] if c.lemmas else "") for c in plan.source.classes}
    n_classes = len(plan.source.classes)
    kept = len(plan.concepts.concept_ids) if plan.concepts is not None else n_classes
    html = [
        f"<h3>{escape(model)}</h3>",
        f"<p>{kept} of {n_classes} classes have a word in every word model; "
        f"{len(plan.concepts.dropped) if plan.concepts else 0} "
        f"dropped. {len(plan.dropped_for_sets)} concept(s) dropped for fewer than {plan.config.sets} images; "
        f"{errors.num_rows} image(s) skipped as unreadable; {len(left_out)} concept(s) left out for lacking an "
        f"extracted image in some set.</p>",
    ]
    if plan.concepts is not None and plan.concepts.dropped:
        rows = [[cid, lemma.get(cid, ""), ", ".join(models)] for cid, models in sorted(plan.concepts.dropped.items())]
        html.append(
            f"<details><summary>classes without a word ({len(rows)})</summary>"
            + _table(["class", "first lemma", "missing in"], rows)
            + "</details>"
        )
    if plan.dropped_for_sets:
        rows = [[cid, lemma.get(cid, ""), n] for cid, n in sorted(plan.dropped_for_sets.items())]
        html.append(
            f"<details><summary>concepts with too few images ({len(rows)})</summary>"
            + _table(["concept", "first lemma", "images"], rows)
            + "</details>"
        )
    if errors.num_rows:
        rows = [[e["image_id"], e["stage"], e["message"]] for e in errors.to_pylist()]
        html.append(
            f"<details><summary>images skipped ({len(rows)})</summary>"
            + _table(["image", "stage", "why"], rows)
            + "</details>"
        )
    if left_out:
        html.append(f"<p>Left out (an image failed in some set): {escape(', '.join(left_out))}</p>")
    return html


def write_report(
    output: Output,
    cfg,
    scores: pa.Table,
    concept_scores: pa.Table,
    figures: dict[str, bytes],
    coverage: dict[str, tuple[Any, list[str], pa.Table]],
) -> str:
    """Write OUT/report.html and return its path or URI.

    ``figures`` maps each model to its PNG; ``coverage`` maps it to (extraction
    plan, concepts left out after image errors, its errors table).
    """
    df, concepts = pl.from_arrow(scores), pl.from_arrow(concept_scores)
    html = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>semprobe run {cfg.experiment_id()}</title>"
        f"<style>{STYLE}</style></head><body>",
        f"<h1>semprobe run {cfg.experiment_id()}</h1>",
        f"<p>Images <code>{escape(cfg.images)}</code> · CNNs {escape(', '.join(cfg.models))} · word models "
        f"{escape(', '.join(cfg.words))} · layers <code>{escape(cfg.layers)}</code> · {cfg.sets} image set(s) "
        f"of one image "
        f"per concept · {cfg.permutations} permutations (seed {cfg.seed}) · BHY at alpha {cfg.alpha} over all "
        f"{df.height} "
        f"tests (every CNN x layer x word model).</p>",
    ]
    for model, png in figures.items():
        html += _model_section(cfg, model, df.filter(pl.col("model") == model), concepts, png, coverage[model][0])
    html.append("<h2>Coverage: what was skipped and why</h2>")
    for model, item in coverage.items():
        html += _coverage(model, *item)
    html.append(
        "<p>Tables: <code>scores.parquet</code> (one row per CNN x layer x word model: the mean over sets), "
        "<code>scores_by_set.parquet</code> (one row per image set), <code>concept_scores.parquet</code> and "
        "<code>concept_scores_by_set.parquet</code> (pass rate per concept), <code>tests/</code> "
        "(pair counts and the null), <code>similarity/</code> (the matrices), <code>figures/</code>.</p></body></html>"
    )
    output.write_bytes("\n".join(html).encode(), "report.html")
    return posixpath.join(output.uri, "report.html")


FAILURE_TITLES = {"misclassified": "misclassified images", "adversarial": "targeted adversarial images"}


def write_failure_report(
    output: Output,
    cfg,
    command: str,
    summary: dict[str, Any],
    rows: list[dict[str, Any]],
    figures: dict[str, bytes],
    notes: list[tuple[str, list[str], list[list[Any]]]],
) -> str:
    """OUT/report.html of ``semprobe misclassified`` or ``adversarial``: the summary, the 1 vs. 2 table, the
    figures, ``notes``
    (title, header, rows) as tables; returns its path or URI."""
    title = f"semprobe {command} {cfg.experiment_id()}: {FAILURE_TITLES[command]}"
    html = [
        f"<!doctype html><html><head><meta "
        f"charset='utf-8'><title>{escape(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        f"<p>Images <code>{escape(cfg.images)}</code> · CNN {escape(cfg.model)} · word model "
        f"{escape(cfg.words)} · layers "
        f"<code>{escape(cfg.layers)}</code> · R = {summary['references']} reference concepts, each with one correctly "
        f"classified image, never the true (source) or predicted (target) class · {cfg.permutations} "
        f"permutations of the "
        f"reference words (seed {cfg.seed}) · BHY at alpha {cfg.alpha} over every row below.</p>",
        _table(["", "value"], [[k, _f(v, ".4g") if isinstance(v, float) else v] for k, v in summary.items()]),
    ]
    for name, png in figures.items():
        html.append(f'<img alt="{escape(name)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">')
    if rows:
        html.append(
            "<h2>1 vs. 2 through the layers</h2><p>An image passes when its layer activation, correlated with the "
            "references', agrees better with the true (source) word's correlations than with the predicted (target) "
            "word's; chance is 0.5.</p>"
        )
        n = min(r["n"] for r in rows)
        stds = [r["null_std"] for r in rows if r["null_std"] is not None]
        html.append(
            f'<p class="note">Each accuracy is a fraction of its group\'s n images: with n = {n} one image moves it by '
            f"{1 / n:.3f}"
            + (f"; under permuted reference words it scatters by about {np.mean(stds):.3f} (std)" if stds else "")
            + ". Read small groups as a demonstration, not a measurement (the paper: 100 sources x 6 targets, R "
            "= 100).</p>"
        )
        html.append(
            _table(
                ["group", "#", "layer", "accuracy", "n", "null mean", "null std", "p", "p (BHY)", "significant"],
                [
                    [
                        r["group"],
                        r["layer_index"],
                        r["layer"],
                        _f(r["accuracy"]),
                        r["n"],
                        _f(r["null_mean"]),
                        _f(r["null_std"]),
                        _f(r["p_value"], ".4f"),
                        _f(r["p_bhy"], ".4f"),
                        "-" if r["significant"] is None else ("yes" if r["significant"] else "no"),
                    ]
                    for r in rows
                ],
            )
        )
    for name, header, table in notes:
        html.append(f"<details><summary>{escape(name)}</summary>{_table(header, table)}</details>")
    html.append("</body></html>")
    output.write_bytes("\n".join(html).encode(), "report.html")
    return posixpath.join(output.uri, "report.html")
