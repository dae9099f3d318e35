"""``semprobe extract``: images -> one CNN -> every chosen layer, z-scored, into Parquet.

Ray Data pipeline over shards of the manifest (the unit of work, retry, resume
and output file): CPU ``map_batches`` decode -> ``map_batches(ExtractShards,
compute=ActorPoolStrategy)`` on the model's devices. Each actor streams the
shard's layers straight into their files, so the activations (megabytes per
image) never travel through the object store. Several extractions (``semprobe dynamics``' checkpoints x splits)
can share one pipeline and actor pool (:func:`stream_all`), each with its own OUT as below.

Layout under OUT::

    config.json                          the resolved config of the last run
    concepts.parquet                     concept matching (with --words)
    manifest.parquet                     every image taken, with set_index and shard
    layers.parquet                       the chosen layers: name, layer_index, kind, shape
    activations/<model>/<layer>/shard-NNNNN.arrow   (Arrow IPC; .parquet with --store-format parquet)
    predictions/<model>/shard-NNNNN.parquet
    shards/<model>/shard-NNNNN.json      a shard's completion record, written last
    predicted/<model>/shard-NNNNN.json   instead, with ``predictions_only`` (``misclassified --store similarity``'s
                                         first pass): the shard's predictions alone are written, no activation
    errors.parquet                       images skipped, with stage and message
    summary.json

A shard whose record exists is complete; a rerun skips it and recomputes the
rest, so an interrupted job resumes and ends with the same bytes.
"""

from __future__ import annotations

import gc
import json
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from semprobe.actors.extractor import ActivationExtractor
from semprobe.actors.layers import Layer, LayerCatalog
from semprobe.actors.zoo import Preprocess, load_model
from semprobe.analysis.architecture import OpGraph
from semprobe.analysis.errors import InputError
from semprobe.datasets import schema
from semprobe.datasets.concepts import ConceptMatch, match_concepts
from semprobe.datasets.image_sets import draw_image_sets
from semprobe.datasets.images import ImageSource, resolve_images
from semprobe.datasets.words import load_word_model
from semprobe.ray_jobs.config import ExtractConfig
from semprobe.ray_jobs.decode_stage import decode_shard, decode_units
from semprobe.ray_jobs.lease import holding_lease
from semprobe.ray_jobs.progress import Progress
from semprobe.ray_jobs.startup import connect, model_actors, open_output, write_resolved
from semprobe.ray_jobs.storage import Output, model_key
from semprobe.ray_jobs.store import ShardWriter, shard_file

PREDICTED = "predicted"  # the completion records of a predictions-only pass (PredictShards)


@dataclass
class ExtractionPlan:
    """Everything resolved from the config before any output is written."""

    config: ExtractConfig
    source: ImageSource
    concepts: ConceptMatch | None
    dropped_for_sets: dict[str, int]
    manifest: pa.Table  # schema.MANIFEST, sorted by image_id
    model: str
    preprocess: Preprocess
    layers: list[Layer]
    weights: str  # the weights loaded (LoadedModel.weights), for config.json and the report
    graph: OpGraph | None = None  # the traced operations, for the architecture diagram

    @property
    def model_key(self) -> str:
        return model_key(self.model)

    def shards(self) -> pa.Table:
        """One row per shard: shard, image_ids, uris, and the per-image rows as JSON."""
        m = self.manifest
        groups: dict[int, list[int]] = {}
        for row, shard in enumerate(m["shard"].to_pylist()):
            groups.setdefault(shard, []).append(row)
        cols = {c: m[c].to_pylist() for c in ("image_id", "uri", "concept_id", "set_index")}
        return pa.table(
            {
                "shard": pa.array(list(groups), pa.int32()),
                "images": [json.dumps([[cols[c][r] for c in cols] for r in rows]) for rows in groups.values()],
                "n": pa.array([len(rows) for rows in groups.values()], pa.int32()),
            }
        )


