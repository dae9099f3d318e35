"""``semprobe misclassified``: where in the network does a mistake appear?

Misclassification severity (the cosine of the true and the predicted class's word
vectors, per misclassified image) and the 1 vs. 2 test through the layers
(Dharmaretnam & Fyshe 2018, Section 3.3; 2021, Section 4): for each
misclassified image x with true class t and predicted class p, does the layer's
view of x side with t or with p, judged against R reference concepts that each
have one correctly classified image (never t or p)?

Layout under OUT::

    config.json, summary.json   the resolved config and the counts, each with the --store mode
    extract/                    the extraction (``ray_jobs.extraction``), with predictions
    severity.parquet            datasets.schema.SEVERITY
    one_vs_two.parquet          datasets.schema.ONE_VS_TWO, one row per layer: its test of every misclassified image
    report.html, figures/one_vs_two.png

``--store similarity`` (the default when the model actors get GPUs) writes no activation: the extraction is two
passes, the predictions of every image first (they decide which images are misclassified and which are the
references), then the misclassified images and their reference images, whose Pearson r per layer the model actors
compute on their devices in float64 (:func:`semprobe.ray_jobs.fused.run_fused_references`:
``extract/reference_correlations/<model>/<layer>.parquet``, ``datasets.schema.REFERENCE_CORRELATIONS``); the 1 vs. 2
tasks read those instead of the activations.

The misclassified images are one group: each row of one_vs_two.parquet is the test of one layer, none
aggregates others. The start and the 1 vs. 2 machinery are :mod:`semprobe.ray_jobs.failure_analysis`, shared with
``semprobe adversarial``.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from semprobe.analysis.figures import one_vs_two_figure
from semprobe.datasets import schema
from semprobe.ray_jobs.config import MisclassifiedConfig
from semprobe.ray_jobs.failure_analysis import (
    check_references,
    one_vs_two_through_layers,
    prepare,
    write_one_vs_two,
)
from semprobe.ray_jobs.figures import save_figure
from semprobe.ray_jobs.lease import holding_lease
from semprobe.ray_jobs.report import write_failure_report
from semprobe.ray_jobs.storage import Output


@holding_lease
def run_misclassified(cfg: MisclassifiedConfig, log=print) -> dict[str, Any]:
    """Extract, find the misclassified images, score severity and 1 vs. 2 through the layers."""
    output = Output(cfg.out)
    ctx = prepare(cfg, output, log)
    plan, words, predictions = ctx.plan, ctx.words, ctx.predictions
    correct = ctx.correct
    wrong = [m for m in ctx.manifest if m["image_id"] in predictions and predictions[m["image_id"]] != m["class_index"]]
    unnamed = [m for m in wrong if predictions[m["image_id"]] not in words]
    wrong = [m for m in wrong if predictions[m["image_id"]] in words]
    r = min(cfg.references, len(ctx.order) - 2)
    log(
        f"misclassified: {len(wrong)} image(s) with words for both classes ({len(unnamed)} more predicted a "
        f"class without one); "
        f"R = {r} reference concepts of {len(correct)} correctly classified images"
    )
    check_references(r)

    t_idx, p_idx = [m["class_index"] for m in wrong], [predictions[m["image_id"]] for m in wrong]
    cosine = ctx.cosine(t_idx, p_idx)
    severity = pa.table(
        {
            "model": [plan.model] * len(wrong),
            "image_id": [m["image_id"] for m in wrong],
            "true_index": pa.array(t_idx, pa.int32()),
            "true_word": [words[c] for c in t_idx],
            "predicted_index": pa.array(p_idx, pa.int32()),
            "predicted_word": [words[c] for c in p_idx],
            "cosine": cosine,
        },
        schema=schema.SEVERITY,
    )
    output.write_table(schema.stamp(severity, cfg.experiment_id()), "severity.parquet")
    summary = {
        "model": plan.model,
        "weights": plan.weights,
        "n_images": len(ctx.manifest),
        "n_correct": len(correct),
        "n_misclassified": len(wrong),
        "n_unnamed": len(unnamed),
        "n_classes_sharing_a_word": len(ctx.concepts.shared),
        "references": r,
        "mean_severity": float(cosine.mean()) if wrong else None,
        "store": ctx.store,
    }
    notes = [
        (
            "misclassified images and their severity",
            ["image", "true", "predicted", "cosine"],
            [[s["image_id"], s["true_word"], s["predicted_word"], f"{s['cosine']:.3f}"] for s in severity.to_pylist()],
        ),
        ctx.shared_words(),
    ]
    output.write_json(summary, "summary.json")
    if not wrong:
        log("misclassified: no misclassified image has words for both classes; nothing to test")
        write_failure_report(output, cfg, "misclassified", summary, [], {}, notes)
        return summary

    images = [m["image_id"] for m in wrong]
    rows = one_vs_two_through_layers(
        cfg,
        output,
        ctx,
        ("extract", "activations"),
        images,
        t_idx,
        p_idx,
        r,
        {"misclassified": list(range(len(images)))},
        log=log,
    )
    write_one_vs_two(output, cfg, rows, "one_vs_two.parquet")
    figure = one_vs_two_figure(rows, f"{plan.model}: {len(images)} misclassified images, R = {r}")
    png = save_figure(output, figure, "figures", "one_vs_two.png")
    report = write_failure_report(output, cfg, "misclassified", summary, rows, {"one_vs_two.png": png}, notes)
    log(
        f"misclassified: mean severity (cosine of true and predicted words) {summary['mean_severity']:.3f}; "
        f"1 vs. 2 from {rows[0]['accuracy']:.2f} (first layer) to {rows[-1]['accuracy']:.2f} (last); report at {report}"
    )
    return summary
