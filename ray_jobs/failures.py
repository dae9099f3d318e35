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

import io
import posixpath
import tempfile
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from analysis.errors import InputError
from analysis.figures import one_vs_two_figure
from analysis.onevtwo import one_vs_two, one_vs_two_null
from analysis.stats import bhy, permutation_p_value
from datasets import schema
from datasets.classes import imagenet_classes
from datasets.concepts import match_concepts
from datasets.words import load_word_model
from ray_jobs.config import MisclassifiedConfig, write_resolved
from ray_jobs.extract import check_same_experiment, plan_extraction, run_extract
from ray_jobs.run import layer_views
from ray_jobs.storage import Output


def _unit_rows(x: np.ndarray) -> np.ndarray:
    z = np.asarray(x, np.float64)
    z = z - z.mean(axis=1, keepdims=True)
    return z / np.linalg.norm(z, axis=1, keepdims=True)


@ray.remote
def layer_task(out: str, folder: tuple[str, ...], images: list[str], references: list[list[str]], d_true: np.ndarray,
               d_pred: np.ndarray, n_perm: int, seed: int) -> dict[str, Any]:
    """1 vs. 2 of one layer: the images' activations against their references', and the null."""
    with tempfile.TemporaryDirectory(prefix="semprobe-1v2-") as scratch:
        where, views = layer_views(Output(out), folder, scratch)
        needed = sorted(set(images) | {r for refs in references for r in refs})
        z = dict(zip(needed, _unit_rows(np.stack([views[where[i][0]][where[i][1]] for i in needed]))))
        del views, where  # release the memory maps before the scratch folder goes
    i_x = np.stack([[z[x] @ z[r] for r in refs] for x, refs in zip(images, references)])
    result = one_vs_two(i_x, d_true, d_pred)
    return {"accuracy": result.accuracy, "passed": result.passed, "null": one_vs_two_null(i_x, d_true, d_pred, n_perm, seed)}


