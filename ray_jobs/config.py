"""Job configuration: defaults, a config file (TOML, YAML or JSON) and flags, resolved once.

Every option is a dataclass field, declared once with ``option()``: its default, help, minimum, choices
and whether it belongs to the experiment's identity live in the field's metadata. Validation (types,
minimums, choices), each command's flags (``cli``) and ``identity()`` are generated from the fields, so
the help can never disagree with the default; rules that tie several options together stay in each
class's ``check()``.

Resources (actors, GPUs and CPUs per actor, threads) are configuration, never code, declared once in
``ModelActors`` and ``Resources``; ``None`` means "derive from the cluster this job runs on".
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import os
import posixpath
import typing
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import tomllib
import yaml

from semprobe.analysis.errors import InputError, require_extra
from semprobe.datasets.concepts import NO_TABLE
from semprobe.datasets.words import CACHE_FOLDER, WORD_MODEL_CHOICES, cache_beside
from semprobe.ray_jobs.storage import STORE_FORMATS, absolute

DTYPE_CHOICES = ("float16", "float32")
INPUT_SPACES = ("[0,1]", "[-1,1]")  # the spaces actors.attack.SPACES knows (config imports no torch)
BHY_FAMILIES = ("all", "model", "model,word_model")  # analysis.scores.FAMILIES (config imports no torch)
ONE_VS_TWO_NULLS = ("rows", "columns")  # analysis.onevtwo.NULLS
TARGET_SIMILARITIES = ("pearson", "cosine")
TOKENS = ("all", "class")  # actors.layers.TOKENS (config imports no torch)
PRECISIONS = ("fp64", "fp32")  # analysis.kernels.PRECISIONS (config imports no torch)
STORE_MODES = ("auto", "activations", "similarity")  # ray_jobs.fused: where an extraction's results go
X_AXES = ("names", "depth")  # analysis.figures.X_AXES (config imports no matplotlib)
AUTO_TASK_GPUS = 0.25  # an analysis task's share of a GPU when the cluster has GPUs and --task-gpus is unset
MODEL_HELP = (
    "efficientnet_lite0|1|2, torchvision:NAME, timm:NAME, timm:hf-hub:ORG/NAME, NAME:checkpoint=PATH, each optionally "
    "NAME?weights=TAG&pretrained=false&input_size=N"
)
LAYERS_HELP = (
    "kinds (pixels, activations, concat, mixed, blocks, pool, logits, softmax; FractalNet: deepest) and/or node "
    "names, comma-separated"
)
IMAGES_HELP = "image source: DIR, s3://..., gs://..., manifest .parquet, sample:imagenet, sample:cifar100"
OUT_HELP = "output folder or s3:// / gs:// URI"
BHY = "Benjamini-Hochberg-Yekutieli false discovery rate"
CONCEPT_WORDS_HELP = (
    "a .csv or .parquet table of class (wnid, ImageNet index or CIFAR-100 name) -> word that overrides the lemma "
    f"match for the classes it names; '{NO_TABLE}': the lemma match alone"
)
CONCEPT_WORDS_NONE = "the packaged table of the class space: for CIFAR-100, its nine two-word classes; ImageNet none"


def _no_spaces(value: str) -> str:
    """'model, word_model' -> 'model,word_model'."""
    return value.replace(" ", "")


def option(
    default: Any,
    help: str,
    *,
    minimum: float | None = None,
    choices: tuple[str, ...] | None = None,
    identity: bool = False,
    flag: bool = True,
    none: str | None = None,
    noun: str | None = None,
    normalize: typing.Callable[[str], str] | None = None,
    group: str | None = None,
) -> Any:
    """A config option: a dataclass field whose metadata says everything the CLI and validation need.

    help: what the option is, never its default (the help appends that itself).
    minimum: the least value of a number, or the least number of names of a list.
    choices: the values a string may take; noun names them in the error ('unknown input space ...').
    identity: the option decides the bytes of the outputs, so a rerun into the same --out must agree on it.
    flag: False for an option awkward on a command line (a table): settable only in a config file.
    none: what a default of None means (e.g. 'one per GPU'), shown as the default.
    normalize: applied to a string before the choices are checked ('0,1' -> '[0,1]').
    group: 'resources' for the options that size and place the job's work, listed apart in the help.
    """
    if default is None and not none:
        raise ValueError(f"option with default None needs none=: what None means ({help!r})")
    metadata = {
        "help": help,
        "minimum": minimum,
        "choices": tuple(choices) if choices else None,
        "identity": identity,
        "flag": flag,
        "none": none,
        "noun": noun,
        "normalize": normalize,
        "group": group,
    }
    if isinstance(default, (list, dict)):
        return field(default_factory=functools.partial(copy.deepcopy, default), metadata=metadata)
    return field(default=default, metadata=metadata)


def redefault(cls: type, name: str, default: Any, **changes: Any) -> Any:
    """``cls``'s option ``name`` with another default (and optionally other metadata) for a subclass."""
    (base,) = [f for f in dataclasses.fields(cls) if f.name == name]
    return option(default, **{**base.metadata, **changes})


