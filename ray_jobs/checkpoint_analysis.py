"""The 2 vs. 2 of training checkpoints as they land: the machinery of ``semprobe dynamics``, which
``semprobe train --words`` also runs beside the trainer.

Each checkpoint is a model of the zoo (``fractalnet:checkpoint=.../model.pt``), so it goes
through the main job's machinery: per image split (K sets of CIFAR-100 training images, one
per class each, and K of test images) an extraction, Gram tasks, 2 vs. 2 and
permutation-shard tasks (:mod:`semprobe.ray_jobs.scheduler`). The extractions of a batch of checkpoints share
one Ray Data pipeline and actor pool (:func:`semprobe.ray_jobs.extraction.stream_all`): each actor loads a
checkpoint's model on its first unit of it, rather than a new actor process starting per checkpoint and split,
while every extraction keeps its own files, resume records and progress. BHY runs within each family
``--family`` names: ``model`` (the default) one training run, the network whose checkpoints these
are (its checkpoints x splits x layers x word models); ``model,word_model`` one run against one word
model; ``all`` every run x checkpoint x split x layer x word model. Following, the analysis
keeps taking checkpoints as training reports them, until every run has finished (its
``training.parquet`` exists) or the caller says stop.
"""

from __future__ import annotations

import posixpath
import threading
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from semprobe.actors.trainer import MODEL_FILE
from semprobe.analysis.errors import InputError
from semprobe.analysis.figures import training_dynamics
from semprobe.analysis.scores import adjust_family, family_columns
from semprobe.datasets import cifar, schema
from semprobe.ray_jobs.checkpoints import TrainingRun, open_runs
from semprobe.ray_jobs.config import DynamicsConfig
from semprobe.ray_jobs.extraction import plan_extraction
from semprobe.ray_jobs.figures import save_figure
from semprobe.ray_jobs.fused import run_extractions
from semprobe.ray_jobs.lease import holding_lease
from semprobe.ray_jobs.report import family_notes, family_summary
from semprobe.ray_jobs.scheduler import ModelPlan, TwoVsTwoScheduler, plan_model, reduce_scores, test_file
from semprobe.ray_jobs.startup import connect, open_output, store_mode, write_resolved
from semprobe.ray_jobs.storage import Output, model_key


@dataclass
class Checkpoint:
    """One checkpoint on one image split: the unit of analysis."""

    run: TrainingRun
    split: str  # train | test: whose images
    epoch: int
    train_error: float
    test_error: float
    model: str  # the checkpoint as a model of the zoo
    model_plan: ModelPlan | None = None  # once its extraction is planned

    @property
    def key(self) -> str:
        """Its folder under extract/, similarity/ and tests/."""
        return f"{self.run.label}/{self.split}/epoch-{self.epoch:04d}"


def split_source(images: str, split: str) -> str:
    folder = images.partition("?")[0]
    return folder if split == "train" else f"{folder}?split=test"


