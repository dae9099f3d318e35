"""What ``semprobe misclassified`` and ``semprobe adversarial`` share: their start, and 1 vs. 2 through the layers.

Both jobs start alike (:func:`prepare`, giving a :class:`FailureContext`): check the inputs, extract the clean
images with their predictions (``extract/`` under OUT), match the ImageNet classes to words, and pool the
reference concepts: every class with a correctly classified image, represented by the first such image by id,
in the seed's shuffled order. Image x with true (source) class t and predicted (target) class p is then judged
against the first R pooled concepts that are neither t nor p.

Both end alike (:func:`one_vs_two_through_layers`): the 1 vs. 2 test (:mod:`semprobe.analysis.onevtwo`) of
every layer as one Ray task, per named group of images, each group with its own permutation null (``--null``:
word-correlation rows shuffled among the group's images, the authors' null, or reference columns permuted),
BHY over every (group, layer) row as one family (:mod:`semprobe.analysis.stats`): one CNN against one word
model, so the one figure of the job; the job writes the rows as
``datasets.schema.ONE_VS_TWO`` tables (:func:`write_one_vs_two`).

With ``--store similarity`` (``misclassified`` only; :mod:`semprobe.ray_jobs.fused`) the clean extraction keeps
the predictions alone, and before the 1 vs. 2 tasks a second pass of the model actors writes each layer's
correlations of the images with their references, which the tasks read instead of the activations.

This module is machinery, not a job: it imports no job module, and job modules import it.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from semprobe.analysis.errors import InputError, ZeroVarianceError
from semprobe.analysis.onevtwo import (
    Correlations,
    bounded_reference_correlations,
    one_vs_two,
    one_vs_two_null,
    reference_correlations,
)
from semprobe.analysis.similarity import PAIRED_SIMILARITY
from semprobe.analysis.stats import permutation_tests
from semprobe.datasets import schema
from semprobe.datasets.classes import imagenet_classes
from semprobe.datasets.concepts import ConceptMatch, match_concepts
from semprobe.datasets.words import load_word_model
from semprobe.ray_jobs.extraction import ExtractionPlan, plan_extraction, run_extract
from semprobe.ray_jobs.fused import run_fused_references
from semprobe.ray_jobs.startup import (
    analysis_options,
    check_same_experiment,
    connect,
    store_mode,
    task_device,
    write_resolved,
)
from semprobe.ray_jobs.storage import Output
from semprobe.ray_jobs.store import layer_views, references_file

MIN_REFERENCES = 5


@dataclass(frozen=True)
class GroupOneVsTwo:
    """One layer's 1 vs. 2 test of one group of images."""

    accuracy: float  # the fraction of the group's images that side with t
    n: int  # images in the group
    null: np.ndarray  # (n_perm,) float64: the accuracy under each permutation of the reference words
    rechecked: int = 0  # decisions the fp32 evaluation left to float64 (observed and null)
    decisions: int = 0  # decisions made (observed and null): n (1 + n_perm)


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
    null: str = "rows",
    precision: str = "fp64",
    stored: tuple[str, ...] | None = None,
) -> dict[str, GroupOneVsTwo]:
    """1 vs. 2 of one layer: the images' activations against their references', and the null, per group of images.

    ``folders`` hold the layer's activation files (the images and the references may come from different
    extractions; an image in two folders is taken from the last); ``references[k]`` are image k's R reference
    images; ``d_true``, ``d_pred`` (n, R) its word side; ``groups`` name subsets of the images, by position;
    ``null`` is :func:`semprobe.analysis.onevtwo.one_vs_two_null`'s (rows are shuffled within each group).
    Everything runs on the task's device (its GPU when Ray gave it one) in ``precision``: in fp32 the decisions the
    bound cannot settle are recomputed in float64, activations' correlations included, so they equal fp64's.
    ``stored`` (``--store similarity``): the layer's image-reference correlations file under ``out``, read instead
    of the activations; its float64 values are taken as exact (the model actor computed them in float64), and
    fp32's recheck applies to the margins.
    """
    device = task_device()
    if stored is not None:
        i_x = stored_reference_correlations(Output(out), stored, images, references)
    else:
        i_x = activation_reference_correlations(Output(out), folders, images, references, device, precision)
    results = {}
    for group, members in groups.items():
        args = (i_x.take(members), d_true[members], d_pred[members])
        tested = one_vs_two(*args, device=device, precision=precision)
        drawn = one_vs_two_null(*args, n_perm, seed, null=null, device=device, precision=precision)
        results[group] = GroupOneVsTwo(
            tested.accuracy,
            len(members),
            drawn.accuracy,
            tested.rechecked + drawn.rechecked,
            len(members) * (1 + n_perm),
        )
    return results