def default_text(f: dataclasses.Field) -> str:
    """An option's default as its help shows it: what None means, 'none' for an empty value, lists comma-joined."""
    value = f.default_factory() if f.default is dataclasses.MISSING else f.default
    if value is None:
        return f.metadata["none"]
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        value = ",".join(value)
    return str(value) if value not in ("", {}) else "none"


def help_text(f: dataclasses.Field) -> str:
    """An option's help: what it is, then its default, taken from the field so the two never disagree."""
    return f"{f.metadata['help']} (default: {default_text(f)})"


def options(cls: type) -> list[dataclasses.Field]:
    """A config class's options in the order the help and the resolved config list them: resources last."""
    fields = dataclasses.fields(cls)
    return [f for f in fields if f.metadata["group"] != "resources"] + [
        f for f in fields if f.metadata["group"] == "resources"
    ]


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def label(f: dataclasses.Field) -> str:
    """How errors name an option: its flag, or its config key when it has no flag."""
    return flag_name(f.name) if f.metadata["flag"] else f.name


@functools.cache
def _kinds(cls: type) -> dict[str, tuple[type, bool, type | None]]:
    """Each option's base type (int, float, bool, str, list or dict), whether None is allowed, and a dict's
    value type (float or str)."""
    kinds = {}
    for name, hint in typing.get_type_hints(cls).items():
        args = typing.get_args(hint)
        optional = type(None) in args
        if optional:
            (hint,) = [a for a in args if a is not type(None)]
        base = typing.get_origin(hint) or hint
        kinds[name] = (base, optional, typing.get_args(hint)[1] if base is dict else None)
    return kinds


def kind(cls: type, name: str) -> tuple[type, bool]:
    return _kinds(cls)[name][:2]


_EXPECTED = {
    int: "an integer",
    float: "a number",
    bool: "true or false",
    str: "a string",
    list: "a list of names or a comma-separated string",
    (dict, float): "a table of names to numbers",
    (dict, str): "a table of names to strings",
}


def _shown(value: Any) -> str:
    """A value as the user wrote it: strings quoted, booleans and null as in TOML/JSON."""
    return f"'{value}'" if isinstance(value, str) else json.dumps(value, default=str)


def _split(value: str | list[str]) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)


def typed(cls: type, name: str, value: Any, where: str) -> Any:
    """``value`` checked against option ``name``'s type (a comma-separated string becomes a list); ``where``
    names the option in the error. bool is not an int; an int is a number."""
    base, optional, values = _kinds(cls)[name]
    if value is None and optional:
        return None
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        list: isinstance(value, str) or (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)),
        # a table's numbers are checked by the option's own rule (check_resources), with its own message
        dict: isinstance(value, dict) and (values is not str or all(isinstance(v, str) for v in value.values())),
    }[base]
    if not ok:
        raise InputError(f"{where} must be {_EXPECTED[(base, values) if base is dict else base]}, got {_shown(value)}")
    return _split(value) if base is list else value


def parse_flag(cls: type, name: str, text: Any) -> Any:
    """A flag's text as option ``name``'s type (numbers parsed; strings, lists and booleans as they come)."""
    base, _ = kind(cls, name)
    if base in (int, float) and isinstance(text, str):
        try:
            return base(text)
        except ValueError:
            raise InputError(f"{flag_name(name)} must be {_EXPECTED[base]}, got '{text}'") from None
    return text


def check_options(cfg: Any) -> None:
    """Every option of ``cfg`` checked against its field: type, minimum, choices; lists split and unrepeated."""
    for f in dataclasses.fields(cfg):
        meta, where = f.metadata, label(f)
        value = typed(type(cfg), f.name, getattr(cfg, f.name), where)
        minimum, choices = meta["minimum"], meta["choices"]
        if isinstance(value, list):
            if minimum and len(value) < minimum:
                raise InputError(f"{where} needs at least {'one name' if minimum == 1 else f'{minimum} names'}")
            repeated = sorted({v for v in value if value.count(v) > 1})
            if repeated:
                raise InputError(f"{where} must not repeat a name: {', '.join(repeated)}")
        elif minimum is not None and value is not None and value < minimum:
            raise InputError(f"{where} must be at least {minimum}, got {value}")
        if isinstance(value, str) and meta["normalize"]:
            value = meta["normalize"](value)
        if choices and value not in choices:
            noun = meta["noun"] or f.name
            raise InputError(f"unknown {noun} '{value}': choose one of {', '.join(choices)}")
        setattr(cfg, f.name, value)


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