class CheckpointAnalysis:
    """Analyses checkpoints as they come and reduces everything analysed so far."""

    def __init__(self, cfg: DynamicsConfig, output: Output, runs: list[TrainingRun], log, store: str = "activations"):
        self.cfg, self.output, self.runs, self.log, self.store = cfg, output, runs, log, store
        self.done: dict[str, Checkpoint] = {}
        self.tests_computed = self.gram_tasks = 0
        self.families: list = []  # analysis.scores.Family, of the latest reduce

    def new_checkpoints(self) -> list[Checkpoint]:
        found = [
            Checkpoint(run, split, c["epoch"], c["train_error"], c["test_error"],
                       f"{run.arch}:checkpoint={posixpath.join(c['path'], MODEL_FILE)}")
            for run in self.runs
            for c in run.checkpoints()
            for split in self.cfg.splits
        ]  # fmt: skip
        return [c for c in found if c.key not in self.done]

    def analyse(self, checkpoints: list[Checkpoint]) -> None:
        """Extract each checkpoint on its split's images, then run its tests. The extractions share one pipeline
        and actor pool (their model actors start once for the batch); each extraction's tests start as it ends."""
        cfg = self.cfg
        scheduler = TwoVsTwoScheduler(cfg, self.output, self.log)
        extractions = []
        for n, checkpoint in enumerate(checkpoints, 1):
            images = split_source(cfg.images or checkpoint.run.data, checkpoint.split)
            out = posixpath.join(cfg.out, "extract", checkpoint.key)
            extraction = cfg.extract_config(checkpoint.model, out, cfg.words, cfg.sets, images=images)
            self.log(f"dynamics: checkpoint {n}/{len(checkpoints)}: {checkpoint.key}")
            quiet = n > 1 or self.done  # the concept coverage is the same for every checkpoint: say it once
            extractions.append((extraction, plan_extraction(extraction), (lambda m: None) if quiet else self.log))

        def extracted(i: int, _summary: dict[str, Any]) -> None:
            checkpoint, plan = checkpoints[i], extractions[i][1]
            checkpoint.model_plan = plan_model(
                self.output, checkpoint.key, plan, self.log, key=checkpoint.key, store=self.store
            )
            scheduler.submit(checkpoint.model_plan)

        run_extractions(extractions, self.store, cfg, finished=extracted)
        scheduler.wait()
        self.tests_computed += scheduler.computed
        self.gram_tasks += len(scheduler.grams) + len(scheduler.matrix_tasks)
        self.done.update({c.key: c for c in checkpoints})

    def reduce(self) -> pa.Table:
        """dynamics.parquet and dynamics_by_set.parquet of every checkpoint analysed so far, BHY within each
        family of them, and the figures; returns the dynamics table."""
        rows, by_set = [], []
        for c in sorted(self.done.values(), key=lambda c: (c.run.label, c.split, c.epoch)):
            tests = [
                self.output.read_table(*test_file(c.key, word_model, layer))
                for word_model in self.cfg.words
                for layer, _ in c.model_plan.layers
            ]
            extra = {"run": c.run.uri, "run_name": c.run.name, "epoch": c.epoch, "split": c.split,
                     "train_error": c.train_error, "test_error": c.test_error, "run_label": c.run.label}  # fmt: skip
            reduced = reduce_scores(tests, self.cfg.alpha, extra=extra, adjust=False)
            rows += reduced.scores
            by_set += reduced.by_set
        # In dynamics a "model" is a training run: its checkpoints are one network as it learns.
        self.families = adjust_family(rows, self.cfg.alpha, family_columns(self.cfg.family, model="run"))
        exp = self.cfg.experiment_id()
        table = pa.Table.from_pylist(rows, schema=schema.DYNAMICS)
        self.output.write_table(schema.stamp(table, exp), "dynamics.parquet")
        table_by_set = pa.Table.from_pylist(by_set, schema=schema.DYNAMICS_BY_SET)
        self.output.write_table(schema.stamp(table_by_set, exp), "dynamics_by_set.parquet")
        errors = {run.label: run.errors() for run in self.runs}
        for word_model in self.cfg.words:
            figure = training_dynamics(rows, errors, word_model, self.cfg.alpha)
            save_figure(self.output, figure, "figures", f"dynamics-{model_key(word_model)}.png")
        return table


@holding_lease
def follow(cfg: DynamicsConfig, log=print, stop: threading.Event | None = None) -> dict[str, Any]:
    """Analyse (or resume) every checkpoint of the runs; with cfg.follow, until the runs (or ``stop``) say
    training is over. Returns the summary it also writes to OUT/summary.json."""
    output = open_output(cfg)
    runs = open_runs(cfg.runs)
    if cfg.images is not None and not cfg.images.startswith(cifar.PREFIX):
        raise InputError(
            f"--images {cfg.images}: dynamics reads CIFAR-100 (cifar100:DIR), the data the runs were trained on"
        )
    if not cfg.follow and not any(run.checkpoints() for run in runs):
        raise InputError(f"no checkpoints in {', '.join(cfg.runs)} yet: train first, or pass --follow to wait for them")
    connect(log)
    store = store_mode(cfg.store, cfg.gpus_per_actor, log)
    write_resolved(output, cfg, store=store)
    job, started = CheckpointAnalysis(cfg, output, runs, log, store), time.monotonic()
    table = None
    while True:
        # Read before listing: a run that has finished has reported all its checkpoints.
        over = all(run.finished() for run in runs) or (stop is not None and stop.is_set())
        checkpoints = job.new_checkpoints()
        if checkpoints:
            job.analyse(checkpoints)
            table = job.reduce()
        if not cfg.follow or over:
            break
        if stop is not None:
            stop.wait(cfg.poll_seconds)
        else:
            time.sleep(cfg.poll_seconds)
    if table is None:
        raise InputError(f"no checkpoint of {', '.join(cfg.runs)} was reported before training ended")
    summary = {
        "experiment_id": cfg.experiment_id(),
        "runs": cfg.runs,
        "checkpoints": len(job.done) // len(cfg.splits),
        "n_tests": table.num_rows,
        "n_significant": sum(bool(s) for s in table["significant"].to_pylist()),
        **family_summary(cfg.family, job.families, cfg.alpha),
    }
    statement, warnings = family_notes("dynamics", cfg.family, job.families, cfg.alpha)
    for line in [statement, *warnings]:
        log(f"dynamics: {line}")
    output.write_json(summary, "summary.json")
    log(
        f"dynamics: {summary['checkpoints']} checkpoint(s) x {len(cfg.splits)} split(s) "
        f"in {time.monotonic() - started:.0f} s; "
        f"figure: {output.path('figures', f'dynamics-{model_key(cfg.words[0])}.png')}"
    )
    return {**summary, "tests_computed": job.tests_computed, "gram_tasks": job.gram_tasks}