def plan_extraction(cfg: ExtractConfig) -> ExtractionPlan:
    """Resolve images, words, concepts, sets, model and layers; raise InputError on bad input."""
    source = resolve_images(cfg.images)
    images, concepts = source.images, None
    if cfg.words:
        models = [load_word_model(w, cache=cfg.word_cache_dir()) for w in cfg.words]
        concepts = match_concepts(source.classes, source.class_space, models, cfg.concept_words)
        images = images.filter(pc.is_in(images["concept_id"], pa.array(concepts.concept_ids, pa.string())))
    dropped: dict[str, int] = {}
    if cfg.sets:
        drawn = draw_image_sets(images, cfg.sets, cfg.seed)
        images, dropped = drawn.images, drawn.dropped
    else:
        images = images.append_column("set_index", pa.nulls(images.num_rows, pa.int32()))
    if images.num_rows == 0:
        raise InputError(f"no images left to extract from {cfg.images} after concept matching and set drawing")
    shard = pa.array(np.arange(images.num_rows) // cfg.shard_size, pa.int32())
    manifest = images.append_column("shard", shard).select(schema.MANIFEST.names).cast(schema.MANIFEST)
    loaded = load_model(cfg.model)
    catalog = LayerCatalog(loaded.module, loaded.preprocess.size)
    layers = catalog.select(cfg.layers, cfg.tokens)
    graph = catalog.graph()
    return ExtractionPlan(
        cfg, source, concepts, dropped, manifest, loaded.name, loaded.preprocess, layers, loaded.weights, graph
    )


# --- the two Ray stages -------------------------------------------------------------------------


class ExtractShards:
    """Actor stage: run the extractor over a shard in model batches and store the results."""

    def __init__(
        self,
        out: str,
        model: str,
        layers: str,
        dtype: str,
        batch_size: int,
        gpus: float,
        torch_threads: int | None,
        store_format: str = "arrow",
        compression: str = "none",
        tokens: str = "all",
    ):
        if torch_threads is None and not gpus:
            # Ray pins OMP_NUM_THREADS to the actor's CPU request; a CPU-only forward pass wants the node.
            torch_threads = len(os.sched_getaffinity(0))
        self.extractor = ActivationExtractor(model, layers, dtype=dtype, threads=torch_threads, tokens=tokens)
        self.output = Output(out)
        self.key = model_key(self.extractor.model_name)
        self.dtype, self.format, self.compression, self.batch_size = dtype, store_format, compression, batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        done = {"shard": [], "n_images": [], "n_errors": []}
        for shard, images, errors, pixels in zip(batch["shard"], batch["images"], batch["errors"], batch["pixels"]):
            rows, errors = json.loads(str(images)), json.loads(str(errors))
            self._extract(int(shard), rows, errors, pixels[: len(rows)])
            done["shard"].append(int(shard))
            done["n_images"].append(len(rows))
            done["n_errors"].append(len(errors))
        return {k: np.array(v, np.int64) for k, v in done.items()}

    def _extract(self, shard: int, rows: list, errors: list, pixels: np.ndarray) -> None:
        m = self.extractor
        predictions = []
        if rows:
            writer = ShardWriter(self.output, m.model_name, m.layers, self.dtype, self.format, self.compression, shard)
            try:
                for start in range(0, len(rows), self.batch_size):
                    part = rows[start : start + self.batch_size]
                    out = m({"pixels": pixels[start : start + self.batch_size]})
                    writer.write(part, out)
                    predictions.extend(zip(out["predicted_index"].tolist(), out["predicted_prob"].tolist()))
                writer.commit()
            except BaseException:
                writer.abort()  # no partial file stays behind, e.g. when the disk is full
                raise
            table = predictions_table(rows, m.model_name, [p for p, _ in predictions], [q for _, q in predictions])
            self.output.write_table(table, "predictions", self.key, shard_file(shard))
        record = {"shard": shard, "n_images": len(rows), "errors": errors, "layers": [layer.name for layer in m.layers]}
        self.output.write_json(record, "shards", self.key, shard_file(shard, ".json"))


class PredictShards(ExtractShards):
    """Actor stage of a predictions-only pass (``semprobe misclassified --store similarity``'s first): a shard's
    top-1 predictions, capturing no layer; its completion record goes to ``predicted/``, so that a later
    activations run of the same OUT still extracts the shard's layers."""

    def _extract(self, shard: int, rows: list, errors: list, pixels: np.ndarray) -> None:
        m = self.extractor
        if rows:
            index, prob = m.predict(pixels, self.batch_size)
            table = predictions_table(rows, m.model_name, index.tolist(), prob.tolist())
            self.output.write_table(table, "predictions", self.key, shard_file(shard))
        record = {"shard": shard, "n_images": len(rows), "errors": errors, "layers": []}
        self.output.write_json(record, PREDICTED, self.key, shard_file(shard, ".json"))


def predictions_table(rows: list, model: str, index, prob) -> pa.Table:
    """schema.PREDICTIONS of the images ``rows`` ([image_id, concept_id, set_index] each): the model's top-1 class
    index and probability of each."""
    ids, concepts, sets = (list(col) for col in zip(*rows))
    return pa.table(
        [ids, concepts, sets, [model] * len(rows), pa.array(index, pa.int32()), pa.array(prob, pa.float32())],
        schema=schema.PREDICTIONS,
    )


# --- the driver ------------------------------------------------------------------------------------


def extraction_resources(cfg: ExtractConfig) -> dict[str, Any]:
    actors, gpus = model_actors(cfg.actors, cfg.gpus_per_actor)
    return {
        "actors": actors,
        "gpus_per_actor": gpus,
        "cpus_per_actor": cfg.cpus_per_actor,
        "torch_threads": cfg.torch_threads,
        "decode_cpus": cfg.decode_cpus,
        "actor_resources": cfg.actor_resources,
    }


def write_plan(output: Output, plan: ExtractionPlan, resources: dict[str, Any], **extra: Any) -> None:
    cfg, exp = plan.config, plan.config.experiment_id()
    write_resolved(
        output,
        cfg,
        **extra,
        model=plan.model,
        model_key=plan.model_key,
        weights=plan.weights,
        preprocess=vars(plan.preprocess),
        resources=resources,
        layers=[layer.name for layer in plan.layers],
        class_space=plan.source.class_space,
    )
    if plan.concepts is not None:
        output.write_table(schema.stamp(plan.concepts.table, exp), "concepts.parquet")
    output.write_table(schema.stamp(plan.manifest, exp), "manifest.parquet")
    layers = pa.Table.from_pylist(
        [
            {"model": plan.model, "layer": layer.name, "layer_index": layer.layer_index, "kind": layer.kind,
             "shape": list(layer.shape), "dim": layer.dim}
            for layer in plan.layers
        ],
        schema=schema.LAYERS,
    )  # fmt: skip
    output.write_table(schema.stamp(layers, exp), "layers.parquet")


@holding_lease
def run_extract(
    cfg: ExtractConfig, log=print, plan: ExtractionPlan | None = None, predictions_only: bool = False
) -> dict[str, Any]:
    """Run (or resume) an extraction; returns the summary it also writes to OUT/summary.json.

    ``predictions_only``: only the top-1 predictions of every image (:class:`PredictShards`), no activation; a
    shard that a full extraction already completed counts as done.
    """
    (summary,) = stream_all([prepare_extract(cfg, plan or plan_extraction(cfg), log, predictions_only)])
    return summary


def prepare_extract(
    cfg: ExtractConfig, plan: ExtractionPlan, log=print, predictions_only: bool = False
) -> PendingExtraction:
    """What :func:`run_extract` does before its pipeline (open OUT, write the plan, find the shards still to
    compute), and, as the extraction's ``finish``, what it does once they are all computed."""
    output, resources = begin(plan, log, **({"store": "similarity"} if predictions_only else {}))
    shards = plan.shards()
    folders = ("shards", PREDICTED) if predictions_only else ("shards",)
    done = set(_completed(output, plan.model_key, folders))
    pending = shards.filter(pc.invert(pc.is_in(shards["shard"], pa.array(sorted(done), pa.int32()))))
    total = plan.manifest.num_rows
    progress = Progress(total, "images", f"{'predict' if predictions_only else 'extract'} {plan.model}")
    progress.done = total - sum(pending["n"].to_pylist())
    if done:
        log(f"resuming: {len(done)} of {shards.num_rows} shards already complete, {pending.num_rows} to go")
    actor_kwargs = {"store_format": cfg.store_format, "compression": cfg.compression}

    def finished(completions: list[tuple[float, int]], elapsed: float) -> dict[str, Any]:
        records = None  # finish's default: the full extraction's
        if predictions_only:
            records = [output.read_json(*where) for where in _completed(output, plan.model_key, folders).values()]
        summary = finish(output, plan, computed=pending.num_rows, elapsed=elapsed, records=records)
        if predictions_only:
            summary["store"] = "similarity"
        if len(completions) > 1:  # the rate once actors are up: images after the first shard over the time since it
            (t0, _), (t1, _) = completions[0], completions[-1]
            summary["steady_images_per_second"] = round(sum(n for _, n in completions[1:]) / (t1 - t0), 3)
        what = f"{summary['n_layers']} layers"
        if predictions_only:
            what = "top-1 predictions, no layer (--store similarity)"
        log(
            f"extracted {summary['n_images']} images x {what} of {plan.model} into {cfg.out} "
            f"({summary['n_errors']} skipped, {summary['shards_computed']}/{summary['n_shards']} shards computed"
            + (f", top-1 {summary['top1_correct']}/{summary['n_labelled']}" if summary["n_labelled"] else "")
            + ")"
        )
        return summary

    actor = PredictShards if predictions_only else ExtractShards
    return PendingExtraction(plan, resources, pending, actor, actor_kwargs, progress, finished)


def _completed(output: Output, key: str, folders: tuple[str, ...]) -> dict[int, tuple[str, str, str]]:
    """Shard number -> where its completion record lies (folder, model key, name); an earlier folder's wins."""
    found: dict[int, tuple[str, str, str]] = {}
    for folder in folders:
        for name in output.list(folder, key, suffix=".json"):
            found.setdefault(int(name[6:11]), (folder, key, name))
    return found


def begin(plan: ExtractionPlan, log, **extra: Any) -> tuple[Output, dict[str, Any]]:
    """What an extraction does before its first image: open its output, say what the concepts and sets left out,
    join the cluster, resolve the model actors, write the plan (with ``extra`` in its config.json) and sweep a
    killed run's temporary files."""
    cfg = plan.config
    output = open_output(cfg)
    if plan.concepts is not None:
        log(plan.concepts.summary(len(plan.source.classes)))
    for cid, n in sorted(plan.dropped_for_sets.items()):
        log(f"  dropped {cid}: {n} image(s), fewer than --sets {cfg.sets}")
    connect(log)
    resources = extraction_resources(cfg)
    try:
        write_plan(output, plan, resources, **extra)
    except OSError as err:
        raise InputError(f"cannot write to {cfg.out}: {err}") from None
    output.sweep()
    return output, resources


@dataclass
class PendingExtraction:
    """An extraction ready for its pipeline: its ``units`` still to compute (one row each, as
    :meth:`ExtractionPlan.shards` makes them: ``shard`` numbers the unit, ``images`` its images), the ``actor`` stage
    that computes them (built with the extraction's options and ``actor_kwargs``), its ``progress``, and
    ``finish(completions, elapsed)``, called once every unit is computed, with (time, images) per unit."""

    plan: ExtractionPlan
    resources: dict[str, Any]
    units: pa.Table
    actor: type
    actor_kwargs: dict[str, Any]
    progress: Progress
    finish: Callable[[list[tuple[float, int]], float], Any]

    def decode_kwargs(self) -> dict[str, Any]:
        cfg = self.plan.config
        return {**self.plan.preprocess.decode_args(), "precropped": cfg.precropped, "out": cfg.out}

    def actor_args(self) -> dict[str, Any]:
        cfg, resources = self.plan.config, self.resources
        return {
            "out": cfg.out,
            "model": cfg.model,
            "layers": cfg.layers,
            "tokens": cfg.tokens,
            "dtype": cfg.dtype,
            "batch_size": cfg.batch_size,
            "gpus": resources["gpus_per_actor"],
            "torch_threads": resources["torch_threads"],
            **self.actor_kwargs,
        }


# The models one actor of a shared pipeline keeps built: its rows come roughly in extraction order, so two
# cover the overlap of one extraction's last units with the next one's first, without holding every model.
MODELS_KEPT = 2


class ExtractPlans:
    """Actor stage of several extractions sharing one pipeline (:func:`stream_all`): each row names its extraction
    (``plan``), whose own stage (``stages[plan]``: its actor class and constructor arguments) this actor builds on
    first use and keeps among the :data:`MODELS_KEPT` most recently used: one actor process, and its imports, serve
    every extraction, and each model loads once per actor, not once per unit."""

    def __init__(self, stages: dict[int, tuple[type, dict[str, Any]]]):
        self.stages, self.built = stages, OrderedDict()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        parts = []
        for plan in dict.fromkeys(batch["plan"].tolist()):
            rows = batch["plan"] == plan
            done = self.stage(plan)({k: v[rows] for k, v in batch.items() if k != "plan"})
            parts.append({**done, "plan": np.full(len(done["shard"]), plan, np.int64)})
        return {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}

    def stage(self, plan: int):
        if plan not in self.built:
            if len(self.built) >= MODELS_KEPT:
                self.built.popitem(last=False)
                gc.collect()  # the evicted model's memory, before the next one loads onto the device
            cls, kwargs = self.stages[plan]
            self.built[plan] = cls(**kwargs)
        self.built.move_to_end(plan)
        return self.built[plan]


def stream_all(jobs: list[PendingExtraction], finished: Callable[[int, Any], None] | None = None) -> list[Any]:
    """Run the extractions ``jobs`` (which share their resources) through one Ray Data pipeline: CPU decode, then
    the actor stage on the models' devices. Each job's ``finish`` runs as its last unit lands (at once for a job with
    nothing to compute), then ``finished(index, result)``; returns the results in job order.

    One job runs its own actor stage; several share one actor pool (:class:`ExtractPlans`), so that a batch of
    checkpoints starts its actor processes once rather than once per checkpoint and split."""
    resources = jobs[0].resources
    if any(job.resources != resources for job in jobs):
        raise ValueError("extractions that share a pipeline must share their resources")
    results: list[Any] = [None] * len(jobs)
    completions: list[list[tuple[float, int]]] = [[] for _ in jobs]
    remaining = [job.units.num_rows for job in jobs]
    mark = [time.monotonic()]  # when the previous job finished: a job's elapsed time counts from there

    def close(i: int) -> None:
        jobs[i].progress.close()
        results[i] = jobs[i].finish(completions[i], time.monotonic() - mark[0])
        mark[0] = time.monotonic()
        if finished is not None:
            finished(i, results[i])

    todo = [i for i, n in enumerate(remaining) if n]
    for i in (i for i, n in enumerate(remaining) if not n):
        close(i)
    if not todo:
        return results
    # Imported here, by the driver that builds the pipeline: a worker that imports this module (for a task of a
    # module that needs ExtractionPlan or the actor classes) need not load Ray Data.
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    if len(todo) == 1:
        job = jobs[todo[0]]
        blocks = [job.units.slice(r, 1) for r in range(job.units.num_rows)]
        decode, decode_kwargs, actor, actor_kwargs = decode_shard, job.decode_kwargs(), job.actor, job.actor_args()
    else:
        blocks = [
            jobs[i].units.slice(r, 1).append_column("plan", pa.array([i], pa.int32()))
            for i in todo
            for r in range(jobs[i].units.num_rows)
        ]
        decode, decode_kwargs = decode_units, {"decode": {i: jobs[i].decode_kwargs() for i in todo}}
        actor, actor_kwargs = ExtractPlans, {"stages": {i: (jobs[i].actor, jobs[i].actor_args()) for i in todo}}
    ds = ray.data.from_arrow(blocks)
    ds = ds.map_batches(
        decode, batch_size=1, batch_format="pyarrow", num_cpus=resources["decode_cpus"], fn_kwargs=decode_kwargs
    )
    ds = ds.map_batches(
        actor,
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=resources["actors"]),
        num_gpus=resources["gpus_per_actor"],
        num_cpus=resources["cpus_per_actor"],
        resources=resources["actor_resources"],
        fn_constructor_kwargs=actor_kwargs,
    )
    rows = iter(ds.iter_rows())
    try:
        for row in rows:
            i = int(row["plan"]) if "plan" in row else todo[0]
            jobs[i].progress.update(int(row["n_images"] + row["n_errors"]))
            completions[i].append((time.monotonic(), int(row["n_images"])))
            remaining[i] -= 1
            if not remaining[i]:
                close(i)
    finally:
        # On a failure too: stops the execution and releases its actors at once, not when the
        # traceback (which holds this frame) is collected.
        getattr(rows, "close", lambda: None)()
    for i in (i for i in todo if remaining[i]):  # as a lone extraction always did: finish from the records found
        close(i)
    return results


