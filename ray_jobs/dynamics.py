"""``semprobe dynamics``: the 2 vs. 2 of every checkpoint of ``semprobe train`` runs (Fig. 4 of the 2021 paper).

The machinery is :mod:`semprobe.ray_jobs.checkpoint_analysis`: per checkpoint and image split an
extraction, Gram, 2 vs. 2 and permutation tasks, BHY within each ``--family`` (default: one training
run's checkpoints x splits x layers x word models). With ``--follow`` the job keeps analysing
checkpoints as training reports them, until every run has finished, so analysis runs while
training goes on.

Layout under OUT::

    config.json, summary.json
    extract/<run>/<split>/epoch-NNNN/      one extraction per checkpoint and split
    similarity/..., tests/...              as in ``semprobe run``, keyed <run>/<split>/epoch-NNNN
    dynamics.parquet                       datasets.schema.DYNAMICS: mean over sets, p, BHY
    dynamics_by_set.parquet                datasets.schema.DYNAMICS_BY_SET: each image set
    figures/dynamics-<word model>.png      error and 2 vs. 2 by epoch, one line per layer, one row per run

Every file is a unit of resume, as in ``semprobe run``.
"""

from __future__ import annotations

from typing import Any

from semprobe.ray_jobs.checkpoint_analysis import follow
from semprobe.ray_jobs.config import DynamicsConfig


def run_dynamics(cfg: DynamicsConfig, log=print) -> dict[str, Any]:
    """Analyse (or resume) every checkpoint of the runs; with cfg.follow, until the runs say training is over.
    Returns the summary it also writes to OUT/summary.json."""
    return follow(cfg, log)
