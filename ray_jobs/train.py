"""``semprobe train``: a CIFAR-100 CNN (FractalNet by default) trained through Ray Train.

The same code runs on one CPU, one GPU or several GPUs (``--workers``,
``--use-gpu``): a ``TorchTrainer`` with a ``ScalingConfig``, checkpoints reported
to the run's storage path. Rerunning the same command resumes from the latest
checkpoint (Ray Train V2 restores a run from the same storage path and name).

Layout under OUT::

    config.json
    train/<run>/checkpoint_*/   model.pt (plain state dict), state.pt, metrics.json  (run: normal | permuted)
    checkpoints.parquet         epoch -> checkpoint folder, with that epoch's errors
    training.parquet            every epoch's lr, train_error, train_loss, test_error
"""

from __future__ import annotations

import json
import posixpath
import threading
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import ray.train
from ray.train.torch import TorchTrainer

from semprobe.actors.layers import LayerCatalog
from semprobe.actors.trainer import METRICS_FILE, MODEL_FILE, STATE_FILE, check_state, load_checkpoint_file, train_loop
from semprobe.actors.zoo import load_model
from semprobe.analysis.errors import InputError
from semprobe.datasets import cifar, schema
from semprobe.ray_jobs.checkpoint_analysis import follow
from semprobe.ray_jobs.checkpoints import checkpoints
from semprobe.ray_jobs.config import TrainConfig
from semprobe.ray_jobs.lease import holding_lease
from semprobe.ray_jobs.startup import connect, open_output, write_resolved
from semprobe.ray_jobs.storage import Output


def load_data(cfg: TrainConfig, log) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Both splits as (images, labels); with --permute-labels both label vectors shuffled, seeded."""
    folder, split = cifar.parse(cfg.data)
    if split != "train":
        raise InputError(f"--data {cfg.data}: name the dataset folder (cifar100:DIR); training uses both splits")
    if cfg.download:
        folder = cifar.download(folder)
    train, test = cifar.load_split(folder, "train"), cifar.load_split(folder, "test")
    ys = [train.labels, test.labels]
    if cfg.permute_labels:
        ys = [y[np.random.default_rng([cfg.seed, 2, k]).permutation(len(y))] for k, y in enumerate(ys)]
        log(
            f"train: labels permuted (seed {cfg.seed}): {np.mean(ys[0] == train.labels):.3f} of training labels "
            f"unchanged"
        )
    if cfg.batch_size > len(train.labels):
        raise InputError(f"--batch-size {cfg.batch_size} exceeds the {len(train.labels)} training images")
    return (train.images, ys[0]), (test.images, ys[1])


@holding_lease
def run_train(cfg: TrainConfig, log=print) -> dict[str, Any]:
    """Train (or resume); returns the summary of the run's checkpoints."""
    output = open_output(cfg)
    if cfg.words:
        # The analysis resolves its layers on the first checkpoint, in a thread beside training: a spec the model
        # lacks (the default 'deepest' on another architecture) is refused now, not once training has ended.
        loaded = load_model(cfg.model)
        LayerCatalog(loaded.module, loaded.preprocess.size).select(cfg.dynamics_config().layers)
    train, test = load_data(cfg, log)
    before = checkpoints(output, cfg.run_name)
    if before:
        _check_resumable(output, before[-1]["path"])
    connect(log)
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else ray.cluster_resources().get("GPU", 0) >= 1
    write_resolved(output, cfg, run=cfg.run_name, use_gpu=use_gpu)
    if before:
        log(f"train: resuming {cfg.run_name} from epoch {before[-1]['epoch']} of {cfg.epochs}")
    threads = cfg.torch_threads or (None if use_gpu else max(1, int(cfg.cpus_per_worker)))
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "model": cfg.model,
            "epochs": cfg.epochs,
            "every": cfg.every,
            "lr": cfg.lr,
            "momentum": cfg.momentum,
            "weight_decay": cfg.weight_decay,
            "batch_size": cfg.batch_size,
            "seed": cfg.seed,
            "until_train_accuracy": cfg.until_train_accuracy,
            "threads": threads,
            "train": ray.put(train),
            "test": ray.put(test),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.workers, use_gpu=use_gpu, resources_per_worker={"CPU": cfg.cpus_per_worker}
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run_name,
            storage_path=posixpath.join(cfg.out, "train"),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=None),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
        ),
    )
    analysis = _AnalysisThread(cfg, log) if cfg.words else None
    try:
        trainer.fit()
        done = checkpoints(output, cfg.run_name)
        _finish(cfg, output, done)
    finally:
        if analysis:
            analysis.join()
    last = done[-1]
    log(
        f"train: {cfg.run_name} at epoch {last['epoch']}: train error {last['train_error']:.3f}, test error "
        f"{last['test_error']:.3f}; {len(done)} checkpoints in {posixpath.join(cfg.out, 'train', cfg.run_name)}"
    )
    return {
        "run": cfg.run_name,
        "epochs": last["epoch"],
        "checkpoints": len(done),
        "resumed_from": before[-1]["epoch"] if before else None,
        "train_error": last["train_error"],
        "test_error": last["test_error"],
        **({"dynamics": analysis.result} if analysis else {}),
    }


def _check_resumable(output: Output, folder: str) -> None:
    """The checkpoint Ray Train will resume from, loaded here as the workers will (tensors only) so that a crafted or
    foreign one is bad input (exit 2) before anything starts, not a failure inside a training worker."""
    for name in (MODEL_FILE, STATE_FILE):
        path = posixpath.join(folder, name)
        if output._local:
            loaded = load_checkpoint_file(path, path, mmap=True)
        else:
            with output.fs.open_input_stream(path) as f:
                loaded = load_checkpoint_file(f.read(), path)
        if name == STATE_FILE:
            check_state(loaded, path)


def _finish(cfg: TrainConfig, output: Output, done: list[dict[str, Any]]) -> None:
    """training.parquet (every epoch) and checkpoints.parquet; training.parquet also marks the run finished."""
    with output.fs.open_input_stream(posixpath.join(done[-1]["path"], METRICS_FILE)) as f:
        history = json.loads(f.read())
    exp = cfg.experiment_id()
    output.write_table(schema.stamp(pa.Table.from_pylist(history, schema=schema.TRAINING), exp), "training.parquet")
    output.write_table(schema.stamp(pa.Table.from_pylist(done, schema=schema.CHECKPOINTS), exp), "checkpoints.parquet")


class _AnalysisThread(threading.Thread):
    """The analysis of ``semprobe dynamics --follow`` on this run, beside the trainer; join() ends it once
    training has ended."""

    def __init__(self, cfg: TrainConfig, log):
        super().__init__(name="semprobe-dynamics", daemon=True)
        self.stop, self.result, self.error = threading.Event(), None, None
        self.job = lambda: follow(cfg.dynamics_config(), log=log, stop=self.stop)
        self.start()

    def run(self) -> None:
        try:
            self.result = self.job()
        except BaseException as err:  # re-raised by join(), in the driver's thread
            self.error = err

    def join(self, timeout: float | None = None) -> None:
        self.stop.set()
        super().join(timeout)
        if self.error is not None:
            raise self.error