class _Options:
    """What every config class shares: validation from its fields, then ``check()``; the experiment's identity.

    The identity is the options marked ``identity``: those that decide the bytes of the outputs. A rerun into
    the same output folder must agree on them; the others (resources, shard sizes of the analysis) may change
    between runs.
    """

    COMMAND = ""  # the semprobe command this config class is for

    def validate(self):
        """Every option checked against its field, then the rules between options; derived defaults resolved."""
        check_options(self)
        self.check()
        return self

    def check(self) -> None:
        """Rules that tie options together, and defaults derived from others (``out``). Subclasses extend it."""

    def identity(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata["identity"]}

    def experiment_id(self) -> str:
        return hashlib.sha1(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:12]

    def to_dict(self) -> dict[str, Any]:
        """Every option by name (resources last), as the constructor and --config take them."""
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in options(type(self))}


@dataclass
class ModelActors(_Options):
    """The pool of model actors a job runs its CNNs on."""

    actors: int | None = option(
        None, "model actors", minimum=1, none="one per GPU in the cluster, or 1 without GPUs", group="resources"
    )
    gpus_per_actor: float | None = option(
        None,
        "GPUs per model actor (a fraction shares a GPU)",
        minimum=0,
        none="1 when the cluster has GPUs, else 0",
        group="resources",
    )
    cpus_per_actor: float = option(1, "CPUs Ray reserves per model actor", minimum=0, group="resources")
    torch_threads: int | None = option(
        None,
        "PyTorch threads per model actor",
        minimum=1,
        none="every CPU of the node when the actor runs on the CPU",
        group="resources",
    )


@dataclass
class Resources(ModelActors):
    """The resources of an extraction: its model actors, its image decoding and custom Ray resources."""

    decode_cpus: float = option(1, "CPUs per image-decoding task", minimum=0, group="resources")
    actor_resources: dict[str, float] = option(
        {},
        "custom Ray resources per model actor, e.g. {accelerator = 1}: only nodes that declare them take the actor",
        flag=False,
        group="resources",
    )

    def check(self) -> None:
        super().check()
        check_resources(self.actor_resources)


@dataclass
class _Extraction(Resources):
    """The options every extraction takes, whether it runs alone (``extract``) or inside a job."""

    images: str = option("sample:imagenet", IMAGES_HELP, identity=True)
    layers: str = option("blocks", LAYERS_HELP, identity=True)
    seed: int = option(0, "seeds the image sets and the permutations of the null", identity=True)
    batch_size: int = option(32, "images per forward pass of a model actor", minimum=1, identity=True)
    shard_size: int = option(
        64, "images per unit of work and per activation file (a multiple of --batch-size)", minimum=1, identity=True
    )
    dtype: str = option("float16", "precision of the stored activations", choices=DTYPE_CHOICES, identity=True)
    tokens: str = option(
        "all",
        "how a transformer layer's token sequence (a ViT block's tokens x features) is flattened: all tokens, "
        "token-major, or the class token's features alone; CNN layers are flattened whole either way",
        choices=TOKENS,
        noun="token flattening",
        identity=True,
    )
    concept_words: str | None = option(None, CONCEPT_WORDS_HELP, identity=True, none=CONCEPT_WORDS_NONE)
    word_cache: str | None = option(
        None,
        "folder (local or s3:// / gs://) where word2vec, glove and fasttext files are converted once into a "
        "memory-mapped .npy + Parquet index (as `semprobe words convert` does) and then mapped instead of scanned; "
        "'off': scan the files",
        none=f"{CACHE_FOLDER} beside --out",
    )

    def check(self) -> None:
        super().check()
        if self.concept_words not in (None, NO_TABLE):
            self.concept_words = absolute(self.concept_words)
        if self.word_cache not in (None, "off"):
            self.word_cache = absolute(self.word_cache)
        if self.shard_size % self.batch_size:
            raise InputError(f"--shard-size {self.shard_size} must be a multiple of --batch-size {self.batch_size}")

    def identity(self) -> dict[str, Any]:
        ident = super().identity()
        if self.tokens == "all":  # the default: every layer flattened whole, as runs were before the option
            del ident["tokens"]
        return ident

    def word_cache_dir(self) -> str | None:
        """The word cache (``--word-cache``, by default beside --out); None when 'off'."""
        return None if self.word_cache == "off" else self.word_cache or cache_beside(self.out)


