"""``semprobe train``'s output as the other jobs read it: the checkpoints Ray Train registered, and a
training run's folder as ``semprobe dynamics`` sees it.

Layout under a training run's OUT (written by ``semprobe train``)::

    config.json                 with "run": normal | permuted
    train/<run>/checkpoint_*/   model.pt, state.pt, metrics.json
    train/<run>/checkpoint_manager_snapshot.json   Ray Train's record of the complete checkpoints
    training.parquet            written once training has finished
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from semprobe.analysis.errors import InputError
from semprobe.datasets import cifar
from semprobe.ray_jobs.storage import Output

# Ray Train's record of the checkpoints it registered (complete ones only), beside them in the run's folder.
SNAPSHOT = "checkpoint_manager_snapshot.json"


def checkpoints(output: Output, run: str) -> list[dict[str, Any]]:
    """The run's registered checkpoints by epoch: that epoch's metrics, run and path."""
    try:
        with output.fs.open_input_stream(output.path("train", run, SNAPSHOT)) as f:
            snapshot = json.loads(f.read())
    except (FileNotFoundError, json.JSONDecodeError):  # no run yet, or the record is being rewritten
        return []
    return sorted(
        (
            {**c["metrics"], "run": run, "path": output.path("train", run, c["checkpoint_dir_name"])}
            for c in snapshot["checkpoint_results"]
        ),
        key=lambda r: r["epoch"],
    )


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
