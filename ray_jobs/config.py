"""Job configuration: defaults, a config file (TOML, YAML or JSON) and flags, resolved once.

Resources (actors, GPUs and CPUs per actor, threads) are configuration, never
code; ``None`` means "derive from the cluster this job runs on".
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import posixpath
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import tomllib
import yaml

from semprobe.analysis.errors import InputError
from semprobe.ray_jobs.storage import STORE_FORMATS, absolute

DTYPE_CHOICES = ("float16", "float32")


def names(value: str | list[str], option: str) -> list[str]:
    """A list option given as a list or a comma-separated string, checked: at least one name, none repeated."""
    value = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)
    if not value:
        raise InputError(f"--{option} needs at least one name")
    if len(set(value)) != len(value):
        raise InputError(f"--{option} must not repeat a name")
    return value


class _Identity:
    """An experiment's identity: the options (IDENTITY) that decide the bytes of its outputs.

    A rerun into the same output folder must agree on them; the others (resources,
    shard sizes of the analysis) may change between runs.
    """

    IDENTITY: tuple[str, ...] = ()

    def identity(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.IDENTITY}

    def experiment_id(self) -> str:
        return hashlib.sha1(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:12]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class ExtractConfig(_Identity):
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
    precropped: bool = False  # images already at the model's input size: neither resized nor cropped
    # resources
    actors: int | None = None  # None: one per GPU in the cluster, or 1 without GPUs
    gpus_per_actor: float | None = None  # None: 1 when the cluster has GPUs, else 0
    cpus_per_actor: float = 1
    torch_threads: int | None = None  # None: every CPU of the node when the actor runs on the CPU
    decode_cpus: float = 1
    actor_resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources per model actor

    # Fields that decide the bytes of the outputs; a rerun into the same --out must agree on them.
    IDENTITY = (
        "images",
        "model",
        "layers",
        "words",
        "sets",
        "seed",
        "batch_size",
        "shard_size",
        "dtype",
        "store_format",
        "compression",
        "precropped",
    )

    def validate(self) -> ExtractConfig:
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
            raise InputError(
                f"compression '{self.compression}' is not available for {self.store_format}: choose one of {choices}"
            )
        check_resources(self.actor_resources)
        self.out = absolute(self.out)
        return self


def check_resources(resources: dict[str, float]) -> None:
    """Custom Ray resources (``{accelerator = 1}``: only nodes that declare them take the actor), checked."""
    if not isinstance(resources, dict) or not all(
        isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
        for k, v in resources.items()
    ):
        raise InputError(
            f"actor_resources must map resource names to amounts >= 0 (e.g. {{accelerator = 1}}), got {resources!r}"
        )
    builtin = sorted(set(resources) & {"CPU", "GPU", "memory", "object_store_memory"})
    if builtin:
        raise InputError(f"actor_resources names {', '.join(builtin)}: use cpus_per_actor / gpus_per_actor for those")


@dataclass
class _ExtractingJob(_Identity):
    """The options of a job that first extracts layers (``run``, ``misclassified``)."""

    images: str = "sample:imagenet"
    layers: str = "blocks"
    seed: int = 0
    permutations: int = 1000
    alpha: float = 0.05
    batch_size: int = 32
    shard_size: int = 64
    dtype: str = "float16"
    # resources
    actors: int | None = None  # None: one per GPU in the cluster, or 1 without GPUs
    gpus_per_actor: float | None = None
    cpus_per_actor: float = 1
    torch_threads: int | None = None
    decode_cpus: float = 1
    actor_resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources per model actor
    task_cpus: float = 1  # per analysis task

    def extract_config(
        self, model: str, out: str, words: list[str], sets: int | None = None, images: str | None = None
    ) -> ExtractConfig:
        """The extraction this job runs for ``model`` (on ``images``, default the job's), checked."""
        if int(self.permutations) < 0:
            raise InputError(f"--permutations must be at least 0, got {self.permutations}")
        if not 0 < self.alpha < 1:
            raise InputError(f"--alpha must lie between 0 and 1, got {self.alpha}")
        return ExtractConfig(
            images=images or self.images,
            model=model,
            out=out,
            layers=self.layers,
            words=words,
            sets=sets,
            seed=self.seed,
            batch_size=self.batch_size,
            shard_size=self.shard_size,
            dtype=self.dtype,
            actors=self.actors,
            gpus_per_actor=self.gpus_per_actor,
            cpus_per_actor=self.cpus_per_actor,
            torch_threads=self.torch_threads,
            decode_cpus=self.decode_cpus,
            actor_resources=self.actor_resources,
        ).validate()


@dataclass
class _TwoVsTwoJob(_ExtractingJob):
    """The options of a job that runs the 2 vs. 2 test on its extractions (``run``, ``dynamics``)."""

    words: list[str] = field(default_factory=lambda: ["glove-50d"])
    sets: int = 1
    permutation_shard: int = 50  # permutations per task
    gram_memory_mb: int = 256  # features read per Gram chunk: at most this much float32 per task
    gram_compute: str = "float32"  # precision of each chunk's Gram product (sums are float64)

    def check_two_vs_two(self, model: str) -> None:
        """Check the analysis options (``words`` may be a comma-separated string) and those of ``model``'s
        extraction."""
        self.words = names(self.words, "words")
        for name in ("sets", "permutation_shard", "gram_memory_mb"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.gram_compute not in ("float32", "float64"):
            raise InputError(f"unknown gram_compute '{self.gram_compute}': choose float32 or float64")
        self.extract_config(model, "unused", self.words, self.sets)  # the extraction options, checked now


@dataclass
class RunConfig(_TwoVsTwoJob):
    """``semprobe run``: extraction of every model, then 2 vs. 2, permutations and the reducer."""

    models: list[str] = field(default_factory=lambda: ["efficientnet_lite0"])
    out: str | None = None  # None: runs/<experiment id>, so the same command resumes

    IDENTITY = (
        "images",
        "models",
        "words",
        "sets",
        "layers",
        "permutations",
        "seed",
        "batch_size",
        "shard_size",
        "dtype",
    )

    def validate(self) -> RunConfig:
        self.models = names(self.models, "models")
        self.check_two_vs_two(self.models[0])
        self.out = absolute(self.out or os.path.join("runs", self.experiment_id()))
        return self


@dataclass
class DynamicsConfig(_TwoVsTwoJob):
    """``semprobe dynamics``: 2 vs. 2 of every checkpoint of one or more ``semprobe train`` runs."""

    runs: list[str] = field(default_factory=list)  # the --out folders of semprobe train
    images: str | None = None  # None: each run's own CIFAR-100 folder
    splits: list[str] = field(default_factory=lambda: ["train", "test"])  # whose images: K sets of each split
    layers: str = "blocks,logits"
    sets: int = 5
    follow: bool = False  # keep analysing new checkpoints until every run has finished training
    poll_seconds: float = 30
    out: str | None = None  # None: RUN/dynamics for one run, runs/dynamics-<experiment id> for several

    IDENTITY = (
        "runs",
        "images",
        "splits",
        "words",
        "sets",
        "layers",
        "permutations",
        "seed",
        "batch_size",
        "shard_size",
        "dtype",
    )

    def validate(self) -> DynamicsConfig:
        self.runs = [absolute(r) for r in names(self.runs, "runs")]
        self.splits = names(self.splits, "splits")
        bad = [s for s in self.splits if s not in ("train", "test")]
        if bad:
            raise InputError(f"unknown split '{bad[0]}': choose train, test or train,test")
        if self.poll_seconds <= 0:
            raise InputError(f"--poll-seconds must be positive, got {self.poll_seconds}")
        self.check_two_vs_two(
            "fractalnet"
        )  # the analysis options; each checkpoint's own model is checked when it is planned
        default = (
            posixpath.join(self.runs[0], "dynamics")
            if len(self.runs) == 1
            else os.path.join("runs", f"dynamics-{self.experiment_id()}")
        )
        self.out = absolute(self.out or default)
        return self


@dataclass
class AffineConfig(_Identity):
    """``semprobe affine``: least-squares maps between the penultimate features of every pair of CNNs."""

    models: list[str] = field(
        default_factory=lambda: ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
    )
    train: str = "sample:imagenet"
    val: str = "sample:imagenet"
    max_train: int | None = None  # a seeded sample of the training images
    ridge: float = 0.0  # added to the feature covariance; 0 is ordinary least squares
    seed: int = 0
    out: str | None = None  # None: runs/affine-<experiment id>
    batch_size: int = 32
    shard_size: int = 64
    checkpoint_every: int = 16  # shards between an actor's Gram checkpoints
    actors: int | None = None
    gpus_per_actor: float | None = None
    cpus_per_actor: float = 1
    torch_threads: int | None = None

    # The ridge only changes the solve: a rerun with another ridge reuses the accumulated Gram.
    IDENTITY = ("models", "train", "val", "max_train", "seed", "shard_size")

    def validate(self) -> AffineConfig:
        if isinstance(self.models, str):
            self.models = [m.strip() for m in self.models.split(",") if m.strip()]
        if len(self.models) < 2 or len(set(self.models)) != len(self.models):
            raise InputError(f"--models needs at least two different CNNs, got {', '.join(self.models) or 'none'}")
        for name, low in (("batch_size", 1), ("shard_size", 1), ("checkpoint_every", 1), ("max_train", 1)):
            if getattr(self, name) is not None and int(getattr(self, name)) < low:
                raise InputError(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(self, name)}")
        if self.ridge < 0:
            raise InputError(f"--ridge must be at least 0, got {self.ridge}")
        self.out = absolute(self.out or os.path.join("runs", f"affine-{self.experiment_id()}"))
        return self


@dataclass
class _FailureJob(_ExtractingJob):
    """The options of the failure analyses: one CNN, one word model, R reference concepts."""

    model: str = "efficientnet_lite0"
    words: str = "glove-50d"
    references: int = 100  # R reference concepts, each with one correctly classified image
    out: str | None = None  # None: runs/<command>-<experiment id>

    COMMAND = ""

    def validate(self):
        if int(self.references) < 5:
            raise InputError(f"--references must be at least 5, got {self.references}")
        self.out = absolute(self.out or os.path.join("runs", f"{self.COMMAND}-{self.experiment_id()}"))
        self.extract_config(self.model, self.extract_out, [self.words])
        return self

    @property
    def extract_out(self) -> str:
        return posixpath.join(self.out, "extract")


@dataclass
class MisclassifiedConfig(_FailureJob):
    """``semprobe misclassified``: misclassification severity and 1 vs. 2 through the layers."""

    COMMAND = "misclassified"
    IDENTITY = (
        "images",
        "model",
        "words",
        "layers",
        "references",
        "permutations",
        "seed",
        "batch_size",
        "shard_size",
        "dtype",
    )


def _space(value: str) -> str:
    """'-1,1', '[-1,1]' or '[-1, 1]' -> '[-1,1]'."""
    return "[" + value.strip().strip("[]").replace(" ", "") + "]"


@dataclass
class AdversarialConfig(_FailureJob):
    """``semprobe adversarial``: targeted MIM examples, then 1 vs. 2 through the layers by target rank."""

    sources: int = 100  # correctly classified source images, one per class
    targets_per_source: int = 6  # by word similarity: the most and least similar and evenly spaced ranks between
    pairs: str | None = None  # instead: a .csv or .parquet of (image_id, target) pairs to attack
    eps: float = 0.3
    step: float = 0.06
    steps: int = 20
    momentum: float = 1.0
    space: str = "[-1,1]"  # where eps and step are measured
    attack_shard: int = 16  # (source, target) pairs per task

    COMMAND = "adversarial"
    IDENTITY = (
        "images",
        "model",
        "words",
        "layers",
        "references",
        "permutations",
        "seed",
        "batch_size",
        "shard_size",
        "dtype",
        "sources",
        "targets_per_source",
        "pairs",
        "eps",
        "step",
        "steps",
        "momentum",
        "space",
        "attack_shard",
    )

    def validate(self) -> AdversarialConfig:
        from semprobe.actors.attack import SPACES

        self.space = _space(str(self.space))
        if self.space not in SPACES:
            raise InputError(f"unknown input space '{self.space}': choose one of {', '.join(SPACES)}")
        low, high = SPACES[self.space]
        if not 0 < self.eps <= high - low:
            raise InputError(
                f"--eps {self.eps} lies outside the range of the input space {self.space}: choose 0 < eps <= "
                f"{high - low:g}"
            )
        if not 0 < self.step <= high - low:
            raise InputError(
                f"--step {self.step} lies outside the range of the input space {self.space}: choose 0 < step <= "
                f"{high - low:g}"
            )
        for name in ("sources", "targets_per_source", "steps", "attack_shard"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.momentum < 0:
            raise InputError(f"--momentum must be at least 0, got {self.momentum}")
        if self.pairs is not None:
            self.pairs = absolute(self.pairs)
        return super().validate()


@dataclass
class TrainConfig(_Identity):
    """``semprobe train``: a CIFAR-100 CNN trained through Ray Train, checkpointed every few epochs."""

    data: str = ""  # cifar100:DIR, the folder holding cifar-100-python/
    model: str = "fractalnet"
    epochs: int = 400
    every: int = 5  # epochs between checkpoints
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 100  # the global batch, split over the workers
    permute_labels: bool = False  # the control: train and test labels shuffled (seeded)
    until_train_accuracy: float | None = None  # stop once an epoch's training accuracy reaches it
    seed: int = 0
    download: bool = False  # fetch CIFAR-100 into the --data folder first (torchvision)
    out: str | None = None  # None: runs/train-<experiment id>
    # resources
    workers: int = 1
    use_gpu: bool | None = None  # None: when the cluster has GPUs
    cpus_per_worker: float = 1
    torch_threads: int | None = None  # None: every CPU of the node on a CPU worker
    max_failures: int = 3  # worker failures Ray Train recovers from, from the latest checkpoint
    # the analysis of the checkpoints while training goes on (semprobe dynamics into OUT/dynamics); none without words.
    # None: semprobe dynamics' default.
    words: list[str] = field(default_factory=list)
    sets: int | None = None
    layers: str | None = None
    permutations: int | None = None

    # The rest (checkpoint spacing, resources) may change when a run is resumed.
    IDENTITY = (
        "data",
        "model",
        "epochs",
        "lr",
        "momentum",
        "weight_decay",
        "batch_size",
        "permute_labels",
        "until_train_accuracy",
        "seed",
    )

    def validate(self) -> TrainConfig:
        if not self.data.startswith("cifar100:"):
            raise InputError(
                f"--data '{self.data}' is not a CIFAR-100 source: pass cifar100:DIR (the folder of cifar-100-python/)"
            )
        for name in ("epochs", "every", "batch_size", "workers"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.batch_size % self.workers:
            raise InputError(f"--batch-size {self.batch_size} must be a multiple of --workers {self.workers}")
        if self.lr <= 0 or not 0 <= self.momentum < 1:
            raise InputError(f"--lr must be positive and --momentum in [0, 1), got {self.lr} and {self.momentum}")
        if self.until_train_accuracy is not None and not 0 < self.until_train_accuracy <= 1:
            raise InputError(f"--until-train-accuracy must lie in (0, 1], got {self.until_train_accuracy}")
        self.out = absolute(self.out or os.path.join("runs", f"train-{self.experiment_id()}"))
        if self.words:
            self.words = names(self.words, "words")
            self.dynamics_config()  # its options, checked before training starts
        return self

    @property
    def run_name(self) -> str:
        return "permuted" if self.permute_labels else "normal"

    def dynamics_config(self) -> DynamicsConfig:
        """The analysis of this run's checkpoints as training reports them."""
        chosen = {k: getattr(self, k) for k in ("sets", "layers", "permutations") if getattr(self, k) is not None}
        return DynamicsConfig(runs=[self.out], words=self.words, seed=self.seed, follow=True, **chosen).validate()


PACKAGED_CONFIGS = "semprobe.ray_jobs.configs"


def packaged_configs() -> list[str]:
    return sorted(
        p.name.removesuffix(".toml") for p in resources.files(PACKAGED_CONFIGS).iterdir() if p.name.endswith(".toml")
    )


def _read_file(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        packaged = resources.files(PACKAGED_CONFIGS) / f"{path}.toml"
        if not packaged.is_file():
            raise InputError(
                f"config file not found: {path} (or name a packaged config: {', '.join(packaged_configs())})"
            )
        return tomllib.loads(packaged.read_text())
    with open(path, "rb") as f:
        raw = f.read()
    try:
        values = tomllib.loads(raw.decode()) if path.endswith(".toml") else yaml.safe_load(raw) or {}
    except (tomllib.TOMLDecodeError, yaml.YAMLError, UnicodeDecodeError) as err:
        raise InputError(f"malformed config {path}: {str(err).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise InputError(f"malformed config {path}: expected a mapping of option: value")
    return values


def load_config(cls, path: str | None, overrides: dict[str, Any]):
    """Defaults, then the file at ``path`` (TOML, YAML or JSON; or a packaged config's name), then the non-None
    ``overrides``."""
    values = _read_file(path) if path else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise InputError(f"unknown config option '{unknown[0]}': choose from {', '.join(sorted(known))}")
    try:
        return cls(**values).validate()
    except TypeError as err:
        raise InputError(f"malformed config {path or 'options'}: {err}") from None