@dataclass
class ExtractConfig(_Extraction):
    """``semprobe extract``: every chosen layer of one CNN into the activation store."""

    COMMAND = "extract"

    model: str = option("efficientnet_lite0", f"the CNN: {MODEL_HELP}", identity=True)
    out: str = option("runs/extract", OUT_HELP)
    layers: str = redefault(_Extraction, "layers", "activations")
    seed: int = redefault(_Extraction, "seed", 0, help="seeds the image sets")
    words: list[str] = option(
        [],
        f"word models, comma-separated: {WORD_MODEL_CHOICES}; only classes one of them names are extracted",
        identity=True,
    )
    sets: int | None = option(
        None,
        "draw K disjoint image sets, one image per concept each",
        minimum=1,
        identity=True,
        none="every image, in no set",
    )
    store_format: str = option(
        "arrow",
        "activation files: Arrow IPC or Parquet",
        choices=tuple(STORE_FORMATS),
        noun="store format",
        identity=True,
    )
    compression: str = option(
        "none",
        "of the activation files: " + "; ".join(f"{fmt}: {', '.join(STORE_FORMATS[fmt])}" for fmt in STORE_FORMATS),
        identity=True,
    )
    precropped: bool = option(
        False, "images already at the model's input size: neither resized nor cropped", identity=True
    )

    def check(self) -> None:
        super().check()
        if self.compression not in STORE_FORMATS[self.store_format]:
            choices = ", ".join(STORE_FORMATS[self.store_format])
            raise InputError(
                f"compression '{self.compression}' is not available for {self.store_format}: choose one of {choices}"
            )
        self.out = absolute(self.out)


@dataclass
class _ExtractingJob(_Extraction):
    """The options of a job that first extracts layers (``run``, ``dynamics``, ``misclassified``, ...)."""

    permutations: int = option(1000, "permutations for the null (0: no p-values)", minimum=0, identity=True)
    alpha: float = option(0.05, f"{BHY} over every test of the job")
    task_cpus: float = option(1, "CPUs per analysis task (Gram, test, permutations)", minimum=0, group="resources")
    task_gpus: float | None = option(
        None,
        "GPUs per analysis task (a fraction: the scheduler packs several tasks on one GPU)",
        minimum=0,
        none=f"{AUTO_TASK_GPUS:g} when the cluster has GPUs, else 0",
        group="resources",
    )
    precision: str = option(
        "fp64",
        "precision of the statistics' products: fp64, or fp32 (TF32 on GPUs) with every pair whose margin lies "
        "within the proven error bound of the threshold recomputed in fp64, so every decision equals fp64's",
        choices=PRECISIONS,
    )

    def check(self) -> None:
        super().check()
        if not 0 < self.alpha < 1:
            raise InputError(f"--alpha must lie between 0 and 1, got {self.alpha}")

    def layers_of(self, model: str) -> str:
        """The layer spec ``model`` is extracted at."""
        return self.layers

    def extract_config(
        self, model: str, out: str, words: list[str], sets: int | None = None, images: str | None = None
    ) -> ExtractConfig:
        """The extraction this job runs for ``model`` (on ``images``, default the job's), checked."""
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(_Extraction)}
        given = {"images": images or self.images, "model": model, "out": out, "words": words, "sets": sets}
        given["word_cache"] = self.word_cache_dir() or "off"  # beside the job's --out, not the extraction's
        return ExtractConfig(**{**shared, **given, "layers": self.layers_of(model)}).validate()


@dataclass
class _TwoVsTwoJob(_ExtractingJob):
    """The options of a job that runs the 2 vs. 2 test on its extractions (``run``, ``dynamics``)."""

    words: list[str] = option(
        ["glove-50d"], f"word models, comma-separated: {WORD_MODEL_CHOICES}", minimum=1, identity=True
    )
    sets: int = option(1, "K disjoint image sets, one image per concept each", minimum=1, identity=True)
    permutation_shard: int = option(50, "permutations per task", minimum=1)
    gram_memory_mb: int = option(
        256, "features read per Gram chunk: at most this many MB of float32 per task", minimum=1
    )
    gram_compute: str = option(
        "float32", "precision of each chunk's Gram product (the sums are float64)", choices=("float32", "float64")
    )
    stack_memory_mb: int = option(
        2048,
        "memory of one statistics task's stacked (layer, image set) matrices: it takes as many of a model's "
        "layers as fit, against every word model",
        minimum=1,
    )
    store: str = option(
        "auto",
        "what extraction keeps: activations (every layer's z-scored rows in the activation store, then Gram tasks) "
        "or similarity (each model actor holds one image set's rows of a chunk of layers on its device and writes "
        "only the w x w matrices and the predictions, never the activations); auto: similarity when the model "
        "actors get GPUs, else activations",
        choices=STORE_MODES,
        noun="store mode",
    )
    similarity_memory_mb: int | None = option(
        None,
        "with --store similarity: MB one chunk of layers' resident rows may take (w x their features x bytes of "
        "--dtype); layers are grouped in catalog order to fit, one forward pass of the set per chunk",
        minimum=1,
        none="half the free memory of the actor's GPU, or a quarter of the node's available RAM over the actors",
        group="resources",
    )
    family: str = option(
        "model",
        "BHY family: all (every test of the job), model (one figure: one CNN's layers x word models), "
        "model,word_model (one curve)",
        choices=BHY_FAMILIES,
        noun="BHY family",
        normalize=_no_spaces,
        identity=True,
    )