def activation_reference_correlations(
    output: Output,
    folders: list[tuple[str, ...]],
    images: list[str],
    references: list[list[str]],
    device: str,
    precision: str,
) -> Correlations:
    """i_x of :func:`layer_task` from the activation store: each image's Pearson r with each of its references."""
    needed = set(images) | {r for refs in references for r in refs}
    position: dict[str, int] = {}
    parts = []
    with tempfile.TemporaryDirectory(prefix="semprobe-1v2-") as scratch:
        for folder in folders:
            where, views = layer_views(output, folder, scratch)
            ids = sorted(needed & where.keys())
            if ids:
                start = sum(len(part) for part in parts)
                position.update((image_id, start + k) for k, image_id in enumerate(ids))
                parts.append(np.stack([views[where[i][0]][where[i][1]] for i in ids]))  # a copy: the maps go
            del views, where  # release the memory maps before the scratch folder goes
    activations = parts[0] if len(parts) == 1 else np.concatenate(parts)
    del parts
    try:
        return bounded_reference_correlations(
            activations,
            [position[x] for x in images],
            [[position[r] for r in refs] for refs in references],
            "the activations",
            device,
            precision,
        )
    except ZeroVarianceError as err:  # the store writes a constant activation as zeros: name the images
        image_at = {k: image_id for image_id, k in position.items()}
        raise _constant([image_at.get(k, f"row {k}") for k in err.rows], folders[0]) from None


def stored_reference_correlations(
    output: Output, source: tuple[str, ...], images: list[str], references: list[list[str]]
) -> Correlations:
    """i_x of :func:`layer_task` from a ``--store similarity`` file (``datasets.schema.REFERENCE_CORRELATIONS``
    under ``output``): its float64 values, taken as exact."""
    table = output.read_table(*source)
    ids, refs, values = (table[c].to_pylist() for c in ("image_id", "reference_id", "correlation"))
    r = {(x, ref): value for x, ref, value in zip(ids, refs, values)}
    missing = [(x, ref) for x, wanted in zip(images, references) for ref in wanted if (x, ref) not in r]
    if missing:
        raise InputError(
            f"{'/'.join(source)} has no correlation of image {missing[0][0]} with reference {missing[0][1]}: rerun "
            "with --store similarity into a new --out"
        )
    i_x = np.array([[r[x, ref] for ref in wanted] for x, wanted in zip(images, references)], np.float64)
    if np.isnan(i_x).any():  # NaN fills the row of an image, or the column of a reference, whose output is constant
        finite = [not np.isnan(v) for v in values]
        constant = {x for x, ok in zip(ids, finite) if not ok} - {x for x, ok in zip(ids, finite) if ok}
        constant |= {x for x, ok in zip(refs, finite) if not ok} - {x for x, ok in zip(refs, finite) if ok}
        raise _constant(sorted(constant), source)
    return Correlations.of(i_x.reshape(len(images), -1))


def _constant(images: list[str], where: tuple[str, ...]) -> InputError:
    return InputError(
        f"constant activation of image(s) {', '.join(images[:5])} in {'/'.join(where[-2:])}: "
        "its correlation with the references is undefined"
    )


