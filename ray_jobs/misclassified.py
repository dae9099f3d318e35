"""``semprobe misclassified``: where in the network does a mistake appear?

Misclassification severity (the cosine of the true and the predicted class's word
vectors, per misclassified image) and the 1 vs. 2 test through the layers
(Dharmaretnam & Fyshe 2018, Section 3.3; 2021, Section 4): for each
misclassified image x with true class t and predicted class p, does the layer's
view of x side with t or with p, judged against R reference concepts that each
have one correctly classified image (never t or p)?

Layout under OUT::

    config.json, summary.json
    extract/                    the extraction (``ray_jobs.extract``), with predictions
    severity.parquet            one row per misclassified image with words for both classes
    one_vs_two.parquet          datasets.schema.ONE_VS_TWO, one row per layer
    figures/one_vs_two.png
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from semprobe.analysis.errors import InputError
from semprobe.analysis.figures import one_vs_two_figure
from semprobe.analysis.onevtwo import one_vs_two, one_vs_two_null
from semprobe.analysis.stats import bhy, permutation_p_value
from semprobe.datasets import schema
from semprobe.datasets.classes import imagenet_classes
from semprobe.datasets.concepts import match_concepts
from semprobe.datasets.words import load_word_model
from semprobe.ray_jobs.config import MisclassifiedConfig
from semprobe.ray_jobs.extraction import ExtractionPlan, plan_extraction, run_extract
from semprobe.ray_jobs.figures import save_figure
from semprobe.ray_jobs.report import write_failure_report
from semprobe.ray_jobs.startup import check_same_experiment, connect, write_resolved
from semprobe.ray_jobs.storage import Output
from semprobe.ray_jobs.store import layer_views


def _unit_rows(x: np.ndarray) -> np.ndarray:
    z = np.asarray(x, np.float64)
    z = z - z.mean(axis=1, keepdims=True)
    return z / np.linalg.norm(z, axis=1, keepdims=True)


@ray.remote
def layer_task(
    out: str,
    folders: list[tuple[str, ...]],
    images: list[str],
    references: list[list[str]],
    d_true: np.ndarray,
    d_pred: np.ndarray,
    groups: dict[str, list[int]],
    n_perm: int,
    seed: int,
) -> dict[str, dict[str, Any]]:
    """1 vs. 2 of one layer: the images' activations against their references', and the null, per group of images.

    ``folders`` hold the layer's activation files (the images and the references
    may come from different extractions); ``groups`` name subsets of the images.
    """
    z = {}
    needed = set(images) | {r for refs in references for r in refs}
    with tempfile.TemporaryDirectory(prefix="semprobe-1v2-") as scratch:
        for folder in folders:
            where, views = layer_views(Output(out), folder, scratch)
            ids = sorted(needed & where.keys())
            if ids:
                z.update(zip(ids, _unit_rows(np.stack([views[where[i][0]][where[i][1]] for i in ids]))))
            del views, where  # release the memory maps before the scratch folder goes
    i_x = np.stack([[z[x] @ z[r] for r in refs] for x, refs in zip(images, references)])
    results = {}
    for group, members in groups.items():
        args = (i_x[members], d_true[members], d_pred[members])
        result = one_vs_two(*args)
        results[group] = {"accuracy": result.accuracy, "n": len(members), "null": one_vs_two_null(*args, n_perm, seed)}
    return results


@dataclass
class FailureContext:
    """What both failure analyses start from: the clean extraction, its predictions, the words, the references."""

    plan: ExtractionPlan
    word_model: Any
    words: dict[int, str]  # ImageNet class index -> word, for every class the word model names
    manifest: list[dict[str, Any]]
    predictions: dict[str, int]  # image_id -> predicted class index
    pool: dict[int, str]  # concept (class index) -> its reference image: the first correctly classified by id
    order: list[int]  # the concepts of ``pool`` in the seed's shuffled order

    @property
    def correct(self) -> list[dict[str, Any]]:
        return [m for m in self.manifest if self.predictions.get(m["image_id"]) == m["class_index"]]

    def references(self, t: int, p: int, r: int) -> list[int]:
        """The first ``r`` reference concepts that are neither t nor p."""
        return [c for c in self.order if c not in (t, p)][:r]

    def vectors(self, classes: list[int]) -> np.ndarray:
        return self.word_model.vectors([self.words[c] for c in classes]).astype(np.float64)

    def cosine(self, a: list[int], b: list[int]) -> np.ndarray:
        """(n,) the cosine of the word vectors of classes a[k] and b[k]."""
        if not a:
            return np.zeros(0)
        u, v = self.vectors(a), self.vectors(b)
        return np.einsum("ij,ij->i", u, v) / (np.linalg.norm(u, axis=1) * np.linalg.norm(v, axis=1))

    def word_side(self, t_idx: list[int], p_idx: list[int], refs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """(n, R) d_t and d_p: the words of t and p correlated with the words of each image's references."""
        classes = sorted(set(t_idx) | set(p_idx) | {c for rs in refs for c in rs})
        zw = dict(zip(classes, _unit_rows(self.vectors(classes))))
        d_true = np.stack([[zw[t] @ zw[c] for c in rs] for t, rs in zip(t_idx, refs)])
        d_pred = np.stack([[zw[p] @ zw[c] for c in rs] for p, rs in zip(p_idx, refs)])
        return d_true, d_pred