@dataclass
class RunConfig(_TwoVsTwoJob):
    """``semprobe run``: extraction of every model, then 2 vs. 2, permutations and the reducer."""

    COMMAND = "run"

    models: list[str] = option(["efficientnet_lite0"], f"CNNs, comma-separated: {MODEL_HELP}", minimum=1, identity=True)
    model_layers: dict[str, str] = option(
        {},
        "a layer spec per model, e.g. {'torchvision:inception_v3' = 'pixels,mixed'}; the others take --layers",
        identity=True,
        flag=False,
    )
    out: str | None = option(None, OUT_HELP, none="runs/<experiment id>, so the same command resumes")
    alpha: float = redefault(_ExtractingJob, "alpha", 0.05, help=f"{BHY} within each --family")
    x: str = option(
        "names",
        "the x axis of the layer figures: names (the layers' names, at most 15 of them, evenly thinned) or depth "
        "(relative depth: layer position / (number of layers - 1)); changes the figures only",
        choices=X_AXES,
        noun="x axis",
    )

    def check(self) -> None:
        super().check()
        unknown = sorted(set(self.model_layers) - set(self.models))
        if unknown:
            raise InputError(
                f"model_layers names '{unknown[0]}', which is not in --models: choose from {', '.join(self.models)}"
            )
        empty = sorted(m for m, spec in self.model_layers.items() if not spec.strip(", "))
        if empty:
            raise InputError(f"model_layers gives '{empty[0]}' no layers: name kinds or nodes ({LAYERS_HELP})")
        self.out = absolute(self.out or os.path.join("runs", self.experiment_id()))

    def layers_of(self, model: str) -> str:
        return self.model_layers.get(model, self.layers)

    def identity(self) -> dict[str, Any]:
        ident = super().identity()
        if not self.model_layers:  # the default: every model at --layers, as runs were before the option
            del ident["model_layers"]
        return ident


@dataclass
class DynamicsConfig(_TwoVsTwoJob):
    """``semprobe dynamics``: 2 vs. 2 of every checkpoint of one or more ``semprobe train`` runs."""

    COMMAND = "dynamics"

    runs: list[str] = option(
        [],
        "semprobe train output folders, comma-separated (e.g. the normal and the permuted run)",
        minimum=1,
        identity=True,
    )
    images: str | None = redefault(
        _Extraction, "images", None, help="cifar100:DIR", none="the folder each run trained on"
    )
    splits: list[str] = option(
        ["train", "test"], "whose images: K sets of each split, train and/or test, comma-separated", identity=True
    )
    layers: str = redefault(
        _Extraction,
        "layers",
        "deepest",
        help=f"{LAYERS_HELP} (deepest: the paper's, the deepest column's first conv unit, its ends of blocks 2 and 4, "
        "and the classifier; blocks,logits: every block's join and the classifier)",
    )
    alpha: float = redefault(_ExtractingJob, "alpha", 0.05, help=f"{BHY} within each --family")
    family: str = redefault(
        _TwoVsTwoJob,
        "family",
        "model",
        help="BHY family: all (every run x epoch x split x layer x word model), model (one training run: its "
        "epochs x splits x layers x word models), model,word_model (one run against one word model)",
    )
    sets: int = redefault(_TwoVsTwoJob, "sets", 5, help="K disjoint image sets of each split, one image per class each")
    follow: bool = option(False, "keep analysing new checkpoints until every run has finished training")
    poll_seconds: float = option(30, "with --follow: seconds between looks for new checkpoints")
    out: str | None = option(None, OUT_HELP, none="RUN/dynamics for one run, runs/dynamics-<experiment id> for several")

    def check(self) -> None:
        super().check()
        self.runs = [absolute(r) for r in self.runs]
        bad = [s for s in self.splits if s not in ("train", "test")]
        if bad:
            raise InputError(f"unknown split '{bad[0]}': choose train, test or train,test")
        if self.poll_seconds <= 0:
            raise InputError(f"--poll-seconds must be positive, got {self.poll_seconds}")
        default = (
            posixpath.join(self.runs[0], "dynamics")
            if len(self.runs) == 1
            else os.path.join("runs", f"dynamics-{self.experiment_id()}")
        )
        self.out = absolute(self.out or default)