def stream(
    pending: pa.Table,
    plan: ExtractionPlan,
    resources: dict[str, Any],
    actor: type,
    actor_kwargs: dict[str, Any],
    progress: Progress,
) -> list[tuple[float, int]]:
    """Run the Ray Data pipeline over the ``pending`` units of work of one extraction (:func:`stream_all`, with
    :class:`PendingExtraction`'s fields). Returns (time, images) per finished unit."""
    job = PendingExtraction(plan, resources, pending, actor, actor_kwargs, progress, lambda done, _: done)
    (completions,) = stream_all([job])
    return completions


def finish(
    output: Output, plan: ExtractionPlan, computed: int, elapsed: float, records: list[dict] | None = None
) -> dict[str, Any]:
    """Gather the completion records (default: the shards'; each with its n_images and errors, every image in one
    record) into errors.parquet and summary.json."""
    if records is None:
        records = [
            output.read_json("shards", plan.model_key, name)
            for name in output.list("shards", plan.model_key, suffix=".json")
        ]
    errors = sorted((e for r in records for e in r["errors"]), key=lambda e: e["image_id"])
    table = pa.Table.from_pylist(errors, schema=schema.ERRORS)
    output.write_table(schema.stamp(table, plan.config.experiment_id()), "errors.parquet")
    n_images = sum(r["n_images"] for r in records)
    correct = labelled = 0
    if plan.source.class_space == "imagenet" and n_images:
        preds = pq.read_table(output.path("predictions", plan.model_key), filesystem=output.fs)
        truth = plan.manifest.select(["image_id", "class_index"])
        joined = preds.join(truth, "image_id")
        labelled = joined.num_rows
        correct = pc.sum(pc.equal(joined["predicted_index"], joined["class_index"])).as_py() or 0
    summary = {
        "model": plan.model,
        "n_images": n_images,
        "n_errors": len(errors),
        "n_layers": len(plan.layers),
        "n_shards": len(records),
        "shards_computed": computed,
        "top1_correct": correct,
        "n_labelled": labelled,
        "seconds": round(elapsed, 3),
        "images_per_second": round(n_images / elapsed, 3) if computed and elapsed else None,
    }
    output.write_json(
        {k: v for k, v in summary.items() if k not in ("seconds", "images_per_second", "shards_computed")},
        "summary.json",
    )
    return summary