def prepare(cfg, output: Output, log) -> FailureContext:
    """Check the inputs, write the resolved config, run (or resume) the clean extraction, gather predictions
    and words."""
    check_same_experiment(output, cfg)
    ecfg = cfg.extract_config(cfg.model, cfg.extract_out, [cfg.words])
    plan = plan_extraction(ecfg)
    if plan.source.class_space != "imagenet":
        raise InputError(
            f"{cfg.images}: {cfg.COMMAND} needs ImageNet-labelled images (a folder of wnids, or sample:imagenet)"
        )
    word_model = load_word_model(cfg.words)
    connect(log)
    write_resolved(output, cfg)
    run_extract(ecfg, log=log, plan=plan)
    ext = Output(ecfg.out)
    manifest = ext.read_table("manifest.parquet").to_pylist()
    predictions = {
        r["image_id"]: r["predicted_index"]
        for r in pq.read_table(ext.path("predictions", plan.model_key), filesystem=ext.fs).to_pylist()
    }
    words = {
        r["class_index"]: r["word"]
        for r in match_concepts(imagenet_classes(), "imagenet", [word_model]).table.to_pylist()
    }
    pool: dict[int, str] = {}
    for m in sorted(manifest, key=lambda m: m["image_id"]):
        if predictions.get(m["image_id"]) == m["class_index"]:
            pool.setdefault(m["class_index"], m["image_id"])
    order = [int(k) for k in np.random.default_rng(cfg.seed).permutation(sorted(pool))]
    return FailureContext(plan, word_model, words, manifest, predictions, pool, order)


def check_references(r: int) -> None:
    if r < 5:
        raise InputError(
            f"only {max(r, 0)} reference concepts with a correctly classified image besides t and p: "
            "the 1 vs. 2 test needs at least 5 (use more images)"
        )


def one_vs_two_through_layers(
    cfg,
    output: Output,
    ctx: FailureContext,
    folder: tuple[str, ...],
    images: list[str],
    t_idx: list[int],
    p_idx: list[int],
    r: int,
    groups: dict[str, list[int]],
) -> list[dict[str, Any]]:
    """Every layer's 1 vs. 2 per group as Ray tasks, p-values, BHY over every (group, layer) row; one_vs_two.parquet."""
    refs = [ctx.references(t, p, r) for t, p in zip(t_idx, p_idx)]
    d_true, d_pred = ctx.word_side(t_idx, p_idx, refs)
    ref_images = [[ctx.pool[c] for c in rs] for rs in refs]
    key = ctx.plan.model_key
    results = ray.get(
        [
            layer_task.options(num_cpus=cfg.task_cpus).remote(
                output.uri,
                list(dict.fromkeys([folder + (key, layer.name), ("extract", "activations", key, layer.name)])),
                images,
                ref_images,
                d_true,
                d_pred,
                groups,
                cfg.permutations,
                cfg.seed,
            )
            for layer in ctx.plan.layers
        ]
    )
    rows = [
        {
            "model": ctx.plan.model,
            "layer": layer.name,
            "layer_index": layer.layer_index,
            "group": group,
            "accuracy": res[group]["accuracy"],
            "n": res[group]["n"],
            "n_references": r,
            "n_perm": cfg.permutations,
            "null_mean": float(res[group]["null"].mean()) if cfg.permutations else None,
            "null_std": float(res[group]["null"].std()) if cfg.permutations else None,
            "p_value": permutation_p_value(res[group]["null"], res[group]["accuracy"]) if cfg.permutations else None,
        }
        for group in groups
        for layer, res in zip(ctx.plan.layers, results)
    ]
    if cfg.permutations:
        significant, adjusted = bhy([row["p_value"] for row in rows], cfg.alpha)
    else:
        significant, adjusted = [None] * len(rows), [None] * len(rows)
    for row, sig, adj in zip(rows, significant, adjusted):
        row["p_bhy"], row["significant"] = None if adj is None else float(adj), None if sig is None else bool(sig)
    table = pa.Table.from_pylist(rows, schema=schema.ONE_VS_TWO)
    output.write_table(schema.stamp(table, cfg.experiment_id()), "one_vs_two.parquet")
    return rows


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
        }
    )
    output.write_table(schema.stamp(severity, cfg.experiment_id()), "severity.parquet")
    summary = {
        "model": plan.model,
        "n_images": len(ctx.manifest),
        "n_correct": len(correct),
        "n_misclassified": len(wrong),
        "n_unnamed": len(unnamed),
        "references": r,
        "mean_severity": float(cosine.mean()) if wrong else None,
    }
    notes = [
        (
            "misclassified images and their severity",
            ["image", "true", "predicted", "cosine"],
            [[s["image_id"], s["true_word"], s["predicted_word"], f"{s['cosine']:.3f}"] for s in severity.to_pylist()],
        )
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
    )
    png = save_figure(
        output, one_vs_two_figure(rows, f"{plan.model}: {len(images)} misclassified images, R = {r}"), "one_vs_two.png"
    )
    report = write_failure_report(output, cfg, "misclassified", summary, rows, {"one_vs_two.png": png}, notes)
    log(
        f"misclassified: mean severity (cosine of true and predicted words) {summary['mean_severity']:.3f}; "
        f"1 vs. 2 from {rows[0]['accuracy']:.2f} (first layer) to {rows[-1]['accuracy']:.2f} (last); report at {report}"
    )
    return summary