@dataclass
class AffineConfig(ModelActors):
    """``semprobe affine``: least-squares maps between the penultimate features of every pair of CNNs."""

    COMMAND = "affine"

    models: list[str] = option(
        ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"],
        f"CNNs, comma-separated, at least two: {MODEL_HELP}",
        identity=True,
    )
    # The packaged samples split in two: the maps are scored on images they were not fitted on.
    train: str = option(
        "sample:imagenet?range=0:10",
        "training images (no labels used): DIR, s3://..., manifest .parquet, sample:imagenet[?range=START:STOP]",
        identity=True,
    )
    val: str = option(
        "sample:imagenet?range=10:20",
        "validation images with ImageNet labels, none of them a training image",
        identity=True,
    )
    allow_overlap: bool = option(False, "score the maps on validation images that are also training images")
    max_train: int | None = option(
        None, "a seeded sample of at most N training images", minimum=1, identity=True, none="every training image"
    )
    # The ridge only changes the solve: a rerun with another ridge reuses the accumulated Gram.
    ridge: float = option(0.0, "ridge added to the feature covariance (0: ordinary least squares)", minimum=0)
    seed: int = option(0, "seeds the sample of training images", identity=True)
    out: str | None = option(None, OUT_HELP, none="runs/affine-<experiment id>")
    batch_size: int = option(32, "images per forward pass of a model actor", minimum=1)
    shard_size: int = option(64, "images per unit of work", minimum=1, identity=True)
    checkpoint_every: int = option(16, "shards between an actor's Gram checkpoints", minimum=1)

    def check(self) -> None:
        super().check()
        if len(self.models) < 2:
            raise InputError(f"--models needs at least two different CNNs, got {', '.join(self.models) or 'none'}")
        self.out = absolute(self.out or os.path.join("runs", f"affine-{self.experiment_id()}"))


@dataclass
class _FailureJob(_ExtractingJob):
    """The options of the failure analyses: one CNN, one word model, R reference concepts."""

    images: str = redefault(
        _Extraction,
        "images",
        "sample:imagenet",
        help="ImageNet-labelled images: DIR of wnids, s3://..., sample:imagenet",
    )
    model: str = option("efficientnet_lite0", f"the CNN: {MODEL_HELP}", identity=True)
    words: str = option("glove-50d", f"one word model: {WORD_MODEL_CHOICES}", identity=True)
    references: int = option(
        100,
        "R reference concepts, each with one correctly classified image (all that qualify if fewer)",
        minimum=5,
        identity=True,
    )
    sets: int | None = redefault(
        ExtractConfig,
        "sets",
        None,
        help="only K disjoint image sets of one image per concept each (NAACL: one set), drawn with --seed",
        none="every image",
    )
    null: str = option(
        "rows",
        "1 vs. 2 null: rows (the authors': which image gets which word-correlation vector, shuffled apart on the "
        "true and predicted side) or columns (the reference words permuted)",
        choices=ONE_VS_TWO_NULLS,
        noun="1 vs. 2 null",
        identity=True,
    )
    out: str | None = option(None, OUT_HELP, none="runs/<command>-<experiment id>")

    COMMAND = ""

    def check(self) -> None:
        super().check()
        self.out = absolute(self.out or os.path.join("runs", f"{self.COMMAND}-{self.experiment_id()}"))

    @property
    def extract_out(self) -> str:
        return posixpath.join(self.out, "extract")


@dataclass
class MisclassifiedConfig(_FailureJob):
    """``semprobe misclassified``: misclassification severity and 1 vs. 2 through the layers."""

    out: str | None = redefault(_FailureJob, "out", None, none="runs/misclassified-<experiment id>")
    # As run's (not identity: the numbers do not depend on it), in two passes; adversarial has activations only.
    store: str = redefault(
        _TwoVsTwoJob,
        "store",
        "auto",
        help="what extraction keeps: activations (every layer's z-scored rows in the activation store, read by the "
        "1 vs. 2 tasks) or similarity (the predictions of every image, then a second pass of the misclassified "
        "images and their reference images in which the model actors compute each layer's Pearson r of every such "
        "image with its references; the activations are never written); auto: similarity when the model actors "
        "get GPUs, else activations",
    )
    similarity_memory_mb: int | None = redefault(
        _TwoVsTwoJob,
        "similarity_memory_mb",
        None,
        help="with --store similarity: MB one chunk of layers' resident rows may take ((reference images + "
        "--batch-size) x their features x bytes of --dtype); layers are grouped in catalog order to fit, one "
        "forward pass per chunk",
    )

    COMMAND = "misclassified"


def _space(value: str) -> str:
    """'-1,1', '[-1,1]' or '[-1, 1]' -> '[-1,1]'."""
    return "[" + value.strip().strip("[]").replace(" ", "") + "]"