@dataclass
class FailureContext:
    """What both failure analyses start from: the clean extraction, its predictions, the words, the references."""

    plan: ExtractionPlan
    word_model: Any
    concepts: ConceptMatch  # the 1000 ImageNet classes matched: one class per word, the rest dropped with why
    words: dict[int, str]  # ImageNet class index -> word, for every class kept
    manifest: list[dict[str, Any]]
    predictions: dict[str, int]  # image_id -> predicted class index
    pool: dict[int, str]  # concept (class index) -> its reference image: the first correctly classified by id
    order: list[int]  # the concepts of ``pool`` in the seed's shuffled order
    store: str = "activations"  # --store resolved: similarity computes i_x in a second pass, no activation stored

    @property
    def correct(self) -> list[dict[str, Any]]:
        return [m for m in self.manifest if self.predictions.get(m["image_id"]) == m["class_index"]]

    def unnamed(self, class_index: int) -> str:
        """Why an ImageNet class has no word here (it shares one with a lower class, or has none)."""
        cid = imagenet_classes()[class_index].concept_id
        return self.concepts.reason(cid) or f"no word in {self.word_model.name}"

    def shared_words(self) -> tuple[str, list[str], list[list[str]]]:
        """The report's note on the classes dropped for sharing their word with a lower class: (title, header,
        rows)."""
        rows = [[cid, self.concepts.reason(cid)] for cid in sorted(self.concepts.shared)]
        return (f"classes dropped for sharing a word ({len(rows)})", ["class", "why"], rows)

    def references(self, t: int, p: int, r: int) -> list[int]:
        """The first ``r`` reference concepts that are neither t nor p."""
        return [c for c in self.order if c not in (t, p)][:r]

    def vectors(self, classes: list[int]) -> np.ndarray:
        """(len(classes), d) float64: the word vectors of the classes."""
        return self.word_model.vectors([self.words[c] for c in classes]).astype(np.float64)

    def cosine(self, a: list[int], b: list[int]) -> np.ndarray:
        """(n,) the cosine of the word vectors of classes a[k] and b[k]."""
        return self.similarity(a, b, "cosine")

    def similarity(self, a: list[int], b: list[int], kind: str) -> np.ndarray:
        """(n,) the similarity ``kind`` (``analysis.similarity.PAIRED_SIMILARITY``: pearson, cosine) of the word
        vectors of classes a[k] and b[k]."""
        if not a:
            return np.zeros(0)
        return PAIRED_SIMILARITY[kind](self.vectors(a), self.vectors(b))

    def word_side(
        self, true: list[int], predicted: list[int], references: list[list[int]]
    ) -> tuple[np.ndarray, np.ndarray]:
        """(n, R) d_t and d_p: the words of t and p correlated with the words of each image's references."""
        classes = sorted(set(true) | set(predicted) | {c for refs in references for c in refs})
        row = {c: k for k, c in enumerate(classes)}
        vectors = self.vectors(classes)
        reference_rows = [[row[c] for c in refs] for refs in references]
        d_true = reference_correlations(vectors, [row[t] for t in true], reference_rows, "the word vectors")
        d_pred = reference_correlations(vectors, [row[p] for p in predicted], reference_rows, "the word vectors")
        return d_true, d_pred


def prepare(cfg, output: Output, log) -> FailureContext:
    """Check the inputs, write the resolved config (with the ``--store`` mode), run (or resume) the clean extraction
    (with ``--store similarity`` its predictions alone), gather predictions and words."""
    check_same_experiment(output, cfg)
    extraction = cfg.extract_config(cfg.model, cfg.extract_out, [cfg.words], sets=cfg.sets)
    plan = plan_extraction(extraction)
    if plan.source.class_space != "imagenet":
        raise InputError(
            f"{cfg.images}: {cfg.COMMAND} needs ImageNet-labelled images (a folder of wnids, or sample:imagenet)"
        )
    word_model = load_word_model(cfg.words, cache=cfg.word_cache_dir())
    connect(log)
    # only misclassified offers --store: adversarial's images come from two extractions (clean and attacked)
    store = store_mode(cfg.store, cfg.gpus_per_actor, log) if hasattr(cfg, "store") else "activations"
    write_resolved(output, cfg, weights={cfg.model: plan.weights}, store=store)
    # similarity: the predictions alone first; which activations matter is known only once they are
    run_extract(extraction, log=log, plan=plan, predictions_only=store == "similarity")
    extracted = Output(extraction.out)
    manifest = extracted.read_table("manifest.parquet").to_pylist()
    predictions = {
        r["image_id"]: r["predicted_index"]
        for r in pq.read_table(extracted.path("predictions", plan.model_key), filesystem=extracted.fs).to_pylist()
    }
    # The same rule as the extraction's, over the same class space: a class is kept there iff it is here.
    concepts = match_concepts(imagenet_classes(), "imagenet", [word_model], cfg.concept_words)
    words = {r["class_index"]: r["word"] for r in concepts.table.to_pylist()}
    pool: dict[int, str] = {}
    for m in sorted(manifest, key=lambda m: m["image_id"]):
        if predictions.get(m["image_id"]) == m["class_index"]:
            pool.setdefault(m["class_index"], m["image_id"])
    order = [int(k) for k in np.random.default_rng(cfg.seed).permutation(sorted(pool))]
    return FailureContext(plan, word_model, concepts, words, manifest, predictions, pool, order, store)


