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

from semprobe.analysis.scores import families
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


def _img(png: bytes, alt: str) -> str:
    """A PNG inlined in the page (the report is one self-contained file)."""
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _model_section(cfg, model: str, part: pl.DataFrame, concepts: pl.DataFrame, png: bytes, plan) -> list[str]:
    pre = plan.preprocess
    html = [
        f"<h2>{escape(model)}</h2>",
        f"<p>Weights <code>{escape(plan.weights)}</code> · layers <code>{escape(plan.config.layers)}</code> · "
        f"input {pre.size}x{pre.size} crops of images resized to {pre.resize_size} (shorter side)</p>",
        _img(png, f"2 vs. 2 through the layers of {model}"),
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


def _architecture(model: str, diagram, alpha: float) -> list[str]:
    """The architecture diagram: the SVG inline (its tooltips need the page), the PNG for papers below it."""
    # Inline in HTML, <svg> needs no namespace (the parser gives it its own): the report names no URL at all.
    svg = diagram.svg.replace(' xmlns="http://www.w3.org/2000/svg"', "", 1)
    return [
        f"<h3>{escape(model)}: the architecture, coloured by what each layer knows</h3>",
        f"<p>Each probed layer is a box coloured by its 2 vs. 2 accuracy against {escape(diagram.word_model)} "
        f"(mean over image sets), outlined in black when significant after BHY at {alpha}; grey dots are runs of "
        "unprobed operations; a line that leaves the main path and rejoins it is a residual connection. Hover a "
        f"layer for its numbers. Files: <code>{escape(diagram.svg_path)}</code>, <code>{escape(diagram.png_path)}"
        "</code>.</p>",
        f'<div class="architecture-diagram" style="overflow-x:auto">{svg}</div>',
        f"<details><summary>the PNG, for papers</summary>{_img(diagram.png, f'architecture of {model}')}</details>",
    ]


# What one BHY family is, per --family (analysis.scores.FAMILIES), in the words of each job.
FAMILY_WORDS = {
    "run": {
        "all": "one family of every test (every CNN x layer x word model)",
        "model": "one family per CNN (its layers x word models: one figure)",
        "model,word_model": "one family per CNN and word model (its layers: one curve)",
    },
    "dynamics": {
        "all": "one family of every test (every run x epoch x split x layer x word model)",
        "model": "one family per training run (its epochs x splits x layers x word models)",
        "model,word_model": "one family per training run and word model (its epochs x splits x layers)",
    },
    "one vs. two": {
        "job": "one family of every row (one CNN, one word model: every group x layer)",
    },
}


def family_notes(job: str, family: str, families: list[Any], alpha: float) -> tuple[str, list[str]]:
    """Plain text: what the BHY family is and its size, and a warning for each family in which the permutations
    leave BHY no room (``analysis.stats.bhy_reach``: with P permutations no p is below 1 / (P + 1)).

    ``families`` are ``analysis.scores.Family``: their key, m and n_perm.
    """
    if not families:
        return "No permutation p-values (0 permutations): no BHY.", []
    sizes = sorted({f.m for f in families})
    statement = (
        f"BHY at alpha {alpha} within {FAMILY_WORDS[job][family]}: {len(families)} "
        f"famil{'y' if len(families) == 1 else 'ies'} of {', '.join(map(str, sizes)) or 0} test(s)"
        + (" each" if len(families) > 1 and len(sizes) == 1 else "")
        + "."
    )
    warnings = []
    for f in families:
        reach = f.reach(alpha)
        if reach.lone_test_can_be_rejected:
            continue
        name = " / ".join(map(str, f.key)) or "the family"
        why = (
            f"the smallest p {reach.n_perm} permutations can give, 1/{reach.n_perm + 1} = {reach.min_p:.3g}, exceeds "
            f"BHY's first threshold alpha / (m c(m)) = {reach.first_threshold:.3g} (m = {reach.m})"
        )
        more = f"{reach.permutations_for_a_lone_test} permutations would let a lone test through"
        if reach.can_reject:
            warnings.append(
                f"{name}: no test is significant on its own: {why}; at least {reach.needed} of its {reach.m} tests "
                f"must reach that p before BHY rejects any ({more})."
            )
        else:
            warnings.append(
                f"{name}: BHY at alpha {alpha} cannot reject any of its {reach.m} tests, even if every p were "
                f"minimal: {why}, and even all {reach.m} at that p stay above alpha / c(m) ({more})."
            )
    return statement, warnings


def family_summary(family: str, families: list[Any], alpha: float) -> dict[str, Any]:
    """The BHY families for summary.json: the choice, each family's key, size and the fewest tests at the
    smallest p that BHY needs to reject any (null: not even all)."""
    return {
        "family": family,
        "families": [{"key": list(f.key), "m": f.m, "needed_at_min_p": f.reach(alpha).needed} for f in families],
    }


def _shared_and_table(match) -> str:
    """The coverage sentence's tail: classes dropped for a shared word, and those a concept-words table named."""
    if match is None:
        return ""
    return (f", {len(match.shared)} more for sharing a word with a lower class" if match.shared else "") + (
        f"; {len(match.overrides)} named by the concept-words table {match.words_table}" if match.overrides else ""
    )


def _coverage(model: str, plan, left_out: list[str], errors: pa.Table) -> list[str]:
    """Concept matching, set drawing and image errors: what was skipped and why."""
    lemma = {c.concept_id: (c.lemmas[0] if c.lemmas else "") for c in plan.source.classes}
    n_classes = len(plan.source.classes)
    kept = len(plan.concepts.concept_ids) if plan.concepts is not None else n_classes
    html = [
        f"<h3>{escape(model)}</h3>",
        f"<p>{kept} of {n_classes} classes have a word in every word model; "
        f"{len(plan.concepts.dropped) if plan.concepts else 0} "
        f"dropped{_shared_and_table(plan.concepts)}. "
        f"{len(plan.dropped_for_sets)} concept(s) dropped for fewer than {plan.config.sets} images; "
        f"{errors.num_rows} image(s) skipped as unreadable; {len(left_out)} concept(s) left out for lacking an "
        f"extracted image in some set.</p>",
    ]
    if plan.concepts is not None and (plan.concepts.dropped or plan.concepts.shared):
        match = plan.concepts
        rows = [[cid, lemma.get(cid, ""), match.reason(cid)] for cid in sorted({*match.dropped, *match.shared})]
        html.append(
            f"<details><summary>classes without a word of their own ({len(rows)})</summary>"
            + _table(["class", "first lemma", "why"], rows)
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
    families: list[Any] = (),
    diagrams: dict[str, Any] | None = None,
    panels: dict[str, list[tuple[str, bytes]]] | None = None,
) -> str:
    """Write OUT/report.html and return its path or URI.

    ``figures`` maps each model to its PNG; ``coverage`` maps it to (extraction
    plan, concepts left out after image errors, its errors table); ``families`` are the BHY families
    (``analysis.scores.Family``) of ``scores``; ``diagrams`` maps models to their architecture diagrams
    (``ray_jobs.figures.Diagram``); ``panels`` maps a model to more figures, each (heading, PNG), shown after its
    tables.
    """
    df, concepts = pl.from_arrow(scores), pl.from_arrow(concept_scores)
    statement, warnings = family_notes("run", cfg.family, list(families), cfg.alpha)
    html = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>semprobe run {cfg.experiment_id()}</title>"
        f"<style>{STYLE}</style></head><body>",
        f"<h1>semprobe run {cfg.experiment_id()}</h1>",
        f"<p>Images <code>{escape(cfg.images)}</code> · CNNs {escape(', '.join(cfg.models))} · word models "
        f"{escape(', '.join(cfg.words))} · layers <code>{escape(cfg.layers)}</code> · {cfg.sets} image set(s) "
        f"of one image "
        f"per concept · {cfg.permutations} permutations (seed {cfg.seed}) · {df.height} tests. "
        f"{escape(statement)}</p>",
        *(f'<p class="note">{escape(w)}</p>' for w in warnings),
    ]
    for model, png in figures.items():
        html += _model_section(cfg, model, df.filter(pl.col("model") == model), concepts, png, coverage[model][0])
        if diagrams and model in diagrams:
            html += _architecture(model, diagrams[model], cfg.alpha)
        for heading, more in (panels or {}).get(model, []):
            html.append(f"<h3>{escape(heading)}</h3>{_img(more, f'{model}: {heading}')}")
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


