"""``semprobe dynamics``: the 2 vs. 2 of every checkpoint of ``semprobe train`` runs (Fig. 4 of the 2021 paper).

Each checkpoint is a model of the zoo (``fractalnet:checkpoint=.../model.pt``), so
it goes through the main job's machinery: per image split (K sets of CIFAR-100
training images, one per class each, and K of test images) an extraction, Gram
tasks, 2 vs. 2 and permutation-shard tasks. BHY runs over the experiment's whole
family: every run x checkpoint x split x layer x word model. With ``--follow`` the
job keeps analysing checkpoints as training reports them, until every run has
finished (its ``training.parquet`` exists), so analysis runs while training goes on.

Layout under OUT::

    config.json, summary.json
    extract/<run>/<split>/epoch-NNNN/      one extraction per checkpoint and split
    similarity/..., tests/...              as in ``semprobe run``, keyed <run>/<split>/epoch-NNNN
    dynamics.parquet                       datasets.schema.DYNAMICS
    figures/dynamics-<word model>.png      error and 2 vs. 2 by epoch, one line per layer, one row per run

Every file is a unit of resume, as in ``semprobe run``.
"""

from __future__ import annotations

import dataclasses
import io
import posixpath
import threading
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from semprobe.actors.trainer import MODEL_FILE
from semprobe.analysis.errors import InputError
from semprobe.analysis.figures import training_dynamics
from semprobe.datasets import cifar, schema
from semprobe.ray_jobs.config import DynamicsConfig
from semprobe.ray_jobs.extraction import plan_extraction, run_extract
from semprobe.ray_jobs.run import Analysis, adjust_family, plan_model, reduce_scores
from semprobe.ray_jobs.startup import check_same_experiment, connect, write_resolved
from semprobe.ray_jobs.storage import Output, model_key
from semprobe.ray_jobs.train import checkpoints


@dataclass
class TrainingRun:
    """One ``semprobe train`` output folder, as the analysis sees it."""

    uri: str
    label: str  # unique within the experiment: normal, permuted (or run-<i>-<name> when two share a name)
    name: str  # normal | permuted
    arch: str  # the zoo name of the architecture
    data: str  # cifar100:DIR
    output: Output

    def checkpoints(self) -> list[dict[str, Any]]:
        return checkpoints(self.output, self.name)

    def finished(self) -> bool:
        return self.output.exists("training.parquet")  # run_train writes it once fit() has returned

    def errors(self) -> list[dict[str, Any]]:
        """Every epoch's errors once training has finished; meanwhile those of the checkpoints so far."""
        rows = self.output.read_table("training.parquet").to_pylist() if self.finished() else self.checkpoints()
        return [{k: r[k] for k in ("epoch", "train_error", "test_error")} for r in rows]


def open_runs(uris: list[str]) -> list[TrainingRun]:
    runs = []
    for uri in uris:
        output = Output(uri)
        if not output.exists("config.json"):
            raise InputError(f"--runs {uri} is not a semprobe train output folder (no config.json)")
        resolved = output.read_json("config.json")
        config = resolved.get("config", {})
        if "run" not in resolved or not str(config.get("data", "")).startswith(cifar.PREFIX):
            raise InputError(f"--runs {uri} is not a semprobe train output folder (its config.json is another job's)")
        runs.append(TrainingRun(uri, resolved["run"], resolved["run"], config["model"], config["data"], output))
    names = [r.name for r in runs]
    for i, r in enumerate(runs):
        if names.count(r.name) > 1:
            r.label = f"run-{i}-{r.name}"
    return runs


def split_source(images: str, split: str) -> str:
    folder = images.partition("?")[0]
    return folder if split == "train" else f"{folder}?split=test"