def check_references(r: int) -> None:
    if r < MIN_REFERENCES:
        raise InputError(
            f"only {max(r, 0)} reference concepts with a correctly classified image besides t and p: "
            f"the 1 vs. 2 test needs at least {MIN_REFERENCES} (use more images)"
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
    log=None,
) -> list[dict[str, Any]]:
    """Every layer's 1 vs. 2 per group as Ray tasks (``analysis_options``: a share of a GPU when the cluster has
    GPUs), in ``--precision``, p-values, BHY over every (group, layer) row; ``log`` gets the fp32 recheck count.

    Returns the rows of ``datasets.schema.ONE_VS_TWO``, group by group, each group's layers in order.
    """
    refs = [ctx.references(t, p, r) for t, p in zip(t_idx, p_idx)]
    d_true, d_pred = ctx.word_side(t_idx, p_idx, refs)
    ref_images = [[ctx.pool[c] for c in rs] for rs in refs]
    key = ctx.plan.model_key
    stored = {}
    if ctx.store == "similarity":  # the second pass: each image's correlations with its references, per layer
        needed = sorted({image for refs in ref_images for image in refs})
        plan = ctx.plan
        run_fused_references(plan.config, plan, images, needed, cfg.similarity_memory_mb, log or (lambda _: None))
        stored = {layer.name: ("extract", *references_file(key, layer.name)) for layer in plan.layers}
    options = analysis_options(cfg, log)
    results = ray.get(
        [
            layer_task.options(**options).remote(
                output.uri,
                list(dict.fromkeys([folder + (key, layer.name), ("extract", "activations", key, layer.name)])),
                images,
                ref_images,
                d_true,
                d_pred,
                groups,
                cfg.permutations,
                cfg.seed,
                cfg.null,
                cfg.precision,
                stored.get(layer.name),
            )
            for layer in ctx.plan.layers
        ]
    )
    if log and cfg.precision != "fp64":
        rechecked = sum(test.rechecked for result in results for test in result.values())
        decisions = sum(test.decisions for result in results for test in result.values())
        log(
            f"1 vs. 2 in {cfg.precision}: {rechecked} of {decisions} decisions ({rechecked / max(decisions, 1):.2%}) "
            "lay within the error bound of the threshold and were recomputed in fp64"
        )
    tested = [(group, layer, result[group]) for group in groups for layer, result in zip(ctx.plan.layers, results)]
    rows = [
        {
            "model": ctx.plan.model,
            "layer": layer.name,
            "layer_index": layer.layer_index,
            "group": group,
            "accuracy": test.accuracy,
            "n": test.n,
            "n_references": r,
            "n_perm": cfg.permutations,
        }
        for group, layer, test in tested
    ]
    if cfg.permutations:
        tests = permutation_tests([test.accuracy for *_, test in tested], [test.null for *_, test in tested], cfg.alpha)
        for k, row in enumerate(rows):
            row["null_mean"], row["null_std"] = float(tests.null_mean[k]), float(tests.null_std[k])
            row["p_value"], row["p_bhy"] = float(tests.p_value[k]), float(tests.p_bhy[k])
            row["significant"] = bool(tests.significant[k])
    else:
        for row in rows:
            row.update(null_mean=None, null_std=None, p_value=None, p_bhy=None, significant=None)
    return rows


def write_one_vs_two(output: Output, cfg, rows: list[dict[str, Any]], name: str) -> None:
    """OUT/``name``: ``rows`` of :func:`one_vs_two_through_layers` as a ``datasets.schema.ONE_VS_TWO`` table."""
    table = pa.Table.from_pylist(rows, schema=schema.ONE_VS_TWO)
    output.write_table(schema.stamp(table, cfg.experiment_id()), name)
