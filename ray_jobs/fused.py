"""``--store similarity``: extraction fused with the Gram, for the 2 vs. 2 jobs (``run``, ``dynamics``) and
``misclassified``.

At paper scale the activation store is the bottleneck: ResNet-50 has about 9.6 M activation values per
image, 80 GB per CNN for 4,190 images in float16, written to disk and read back only to build 838 x 838
matrices. In this mode the model actor keeps one image set's z-scored rows of each layer on its device
(w x d per layer, in ``--dtype``), computes each layer's w x w Pearson r there with one torch code path
(:func:`semprobe.analysis.similarity.correlation_from_rows`, the Gram summed over feature chunks in
float64, as the Gram tasks do) and writes only the matrices and the predictions. Activations are never
written.

The unit of work is (image set, layer chunk). **Chunking rule** (:func:`semprobe.analysis.similarity.chunk_layers`):
the layers are grouped in catalog order into chunks whose resident rows, w x sum(d) x bytes of ``--dtype``,
fit ``--similarity-memory-mb`` (default: half the free memory of the actor's GPU, or a quarter of the
node's available RAM over the actors on CPUs); a layer bigger than the budget gets a chunk of its own.
Each chunk is one forward pass of the set (the forward is recomputed per chunk, and only the chunk's
layers are captured), so the set's images are decoded and run once per chunk.

Layout under an extraction's OUT (config.json, concepts, manifest, layers, errors.parquet and
summary.json as in activations mode)::

    similarity/<model>/<layer>/set-NNN.parquet       a layer's w x w matrix over the set's decoded images
                                                     (datasets.schema.similarity; NaN row and column for a
                                                     zero-variance image: the scheduler decides if it matters)
    predictions/<model>/set-NNN.parquet              the set's top-1 predictions
    units/<model>/set-NNN-layers-AAAA-BBBB.json      a unit's completion record (its layers, images and
                                                     decode errors), written after its matrices

A unit whose record exists is complete. A rerun reads the records and chunks only each set's layers that
no record names, so resuming works per (layer chunk, set) whatever the memory budget of the new run.
The matrices are over the set's decoded images; the scheduler takes the sub-matrix over the concepts
with an image in every set (a Pearson r of two rows does not depend on the other rows).

``semprobe misclassified --store similarity`` (:func:`run_fused_references`) reuses the machinery in two passes,
since which images are misclassified and which are the references is known only after the predictions: the
predictions of every image (``run_extract(..., predictions_only=True)``), then units of one layer chunk each over
only the misclassified images and their references (:class:`FuseReferences`), under the extraction's OUT::

    reference_correlations/<model>/<layer>.parquet   each image's Pearson r with each reference, float64
                                                     (datasets.schema.REFERENCE_CORRELATIONS)
    reference_units/<model>/layers-AAAA-BBBB.json    a unit's completion record, with the images it was asked for
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from semprobe.actors.extractor import memory_budget
from semprobe.actors.layers import Layer
from semprobe.analysis.errors import InputError
from semprobe.analysis.similarity import chunk_layers
from semprobe.datasets import schema
from semprobe.ray_jobs.config import ExtractConfig
from semprobe.ray_jobs.extraction import (
    ExtractionPlan,
    ExtractShards,
    PendingExtraction,
    begin,
    extraction_resources,
    finish,
    predictions_table,
    prepare_extract,
    stream,
    stream_all,
)
from semprobe.ray_jobs.lease import hold
from semprobe.ray_jobs.progress import Progress
from semprobe.ray_jobs.storage import Output
from semprobe.ray_jobs.store import references_file, similarity_file, similarity_table

UNITS = "units"
ITEMSIZE = {"float16": 2, "float32": 4}


@dataclass
class Unit:
    """One unit of work: an image set through the network, capturing a chunk of layers."""

    set_index: int
    layers: list[Layer]


def record_name(set_index: int, layers: list[Layer]) -> str:
    return f"set-{set_index:03d}-layers-{layers[0].layer_index:04d}-{layers[-1].layer_index:04d}.json"


def predictions_file(key: str, set_index: int) -> tuple[str, ...]:
    return "predictions", key, f"set-{set_index:03d}.parquet"


class FuseSets(ExtractShards):
    """Actor stage: run one (image set, layer chunk) unit and write its matrices, the set's predictions and the
    unit's record. ``units``: unit number -> (set index, the chunk's layer names) (a subclass's units are its own)."""

    def __init__(
        self,
        out: str,
        model: str,
        layers: str,
        dtype: str,
        batch_size: int,
        gpus: float,
        torch_threads: int | None,
        units: dict[int, Any],
        compute: str = "float32",
        gram_memory_mb: int = 256,
        tokens: str = "all",
    ):
        super().__init__(out, model, layers, dtype, batch_size, gpus, torch_threads, tokens=tokens)
        self.units, self.compute = units, compute
        self.block_values = gram_memory_mb * 2**20 // 4  # float32 values per Gram chunk, as the Gram tasks read
        self.by_name = {layer.name: layer for layer in self.extractor.layers}

    def _extract(self, unit: int, rows: list, errors: list, pixels: np.ndarray) -> None:
        m, (set_index, names) = self.extractor, self.units[unit]
        layers = [self.by_name[name] for name in names]
        if rows:
            matrices, index, prob = m.correlations(pixels, layers, self.batch_size, self.compute, self.block_values)
            concept_ids = [concept_id for _, concept_id, _ in rows]
            for layer in layers:
                table = similarity_table(
                    matrices[layer.name], concept_ids, "cnn", model=m.model_name, layer=layer.name,
                    layer_index=layer.layer_index, set_index=set_index,
                )  # fmt: skip
                self.output.write_table(table, *similarity_file(self.key, layer.name, set_index))
            # Every chunk of a set predicts the same: the first to finish writes them.
            if not self.output.exists(*predictions_file(self.key, set_index)):
                table = predictions_table(rows, m.model_name, index.tolist(), prob.tolist())
                self.output.write_table(table, *predictions_file(self.key, set_index))
        record = {
            "set_index": set_index,
            "layers": names,
            "n_images": len(rows),
            "image_ids": [image_id for image_id, _, _ in rows],
            "errors": errors,
        }
        self.output.write_json(record, UNITS, self.key, record_name(set_index, layers))


def pending_units(members: list[list[list[Any]]]) -> pa.Table:
    """The units of work as :func:`semprobe.ray_jobs.extraction.stream` takes them: unit k's images
    ``members[k]``, each [image_id, uri, concept_id, set_index]."""
    return pa.table(
        {
            "shard": pa.array(range(len(members)), pa.int32()),
            "images": [json.dumps(images) for images in members],
            "n": pa.array([len(images) for images in members], pa.int32()),
        }
    )


@ray.remote
def _probe_budget(share: float) -> int:
    return memory_budget("auto", share)


def resident_budget(memory_mb: int | None, resources: dict[str, Any]) -> int:
    """Bytes one chunk's resident rows may take: ``--similarity-memory-mb``, else measured on a model actor's
    device by a task with the actor's resources (a GPU's free memory, or the node's available RAM)."""
    if memory_mb is not None:
        return memory_mb * 2**20
    gpus = resources["gpus_per_actor"]
    share = min(1.0, gpus) if gpus else 1 / resources["actors"]
    probe = _probe_budget.options(num_cpus=0, num_gpus=gpus, resources=resources["actor_resources"])
    return ray.get(probe.remote(share))


def plan_units(plan: ExtractionPlan, done: dict[int, set[str]], budget: int) -> list[Unit]:
    """Each set's layers that no completion record names, chunked by :func:`chunk_layers` within ``budget``."""
    sets = plan.manifest["set_index"].to_pylist()
    units = []
    for k in sorted(set(sets)):
        todo = [layer for layer in plan.layers if layer.name not in done.get(k, set())]
        chunks = chunk_layers([layer.dim for layer in todo], sets.count(k), ITEMSIZE[plan.config.dtype], budget)
        units += [Unit(k, [todo[i] for i in chunk]) for chunk in chunks]
    return units


def prepare_fused(
    cfg: ExtractConfig,
    plan: ExtractionPlan,
    memory_mb: int | None = None,
    compute: str = "float32",
    gram_memory_mb: int = 256,
    log=print,
    budget: dict[str, int] | None = None,
) -> PendingExtraction:
    """An extraction in similarity mode, ready for its pipeline (:func:`stream_all`, which runs or resumes it and
    returns the summary it also writes to OUT/summary.json): its OUT opened, its plan written, the (set, layer)
    matrices still missing chunked into units; its ``finish`` gathers the records once they are computed.

    ``memory_mb``: the chunking budget (None: from the device); ``compute`` and ``gram_memory_mb``: the Gram
    product's precision and feature chunk, as ``--gram-compute`` and ``--gram-memory-mb`` set them for Gram tasks;
    ``budget``: a cache of the budget measured, shared by extractions on the same resources (one probe for all).
    """
    if cfg.sets is None:
        raise InputError("--store similarity needs image sets (--sets): its matrices are per image set")
    output, resources = begin(plan, log, store="similarity")
    key = plan.model_key
    done: dict[int, set[str]] = {}
    for name in output.list(UNITS, key, suffix=".json"):
        record = output.read_json(UNITS, key, name)
        done.setdefault(record["set_index"], set()).update(record["layers"])
    set_indices = set(plan.manifest["set_index"].to_pylist())
    n_sets = len(set_indices)
    missing = any(len(done.get(k, ())) < len(plan.layers) for k in set_indices)
    units = []
    if missing:
        budget = {} if budget is None else budget
        if "bytes" not in budget:
            budget["bytes"] = resident_budget(memory_mb, resources)
        units = plan_units(plan, done, budget["bytes"])
    if done:
        log(f"resuming: {sum(len(v) for v in done.values())} of {n_sets * len(plan.layers)} (set, layer) matrices "
            f"already complete, {len(units)} unit(s) to go")  # fmt: skip
    elif units:
        log(f"similarity store: {len(units)} unit(s) of (image set, layer chunk), "
            f"{len(units) // n_sets or 1} chunk(s) of layers per set")  # fmt: skip
    m = plan.manifest
    rows = {c: m[c].to_pylist() for c in ("image_id", "uri", "concept_id", "set_index")}
    members = [
        [[rows[c][r] for c in rows] for r in range(m.num_rows) if rows["set_index"][r] == unit.set_index]
        for unit in units
    ]
    progress = Progress(sum(len(images) for images in members), "images", f"extract {plan.model} (similarity)")
    actor_kwargs = {
        "units": {i: (u.set_index, [layer.name for layer in u.layers]) for i, u in enumerate(units)},
        "compute": compute,
        "gram_memory_mb": gram_memory_mb,
    }

    def finished(completions: list[tuple[float, int]], elapsed: float) -> dict[str, Any]:
        per_set = {}
        for name in output.list(UNITS, key, suffix=".json"):
            record = output.read_json(UNITS, key, name)
            per_set.setdefault(record["set_index"], record)  # every unit of a set saw the same images and errors
        summary = finish(output, plan, computed=len(units), elapsed=elapsed, records=list(per_set.values()))
        summary.update(store="similarity", units_computed=len(units))
        log(
            f"extracted {summary['n_images']} images x {summary['n_layers']} layers of {plan.model} into w x w "
            f"matrices in {cfg.out} ({summary['n_errors']} skipped, {len(units)} (set, layer chunk) unit(s) computed"
            + (f", top-1 {summary['top1_correct']}/{summary['n_labelled']}" if summary["n_labelled"] else "")
            + ")"
        )
        return summary

    return PendingExtraction(plan, resources, pending_units(members), FuseSets, actor_kwargs, progress, finished)


def run_extractions(
    extractions: list[tuple[ExtractConfig, ExtractionPlan, Any]],
    store: str,
    job,
    finished: Callable[[int, dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Several extractions of a 2 vs. 2 job (``job``: its RunConfig or DynamicsConfig), each (config, plan, log),
    in the resolved ``store`` mode, through one pipeline (:func:`stream_all`: one actor pool for all). Each
    extraction's OUT is leased for the whole pipeline; ``finished(index, summary)`` runs as each one completes,
    so that its tests can start while the others go on. Returns the summaries in order."""
    budget: dict[str, int] = {}
    with contextlib.ExitStack() as leases:
        jobs = []
        for cfg, plan, log in extractions:
            leases.enter_context(hold(cfg.out))
            if store == "similarity":
                memory, compute, gram = job.similarity_memory_mb, job.gram_compute, job.gram_memory_mb
                jobs.append(prepare_fused(cfg, plan, memory, compute, gram, log=log, budget=budget))
            else:
                jobs.append(prepare_extract(cfg, plan, log=log))
        return stream_all(jobs, finished)


# --- misclassified --store similarity: each misclassified image against its reference images ------------------

REFERENCE_UNITS = "reference_units"


def references_record(layers: list[Layer]) -> str:
    return f"layers-{layers[0].layer_index:04d}-{layers[-1].layer_index:04d}.json"


class FuseReferences(FuseSets):
    """Actor stage of the second pass of ``semprobe misclassified --store similarity``: one layer chunk's unit, its
    images the references first; writes each layer's correlations of every other image with every reference
    (:meth:`semprobe.actors.extractor.ActivationExtractor.reference_correlations`), then the unit's record.
    ``units``: unit number -> the chunk's layer names; ``references``: the reference images' ids;
    ``requested``: every image id the units were asked for, kept in the record (a rerun asking for other images
    recomputes); ``experiment_id``: the extraction's, stamped on the tables."""

    def __init__(self, *args, references: list[str], requested: list[str], experiment_id: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.references, self.requested, self.experiment_id = set(references), requested, experiment_id

    def _extract(self, unit: int, rows: list, errors: list, pixels: np.ndarray) -> None:
        m, names = self.extractor, self.units[unit]
        layers = [self.by_name[name] for name in names]
        n_refs = sum(image_id in self.references for image_id, _, _ in rows)  # they come first
        reference_ids, image_ids = [r[0] for r in rows[:n_refs]], [r[0] for r in rows[n_refs:]]
        blocks = m.reference_correlations(pixels, n_refs, layers, self.batch_size)
        pairs = len(image_ids) * n_refs
        for layer in layers:
            table = pa.table(
                [
                    pa.repeat(m.model_name, pairs),
                    pa.repeat(layer.name, pairs),
                    pa.repeat(pa.scalar(layer.layer_index, pa.int32()), pairs),
                    pa.array(np.repeat(image_ids, n_refs).tolist(), pa.string()),
                    pa.array(reference_ids * len(image_ids), pa.string()),
                    pa.array(blocks[layer.name].reshape(-1), pa.float64()),
                ],
                schema=schema.REFERENCE_CORRELATIONS,
            )
            self.output.write_table(schema.stamp(table, self.experiment_id), *references_file(self.key, layer.name))
        record = {"layers": names, "requested": self.requested, "n_images": len(rows), "errors": errors}
        self.output.write_json(record, REFERENCE_UNITS, self.key, references_record(layers))


def run_fused_references(
    cfg: ExtractConfig,
    plan: ExtractionPlan,
    images: list[str],
    references: list[str],
    memory_mb: int | None = None,
    log=print,
) -> int:
    """Run (or resume) the second pass of ``semprobe misclassified --store similarity``: every layer's Pearson r
    of each of ``images`` with each of ``references`` (image ids of the extraction's manifest), into
    ``reference_correlations/<model>/<layer>.parquet`` under the extraction's OUT. Returns the units computed.

    The unit of work is a chunk of layers (:func:`chunk_layers`: the references' resident rows plus one batch,
    (R + batch) x sum(d) x bytes of ``--dtype``, within ``memory_mb``, default from the device); each unit is one
    forward pass of the references and then of the images, batch by batch. A unit whose record names the same
    images is complete: a rerun computes only the layers no such record names.
    """
    output, key = Output(cfg.out), plan.model_key
    requested = sorted({*images, *references})
    done: set[str] = set()
    for name in output.list(REFERENCE_UNITS, key, suffix=".json"):
        record = output.read_json(REFERENCE_UNITS, key, name)
        if record["requested"] == requested:
            done.update(record["layers"])
    todo = [layer for layer in plan.layers if layer.name not in done]
    units: list[list[Layer]] = []
    resources = extraction_resources(cfg)
    if todo:
        budget = resident_budget(memory_mb, resources)
        w = len(set(references)) + cfg.batch_size
        units = [
            [todo[i] for i in c] for c in chunk_layers([layer.dim for layer in todo], w, ITEMSIZE[cfg.dtype], budget)
        ]
    log(
        f"similarity store: {len(units)} unit(s) of layers to correlate {len(images)} image(s) with "
        f"{len(set(references))} reference image(s)"
        + (f" ({len(done)} of {len(plan.layers)} layers already complete)" if done else "")
    )
    m = plan.manifest
    row = {image_id: k for k, image_id in enumerate(m["image_id"].to_pylist())}
    columns = [m[c].to_pylist() for c in ("image_id", "uri", "concept_id", "set_index")]
    ordered = list(dict.fromkeys(references)) + list(dict.fromkeys(images))  # the references first
    members = [[col[row[image_id]] for col in columns] for image_id in ordered]
    progress = Progress(len(members) * len(units), "images", f"correlate {plan.model} (similarity)")
    actor_kwargs = {
        "units": {i: [layer.name for layer in unit] for i, unit in enumerate(units)},
        "references": sorted(set(references)),
        "requested": requested,
        "experiment_id": cfg.experiment_id(),
    }
    stream(pending_units([members] * len(units)), plan, resources, FuseReferences, actor_kwargs, progress)
    return len(units)