class Dynamics:
    """Analyses checkpoints as they come and reduces everything analysed so far."""

    def __init__(self, cfg: DynamicsConfig, output: Output, runs: list[TrainingRun], log):
        self.cfg, self.output, self.runs, self.log = cfg, output, runs, log
        self.done: dict[str, dict[str, Any]] = {}  # key -> the checkpoint's run, split, epoch, errors, model, layers
        self.tests_computed = self.gram_tasks = 0

    def new_checkpoints(self) -> list[dict[str, Any]]:
        items = []
        for run in self.runs:
            for c in run.checkpoints():
                for split in self.cfg.splits:
                    key = f"{run.label}/{split}/epoch-{c['epoch']:04d}"
                    if key not in self.done:
                        items.append(
                            {
                                "key": key,
                                "run": run,
                                "split": split,
                                "epoch": c["epoch"],
                                "train_error": c["train_error"],
                                "test_error": c["test_error"],
                                "model": f"{run.arch}:checkpoint={posixpath.join(c['path'], MODEL_FILE)}",
                            }
                        )
        return items

    def analyse(self, items: list[dict[str, Any]]) -> None:
        """Extract each checkpoint on its split's images, then run its tests; each extraction's tests start as
        it ends."""
        cfg = self.cfg
        analysis = Analysis(cfg, self.output)
        for n, item in enumerate(items, 1):
            images = split_source(cfg.images or item["run"].data, item["split"])
            ecfg = cfg.extract_config(
                item["model"], posixpath.join(cfg.out, "extract", item["key"]), cfg.words, cfg.sets, images=images
            )
            self.log(f"dynamics: checkpoint {n}/{len(items)}: {item['key']}")
            quiet = n > 1 or self.done  # the concept coverage is the same for every checkpoint: say it once
            plan = plan_extraction(ecfg)
            run_extract(ecfg, log=(lambda m: None) if quiet else self.log, plan=plan)
            mp = dataclasses.replace(plan_model(self.output, item["key"], plan, self.log), key=item["key"])
            analysis.submit(mp)
            item["layers"] = mp.layers
        analysis.wait()
        self.tests_computed += analysis.computed
        self.gram_tasks += len(analysis.grams)
        self.done.update({item["key"]: item for item in items})

    def reduce(self) -> pa.Table:
        """The dynamics table of every checkpoint analysed so far, BHY over all of them."""
        rows = []
        for key, item in sorted(self.done.items(), key=lambda kv: (kv[1]["run"].label, kv[1]["split"], kv[1]["epoch"])):
            tests = [
                self.output.read_table("tests", key, model_key(wm), f"{model_key(layer)}.parquet")
                for wm in self.cfg.words
                for layer, _ in item["layers"]
            ]
            scores, _ = reduce_scores(tests, self.cfg.alpha)
            extra = {
                "run": item["run"].uri,
                "run_name": item["run"].name,
                "epoch": item["epoch"],
                "split": item["split"],
                "train_error": item["train_error"],
                "test_error": item["test_error"],
                "run_label": item["run"].label,
            }
            rows += [{**r, **extra} for r in scores.to_pylist()]
        adjust_family(rows, self.cfg.alpha)
        exp = self.cfg.experiment_id()
        self.output.write_table(
            schema.stamp(pa.Table.from_pylist(rows, schema=schema.DYNAMICS), exp), "dynamics.parquet"
        )
        errors = {run.label: run.errors() for run in self.runs}
        for wm in self.cfg.words:
            buf = io.BytesIO()
            training_dynamics(rows, errors, wm, self.cfg.alpha).savefig(buf, format="png", dpi=110)
            self.output.write_bytes(buf.getvalue(), "figures", f"dynamics-{model_key(wm)}.png")
        return pa.Table.from_pylist(rows, schema=schema.DYNAMICS)


def run_dynamics(cfg: DynamicsConfig, log=print, stop: threading.Event | None = None) -> dict[str, Any]:
    """Analyse (or resume) every checkpoint of the runs; with cfg.follow, until the runs (or ``stop``) say
    training is over."""
    output = Output(cfg.out)
    check_same_experiment(output, cfg)
    runs = open_runs(cfg.runs)
    if cfg.images is not None and not cfg.images.startswith(cifar.PREFIX):
        raise InputError(
            f"--images {cfg.images}: dynamics reads CIFAR-100 (cifar100:DIR), the data the runs were trained on"
        )
    if not cfg.follow and not any(run.checkpoints() for run in runs):
        raise InputError(f"no checkpoints in {', '.join(cfg.runs)} yet: train first, or pass --follow to wait for them")
    connect(log)
    write_resolved(output, cfg)
    job, started = Dynamics(cfg, output, runs, log), time.monotonic()
    table = None
    while True:
        # Read before listing: a run that has finished has reported all its checkpoints.
        over = all(run.finished() for run in runs) or (stop is not None and stop.is_set())
        items = job.new_checkpoints()
        if items:
            job.analyse(items)
            table = job.reduce()
        if not cfg.follow or over:
            break
        if stop is not None:
            stop.wait(cfg.poll_seconds)
        else:
            time.sleep(cfg.poll_seconds)
    if table is None:
        raise InputError(f"no checkpoint of {', '.join(cfg.runs)} was reported before training ended")
    means = table.filter(pc.is_null(table["set_index"])).to_pylist()
    summary = {
        "experiment_id": cfg.experiment_id(),
        "runs": cfg.runs,
        "checkpoints": len(job.done) // len(cfg.splits),
        "n_tests": len(means),
        "n_significant": sum(bool(r["significant"]) for r in means),
    }
    output.write_json(summary, "summary.json")
    log(
        f"dynamics: {summary['checkpoints']} checkpoint(s) x {len(cfg.splits)} split(s) "
        f"in {time.monotonic() - started:.0f} s; "
        f"figure: {output.path('figures', f'dynamics-{model_key(cfg.words[0])}.png')}"
    )
    return {**summary, "tests_computed": job.tests_computed, "gram_tasks": job.gram_tasks}
