"""Job configuration: defaults, a config file (YAML or JSON) and flags, resolved once.

Resources (actors, GPUs and CPUs per actor, threads) are configuration, never
code; ``None`` means "derive from the cluster this job runs on".
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from analysis.errors import InputError
from ray_jobs.storage import STORE_FORMATS

DTYPE_CHOICES = ("float16", "float32")


@dataclass
class ExtractConfig:
    images: str = "sample:imagenet"
    model: str = "efficientnet_lite0"
    out: str = "runs/extract"
    layers: str = "activations"
    words: list[str] = field(default_factory=list)
    sets: int | None = None
    seed: int = 0
    batch_size: int = 32
    shard_size: int = 64
    dtype: str = "float16"
    store_format: str = "arrow"  # activation files: arrow (IPC) or parquet
    compression: str = "none"
    # resources
    actors: int | None = None  # None: one per GPU in the cluster, or 1 without GPUs
    gpus_per_actor: float | None = None  # None: 1 when the cluster has GPUs, else 0
    cpus_per_actor: float = 1
    torch_threads: int | None = None  # None: every CPU of the node when the actor runs on the CPU
    decode_cpus: float = 1

    # Fields that decide the bytes of the outputs; a rerun into the same --out must agree on them.
    IDENTITY = ("images", "model", "layers", "words", "sets", "seed", "batch_size", "shard_size", "dtype", "store_format", "compression")

    def validate(self) -> "ExtractConfig":
        if self.dtype not in DTYPE_CHOICES:
            raise InputError(f"unknown dtype '{self.dtype}': choose one of {', '.join(DTYPE_CHOICES)}")
        for name in ("batch_size", "shard_size"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.shard_size % self.batch_size:
            raise InputError(f"--shard-size {self.shard_size} must be a multiple of --batch-size {self.batch_size}")
        if self.sets is not None and self.sets < 1:
            raise InputError(f"--sets must be at least 1, got {self.sets}")
        if self.store_format not in STORE_FORMATS:
            raise InputError(f"unknown store format '{self.store_format}': choose one of {', '.join(STORE_FORMATS)}")
        if self.compression not in STORE_FORMATS[self.store_format]:
            choices = ", ".join(STORE_FORMATS[self.store_format])
            raise InputError(f"compression '{self.compression}' is not available for {self.store_format}: choose one of {choices}")
        return self

    def identity(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.IDENTITY}

    def experiment_id(self) -> str:
        return hashlib.sha1(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:12]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(cls, path: str | None, overrides: dict[str, Any]):
    """Defaults, then the file at ``path`` (YAML or JSON), then the non-None ``overrides``."""
    values: dict[str, Any] = {}
    if path:
        if not os.path.isfile(path):
            raise InputError(f"config file not found: {path}")
        with open(path) as f:
            try:
                values = yaml.safe_load(f) or {}
            except yaml.YAMLError as err:
                raise InputError(f"malformed config {path}: {str(err).splitlines()[0]}") from None
        if not isinstance(values, dict):
            raise InputError(f"malformed config {path}: expected a mapping of option: value")
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise InputError(f"unknown config option '{unknown[0]}': choose from {', '.join(sorted(known))}")
    return cls(**values).validate()