# The 1 vs. 2 nulls (--null, analysis.onevtwo.NULLS), as the report names them.
NULL_WORDS = {
    "rows": "word-correlation rows shuffled among the images, true and predicted side apart",
    "columns": "reference words permuted",
}
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
    statement, warnings = family_notes("one vs. two", "job", families(rows), cfg.alpha)
    html = [
        f"<!doctype html><html><head><meta "
        f"charset='utf-8'><title>{escape(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        f"<p>Images <code>{escape(cfg.images)}</code> · CNN {escape(cfg.model)} · word model "
        f"{escape(cfg.words)} · layers "
        f"<code>{escape(cfg.layers)}</code> · R = {summary['references']} reference concepts, each with one correctly "
        f"classified image, never the true (source) or predicted (target) class · {cfg.permutations} "
        f"permutations (seed {cfg.seed}, null: {cfg.null}) · precision {cfg.precision} · {escape(statement)}</p>",
        *(f'<p class="note">{escape(w)}</p>' for w in warnings),
        _table(["", "value"], [[k, _f(v, ".4g") if isinstance(v, float) else v] for k, v in summary.items()]),
    ]
    for name, png in figures.items():
        html.append(_img(png, name))
    if rows:
        html.append(
            "<h2>1 vs. 2 through the layers</h2><p>An image passes when its layer activation, correlated with the "
            "references', agrees better with the true (source) word's correlations than with the predicted (target) "
            "word's; chance is 0.5.</p>"
        )
        n = min(r["n"] for r in rows)
        stds = [r["null_std"] for r in rows if r["null_std"] is not None]
        scatter = (
            f"; under the null ({NULL_WORDS[cfg.null]}) it scatters by about {np.mean(stds):.3f} (std)" if stds else ""
        )
        html.append(
            f'<p class="note">Each accuracy is a fraction of its group\'s n images: with n = {n} one image moves it by '
            f"{1 / n:.3f}"
            + scatter
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