@dataclass
class AdversarialConfig(_FailureJob):
    """``semprobe adversarial``: targeted MIM examples, then 1 vs. 2 through the layers by target rank."""

    out: str | None = redefault(_FailureJob, "out", None, none="runs/adversarial-<experiment id>")
    sources: int = option(100, "correctly classified source images, one per class", minimum=1, identity=True)
    targets_per_source: int = option(
        6,
        "targets by word similarity: the most and least similar and evenly spaced ranks between",
        minimum=1,
        identity=True,
    )
    target_similarity: str = option(
        "pearson",
        "the word similarity that ranks the targets: pearson (the paper's) or cosine",
        choices=TARGET_SIMILARITIES,
        noun="target similarity",
        identity=True,
    )
    pairs: str | None = option(
        None,
        "a .csv or .parquet of image_id, target (ImageNet index or wnid) to attack",
        identity=True,
        none="--sources images, --targets-per-source targets each",
    )
    eps: float = option(0.3, "L-inf radius in --space", identity=True)
    step: float = option(0.06, "step size in --space", identity=True)
    steps: int = option(20, "iterations", minimum=1, identity=True)
    momentum: float = option(1.0, "decay of the accumulated gradient", minimum=0, identity=True)
    space: str = option(
        "[-1,1]",
        "input space eps and step are measured in, LOW,HIGH",
        choices=INPUT_SPACES,
        noun="input space",
        normalize=_space,
        identity=True,
    )
    attack_shard: int = option(16, "(source, target) pairs per task", minimum=1, identity=True)

    COMMAND = "adversarial"

    def check(self) -> None:
        require_extra("foolbox", "attacks", "semprobe adversarial (its MIM attack)")
        low, high = (float(b) for b in self.space.strip("[]").split(","))
        for name in ("eps", "step"):
            if not 0 < getattr(self, name) <= high - low:
                raise InputError(
                    f"--{name} {getattr(self, name)} lies outside the range of the input space {self.space}: "
                    f"choose 0 < {name} <= {high - low:g}"
                )
        if self.pairs is not None:
            self.pairs = absolute(self.pairs)
        super().check()


def _dynamics_default(name: str) -> str:
    (f,) = [f for f in dataclasses.fields(DynamicsConfig) if f.name == name]
    return f"as semprobe dynamics: {default_text(f)}"


@dataclass
class TrainConfig(_Options):
    """``semprobe train``: a CIFAR-100 CNN trained through Ray Train, checkpointed every few epochs."""

    COMMAND = "train"

    data: str = option("", "cifar100:DIR, the folder holding cifar-100-python/ (train and test pickles)", identity=True)
    model: str = option(
        "fractalnet", "fractalnet, fractalnet_tiny, or another zoo name with 100 classes", identity=True
    )
    epochs: int = option(
        400, "epochs; the learning rate drops 10x whenever the remaining epochs halve", minimum=1, identity=True
    )
    every: int = option(5, "epochs between checkpoints", minimum=1)
    lr: float = option(0.02, "learning rate of SGD with --momentum", identity=True)
    momentum: float = option(0.9, "SGD momentum, in [0, 1)", identity=True)
    weight_decay: float = option(0.0, "SGD weight decay", minimum=0, identity=True)
    batch_size: int = option(100, "the global batch, split over the workers", minimum=1, identity=True)
    permute_labels: bool = option(False, "the control: train and test labels shuffled (seeded)", identity=True)
    until_train_accuracy: float | None = option(
        None,
        "stop once an epoch's training accuracy reaches this (the control: 0.999)",
        identity=True,
        none="train every epoch",
    )
    seed: int = option(0, "seeds initialisation, data order and the label permutation", identity=True)
    download: bool = option(False, "fetch CIFAR-100 into the --data folder first (torchvision)")
    out: str | None = option(None, "output folder", none="runs/train-<experiment id>")
    # The analysis of the checkpoints while training goes on (semprobe dynamics into OUT/dynamics).
    words: list[str] = option(
        [],
        "analyse the checkpoints while training goes on (semprobe dynamics into OUT/dynamics) against these word "
        f"models, comma-separated: {WORD_MODEL_CHOICES}",
    )
    sets: int | None = option(
        None, "with --words: K image sets of each split", minimum=1, none=_dynamics_default("sets")
    )
    layers: str | None = option(None, "with --words: the layers to analyse", none=_dynamics_default("layers"))
    concept_words: str | None = option(None, f"with --words: {CONCEPT_WORDS_HELP}", none=CONCEPT_WORDS_NONE)
    permutations: int | None = option(
        None, "with --words: permutations for the null", minimum=0, none=_dynamics_default("permutations")
    )
    # The rest (checkpoint spacing, resources) may change when a run is resumed.
    workers: int = option(1, "Ray Train workers", minimum=1, group="resources")
    use_gpu: bool | None = option(None, "one GPU per worker", none="when the cluster has GPUs", group="resources")
    cpus_per_worker: float = option(1, "CPUs Ray reserves per worker", minimum=0, group="resources")
    torch_threads: int | None = option(
        None, "PyTorch threads per worker", minimum=1, none="every CPU of the node on a CPU worker", group="resources"
    )
    max_failures: int = option(
        3,
        "worker failures Ray Train recovers from, from the latest checkpoint (-1: any number)",
        minimum=-1,
        group="resources",
    )

    def check(self) -> None:
        super().check()
        if not self.data.startswith("cifar100:"):
            raise InputError(
                f"--data '{self.data}' is not a CIFAR-100 source: pass cifar100:DIR (the folder of cifar-100-python/)"
            )
        if self.batch_size % self.workers:
            raise InputError(f"--batch-size {self.batch_size} must be a multiple of --workers {self.workers}")
        if self.lr <= 0 or not 0 <= self.momentum < 1:
            raise InputError(f"--lr must be positive and --momentum in [0, 1), got {self.lr} and {self.momentum}")
        if self.until_train_accuracy is not None and not 0 < self.until_train_accuracy <= 1:
            raise InputError(f"--until-train-accuracy must lie in (0, 1], got {self.until_train_accuracy}")
        self.out = absolute(self.out or os.path.join("runs", f"train-{self.experiment_id()}"))
        if self.words:
            self.dynamics_config()  # its options, checked before training starts

    @property
    def run_name(self) -> str:
        return "permuted" if self.permute_labels else "normal"

    def dynamics_config(self) -> DynamicsConfig:
        """The analysis of this run's checkpoints as training reports them."""
        chosen = {
            k: getattr(self, k)
            for k in ("sets", "layers", "permutations", "concept_words")
            if getattr(self, k) is not None
        }
        return DynamicsConfig(runs=[self.out], words=self.words, seed=self.seed, follow=True, **chosen).validate()


