"""semprobe: what do the layers of image CNNs know, held against word embeddings.

The public API. The math needs neither Ray nor a cluster::

    import semprobe
    scores = semprobe.layer_scores({"conv1": f1, "fc": f2}, words)    # a polars DataFrame, one row per layer
    c = semprobe.correlation_matrix(features)                          # (w, w) Pearson between concepts
    result = semprobe.two_vs_two(c, semprobe.correlation_matrix(words))

and the jobs run on Ray::

    semprobe.run(semprobe.RunConfig(images="/data/imagenet/val", models=["efficientnet_lite0"]).validate())

Rooms: :mod:`semprobe.analysis` (pure math), :mod:`semprobe.datasets` (inputs and table schemas),
:mod:`semprobe.actors` (models on devices), :mod:`semprobe.ray_jobs` (the CLI and the job wiring).
Names are imported on first use, so ``import semprobe`` loads neither torch nor Ray.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("semprobe")
except PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0+unknown"

# public name -> the module that defines it
_PUBLIC = {
    "two_vs_two": "semprobe.analysis.twovtwo",
    "permutation_null": "semprobe.analysis.twovtwo",
    "one_vs_two": "semprobe.analysis.onevtwo",
    "correlation_matrix": "semprobe.analysis.similarity",
    "bhy": "semprobe.analysis.stats",
    "layer_scores": "semprobe.analysis.scores",
    "InputError": "semprobe.analysis.errors",
    "load_model": "semprobe.actors.zoo",
    "load_word_model": "semprobe.datasets.words",
    "RunConfig": "semprobe.ray_jobs.config",
    "run": "semprobe.ray_jobs.run",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'semprobe' has no attribute '{name}'")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