def run_misclassified(cfg: MisclassifiedConfig, log=print) -> dict[str, Any]:
    """Extract, find the misclassified images, score severity and 1 vs. 2 through the layers."""
    output = Output(cfg.out)
    check_same_experiment(output, cfg)
    ecfg = cfg.extract_config(cfg.model, cfg.extract_out, [cfg.words])
    plan = plan_extraction(ecfg)
    if plan.source.class_space != "imagenet":
        raise InputError(f"{cfg.images}: misclassification needs ImageNet-labelled images (a folder of wnids, or sample:imagenet)")
    word_model = load_word_model(cfg.words)
    if not ray.is_initialized():
        ray.init()
    write_resolved(output, cfg)
    run_extract(ecfg, log=log, plan=plan)

    ext = Output(ecfg.out)
    manifest = ext.read_table("manifest.parquet").to_pylist()
    predictions = {r["image_id"]: r["predicted_index"] for r in pq.read_table(ext.path("predictions", plan.model_key), filesystem=ext.fs).to_pylist()}
    words = {r["class_index"]: r["word"] for r in match_concepts(imagenet_classes(), "imagenet", [word_model]).table.to_pylist()}
    rng = np.random.default_rng(cfg.seed)
    correct = [m for m in manifest if predictions.get(m["image_id"]) == m["class_index"]]
    pool = {}  # reference concept -> one correctly classified image (the first by id)
    for m in sorted(correct, key=lambda m: m["image_id"]):
        pool.setdefault(m["class_index"], m["image_id"])
    order = [int(k) for k in rng.permutation(sorted(pool))]
    wrong = [m for m in manifest if m["image_id"] in predictions and predictions[m["image_id"]] != m["class_index"]]
    unnamed = [m for m in wrong if predictions[m["image_id"]] not in words]
    wrong = [m for m in wrong if predictions[m["image_id"]] in words]
    r = min(cfg.references, len(order) - 2)
    log(f"misclassified: {len(wrong)} image(s) with words for both classes ({len(unnamed)} more predicted a class without one); "
        f"R = {r} reference concepts of {len(correct)} correctly classified images")
    if r < 5:
        raise InputError(f"only {max(r, 0)} reference concepts with a correctly classified image besides t and p: "
                         "the 1 vs. 2 test needs at least 5 (use more images)")

    # severity: the cosine of the true and the predicted word, per misclassified image
    vec = lambda classes: word_model.vectors([words[c] for c in classes]).astype(np.float64)  # noqa: E731
    t_idx, p_idx = [m["class_index"] for m in wrong], [predictions[m["image_id"]] for m in wrong]
    tv, pv = (vec(c) for c in (t_idx, p_idx)) if wrong else (np.zeros((0, 1)), np.zeros((0, 1)))
    cosine = np.einsum("ij,ij->i", tv, pv) / (np.linalg.norm(tv, axis=1) * np.linalg.norm(pv, axis=1)) if wrong else np.zeros(0)
    severity = pa.table({
        "model": [plan.model] * len(wrong), "image_id": [m["image_id"] for m in wrong],
        "true_index": pa.array(t_idx, pa.int32()), "true_word": [words[c] for c in t_idx],
        "predicted_index": pa.array(p_idx, pa.int32()), "predicted_word": [words[c] for c in p_idx], "cosine": cosine,
    })
    output.write_table(schema.stamp(severity, cfg.experiment_id()), "severity.parquet")
    summary = {"model": plan.model, "n_images": len(manifest), "n_correct": len(correct), "n_misclassified": len(wrong),
               "n_unnamed": len(unnamed), "references": r, "mean_severity": float(cosine.mean()) if wrong else None}
    if not wrong:
        log("misclassified: no misclassified image has words for both classes; nothing to test")
        output.write_json(summary, "summary.json")
        return summary

    # 1 vs. 2: per image its R references (never t or p), and the word side
    refs = [[c for c in order if c not in (t, p)][:r] for t, p in zip(t_idx, p_idx)]
    all_refs = sorted({c for rs in refs for c in rs})
    zw = dict(zip(all_refs + sorted(set(t_idx) | set(p_idx)), _unit_rows(vec(all_refs + sorted(set(t_idx) | set(p_idx))))))
    d_true = np.stack([[zw[t] @ zw[c] for c in rs] for t, rs in zip(t_idx, refs)])
    d_pred = np.stack([[zw[p] @ zw[c] for c in rs] for p, rs in zip(p_idx, refs)])
    images = [m["image_id"] for m in wrong]
    ref_images = [[pool[c] for c in rs] for rs in refs]
    tasks = [layer_task.options(num_cpus=cfg.task_cpus).remote(
        output.uri, ("extract", "activations", plan.model_key, layer.name), images, ref_images, d_true, d_pred,
        cfg.permutations, cfg.seed) for layer in plan.layers]
    results = ray.get(tasks)
    p_values = [permutation_p_value(res["null"], res["accuracy"]) if cfg.permutations else None for res in results]
    significant, adjusted = bhy([p for p in p_values if p is not None], cfg.alpha) if cfg.permutations else ([None] * len(results),) * 2
    rows = [{
        "model": plan.model, "layer": layer.name, "layer_index": layer.layer_index, "group": "misclassified",
        "accuracy": res["accuracy"], "n": len(images), "n_references": r, "n_perm": cfg.permutations,
        "null_mean": float(res["null"].mean()) if cfg.permutations else None,
        "null_std": float(res["null"].std()) if cfg.permutations else None,
        "p_value": p, "p_bhy": None if adj is None else float(adj), "significant": None if sig is None else bool(sig),
    } for layer, res, p, sig, adj in zip(plan.layers, results, p_values, significant, adjusted)]
    table = pa.Table.from_pylist(rows, schema=schema.ONE_VS_TWO)
    output.write_table(schema.stamp(table, cfg.experiment_id()), "one_vs_two.parquet")
    buf = io.BytesIO()
    one_vs_two_figure(rows, f"{plan.model}: {len(images)} misclassified images, R = {r}").savefig(buf, format="png", dpi=110)
    output.write_bytes(buf.getvalue(), "figures", "one_vs_two.png")
    output.write_json(summary, "summary.json")
    log(f"misclassified: mean severity (cosine of true and predicted words) {summary['mean_severity']:.3f}; "
        f"1 vs. 2 from {rows[0]['accuracy']:.2f} (first layer) to {rows[-1]['accuracy']:.2f} (last); tables in {posixpath.join(cfg.out, '')}")
    return summary