@dataclass
class CompareConfig(_Options):
    """``semprobe compare RUN...``: the layer curves of finished runs on one axis of relative depth."""

    COMMAND = "compare"

    # Positional on the command line (semprobe compare RUN...), a list in a config file.
    runs: list[str] = option([], "finished semprobe run output folders", minimum=1, identity=True, flag=False)
    words: list[str] | None = option(
        None, "the word models to draw, comma-separated", identity=True, none="every word model the runs scored"
    )
    out: str | None = option(None, OUT_HELP, none="runs/compare-<experiment id>")

    def check(self) -> None:
        super().check()
        self.runs = [absolute(r) for r in self.runs]
        repeated = sorted({r for r in self.runs if self.runs.count(r) > 1})
        if repeated:
            raise InputError(f"semprobe compare names the run {repeated[0]} twice: name each run once")
        self.out = absolute(self.out or os.path.join("runs", f"compare-{self.experiment_id()}"))
        inside = [r for r in self.runs if posixpath.join(self.out, "").startswith(posixpath.join(r, ""))]
        if inside:  # compare only reads its runs: its outputs never land in one
            raise InputError(f"--out {self.out} lies inside the run {inside[0]}: choose a folder outside the runs")


def dumps(cfg: _Options) -> str:
    """The resolved config as JSON: every option, loadable back through --config (a .json file)."""
    return json.dumps(cfg.to_dict(), indent=2)


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
        if path.endswith(".toml"):
            values = tomllib.loads(raw.decode())
        else:
            try:  # JSON first: YAML 1.1 reads a float without a dot (1e-05, as json writes it) as a string
                values = json.loads(raw)
            except ValueError:
                values = yaml.safe_load(raw) or {}
    except (tomllib.TOMLDecodeError, yaml.YAMLError, UnicodeDecodeError) as err:
        raise InputError(f"malformed config {path}: {str(err).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise InputError(f"malformed config {path}: expected a mapping of option: value")
    return values


def load_config(cls, path: str | None, overrides: dict[str, Any]):
    """Defaults, then the file at ``path`` (TOML, YAML or JSON; or a packaged config's name), then the non-None
    ``overrides``; validated. A wrong type in the file is named with the file."""
    known = {f.name for f in dataclasses.fields(cls)}
    values = _read_file(path) if path else {}
    # A config may say which command it is for (the packaged paper configs do): another command refuses it.
    command = values.pop("command", cls.COMMAND)
    if command != cls.COMMAND:
        raise InputError(
            f"config {path} is for semprobe {command}, not semprobe {cls.COMMAND}: "
            f"run semprobe {command} --config {path}"
        )
    for source, given in ((f" in {path}", values), ("", overrides)):
        unknown = sorted(set(given) - known)
        if unknown:
            raise InputError(f"unknown config option '{unknown[0]}'{source}: choose from {', '.join(sorted(known))}")
    for name, value in values.items():
        typed(cls, name, value, f"{name} in {path}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**values).validate()
