"""The ``semprobe`` command."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys

import semprobe
from semprobe.analysis.errors import InputError
from semprobe.ray_jobs.storage import write_error


def _extract_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML or JSON file of options; flags override it")
    p.add_argument("--images", help="image source: DIR, s3://..., manifest .parquet, sample:imagenet, sample:cifar100")
    p.add_argument("--model", help="efficientnet_lite0|1|2, torchvision:NAME, timm:NAME, NAME:checkpoint=PATH")
    p.add_argument(
        "--layers", help="kinds (activations, concat, blocks, pool, logits) and/or node names, comma-separated"
    )
    p.add_argument(
        "--words", action="append", help="word model (repeatable): glove-50d, word2vec:PATH, glove:PATH, fasttext:PATH"
    )
    p.add_argument("--sets", type=int, help="draw K disjoint image sets, one image per concept each")
    p.add_argument("--seed", type=int)
    p.add_argument("--batch-size", type=int, dest="batch_size")
    p.add_argument("--shard-size", type=int, dest="shard_size", help="images per unit of work and per output file")
    p.add_argument("--dtype", help="float16 or float32")
    p.add_argument("--store-format", dest="store_format", help="activation files: arrow (IPC, default) or parquet")
    p.add_argument("--compression", help="none (default); arrow: lz4, zstd; parquet: snappy, zstd, lz4, gzip")
    p.add_argument("--actors", type=int, help="model actors (default: one per GPU, or 1)")
    p.add_argument("--gpus-per-actor", type=float, dest="gpus_per_actor")
    p.add_argument("--out", help="output folder or s3:// / gs:// URI")


def _two_vs_two_args(p: argparse.ArgumentParser, sets: str, layers: str, family: str) -> None:
    """The options of the jobs that run the 2 vs. 2 test (run, dynamics)."""
    p.add_argument("--words", help="word models, comma-separated: glove-50d, word2vec:PATH, glove:PATH, fasttext:PATH")
    p.add_argument("--sets", type=int, help=f"K image sets, one image per concept each (default {sets})")
    p.add_argument(
        "--layers",
        help=f"kinds (activations, concat, blocks, pool, logits) and/or node names, comma-separated (default {layers})",
    )
    p.add_argument("--permutations", type=int, help="permutations for the null (default 1000; 0: no p-values)")
    p.add_argument("--seed", type=int, help="seeds the image sets and the permutations")
    p.add_argument("--alpha", type=float, help=f"BHY false discovery rate over {family} (default 0.05)")
    p.add_argument("--batch-size", type=int, dest="batch_size")
    p.add_argument("--actors", type=int, help="model actors (default: one per GPU, or 1)")
    p.add_argument("--gpus-per-actor", type=float, dest="gpus_per_actor")


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", help="TOML (or YAML/JSON) file of options, or a packaged config's name; flags override it"
    )
    p.add_argument("--images", help="image source: DIR, s3://..., manifest .parquet, sample:imagenet, sample:cifar100")
    p.add_argument(
        "--models",
        help="CNNs, comma-separated: efficientnet_lite0|1|2, torchvision:NAME, timm:NAME, NAME:checkpoint=PATH",
    )
    _two_vs_two_args(p, sets="1", layers="blocks", family="every model x layer x word model")
    p.add_argument("--out", help="output folder or s3:// / gs:// URI (default: runs/<experiment id>)")


# command -> (module, runner, config class); a job's module is imported only when it runs (torch and Ray import slowly)
JOBS = {
    "run": ("semprobe.ray_jobs.run", "run", "RunConfig"),
    "extract": ("semprobe.ray_jobs.extraction", "run_extract", "ExtractConfig"),
    "affine": ("semprobe.ray_jobs.affine", "run_affine", "AffineConfig"),
    "misclassified": ("semprobe.ray_jobs.misclassified", "run_misclassified", "MisclassifiedConfig"),
    "adversarial": ("semprobe.ray_jobs.adversarial", "run_adversarial", "AdversarialConfig"),
    "train": ("semprobe.ray_jobs.train", "run_train", "TrainConfig"),
    "dynamics": ("semprobe.ray_jobs.dynamics", "run_dynamics", "DynamicsConfig"),
}


def _job(args: argparse.Namespace) -> int:
    from semprobe.ray_jobs import config

    module, runner, cls = JOBS[args.command]
    runner = getattr(importlib.import_module(module), runner)
    # After Ray Data configured its logging on import: our progress line says what a person
    # needs, Ray Data's INFO lines restate its execution plan on every run.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "config", "func")}
    cfg = config.load_config(getattr(config, cls), args.config, overrides)
    try:
        runner(cfg, log=lambda m: print(m, file=sys.stderr))
    except Exception as err:
        cause = write_error(err)
        if cause is None:
            raise
        # Every file is published whole or not at all: what is there is complete, and a rerun resumes.
        raise InputError(
            f"cannot write to {cfg.out}: {os.strerror(cause.errno)}; free space (or fix the permissions) "
            "and run the same command again to resume, or choose another --out"
        ) from None
    return 0


def _failure_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML (or YAML/JSON) file of options; flags override it")
    p.add_argument("--images", help="ImageNet-labelled images: DIR of wnids, s3://..., sample:imagenet")
    p.add_argument("--model", help="the CNN")
    p.add_argument("--words", help="one word model: glove-50d, word2vec:PATH, glove:PATH, fasttext:PATH")
    p.add_argument("--layers", help="kinds (activations, concat, blocks, pool, logits) and/or node names")
    p.add_argument("--references", type=int, help="R reference concepts (default 100; all that qualify if fewer)")
    p.add_argument("--permutations", type=int, help="permutations for the null (default 1000)")
    p.add_argument("--seed", type=int)
    p.add_argument("--actors", type=int, help="model actors (default: one per GPU, or 1)")
    p.add_argument("--gpus-per-actor", type=float, dest="gpus_per_actor")


def _bench(args: argparse.Namespace) -> int:
    from semprobe.ray_jobs.bench import BENCHMARKS, bench_all, markdown, with_defaults

    if args.bench == "all":
        report = bench_all(args, log=lambda m: print(m, file=sys.stderr))
        print(markdown(report["rows"]))
        print(f"\nwrote {os.path.join(args.results, 'bench.json')} and {os.path.join(args.results, 'bench.md')}")
    else:
        report = BENCHMARKS[args.bench](with_defaults(args.bench, args))
        print(json.dumps(report, indent=2))
        print("\n" + markdown(report["rows"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")  # foolbox imports GitPython; git may be absent
    parser = argparse.ArgumentParser(
        prog="semprobe", description="What do CNN layers know? Held against word embeddings, on Ray."
    )
    parser.add_argument("--version", action="version", version=f"semprobe {semprobe.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser(
        "run", help="the main job: 2 vs. 2 of every layer against word models, permutations, BHY, report"
    )
    _run_args(r)
    r.set_defaults(func=_job)
    p = sub.add_parser("extract", help="capture every chosen layer of a CNN into Parquet")
    _extract_args(p)
    p.set_defaults(func=_job)
    a = sub.add_parser(
        "affine", help="affine maps between the penultimate features of every pair of CNNs (the N x N table)"
    )
    a.add_argument("--config", help="TOML (or YAML/JSON) file of options; flags override it")
    a.add_argument("--models", help="CNNs, comma-separated (at least two)")
    a.add_argument(
        "--train", help="training images (no labels used): DIR, s3://..., manifest .parquet, sample:imagenet"
    )
    a.add_argument("--val", help="validation images with ImageNet labels")
    a.add_argument("--max-train", type=int, dest="max_train", help="a seeded sample of at most N training images")
    a.add_argument("--ridge", type=float, help="ridge added to the feature covariance (default 0: least squares)")
    a.add_argument("--seed", type=int)
    a.add_argument("--actors", type=int, help="model actors (default: one per GPU, or 1)")
    a.add_argument("--out", help="output folder or s3:// / gs:// URI (default: runs/affine-<experiment id>)")
    a.set_defaults(func=_job)
    m = sub.add_parser("misclassified", help="misclassification severity and 1 vs. 2 through the layers")
    _failure_args(m)
    m.add_argument("--out", help="output folder or URI (default: runs/misclassified-<experiment id>)")
    m.set_defaults(func=_job)
    v = sub.add_parser(
        "adversarial", help="targeted MIM adversarial examples and 1 vs. 2 through the layers by target rank"
    )
    _failure_args(v)
    v.add_argument("--sources", type=int, help="correctly classified source images, one per class (default 100)")
    v.add_argument(
        "--targets-per-source",
        type=int,
        dest="targets_per_source",
        help="targets by word similarity: the most and least similar and evenly spaced ranks between (default 6)",
    )
    v.add_argument(
        "--pairs", help="instead of --sources: a .csv or .parquet of image_id, target (ImageNet index or wnid)"
    )
    v.add_argument("--eps", type=float, help="L-inf radius in --space (default 0.3)")
    v.add_argument("--step", type=float, help="step size in --space (default 0.06)")
    v.add_argument("--steps", type=int, help="iterations (default 20)")
    v.add_argument("--momentum", type=float, help="decay of the accumulated gradient (default 1.0)")
    v.add_argument("--space", help="input space eps and step are measured in: -1,1 (default) or 0,1")
    v.add_argument("--out", help="output folder or URI (default: runs/adversarial-<experiment id>)")
    v.set_defaults(func=_job)
    t = sub.add_parser(
        "train", help="train a CIFAR-100 CNN (FractalNet) through Ray Train, checkpointing every few epochs"
    )
    t.add_argument("--config", help="TOML (or YAML/JSON) file of options; flags override it")
    t.add_argument("--data", help="cifar100:DIR, the folder holding cifar-100-python/ (train and test pickles)")
    t.add_argument("--download", action="store_true", default=None, help="fetch CIFAR-100 into DIR first (torchvision)")
    t.add_argument("--model", help="fractalnet (default), fractalnet_tiny, or another zoo name with 100 classes")
    t.add_argument(
        "--epochs", type=int, help="default 400; the learning rate drops 10x whenever the remaining epochs halve"
    )
    t.add_argument("--every", type=int, help="epochs between checkpoints (default 5)")
    t.add_argument(
        "--permute-labels",
        action="store_true",
        default=None,
        dest="permute_labels",
        help="the control: train and test labels shuffled (seeded)",
    )
    t.add_argument(
        "--until-train-accuracy",
        type=float,
        dest="until_train_accuracy",
        help="stop once an epoch's training accuracy reaches this (the control: 0.999)",
    )
    t.add_argument("--lr", type=float, help="default 0.02 (SGD, momentum 0.9)")
    t.add_argument("--batch-size", type=int, dest="batch_size", help="the global batch (default 100)")
    t.add_argument("--seed", type=int)
    t.add_argument("--workers", type=int, help="Ray Train workers (default 1)")
    t.add_argument(
        "--use-gpu",
        action="store_true",
        default=None,
        dest="use_gpu",
        help="one GPU per worker (default: when the cluster has GPUs)",
    )
    t.add_argument(
        "--words",
        help="analyse the checkpoints while training goes on (semprobe dynamics into OUT/dynamics) "
        "against these word models, comma-separated",
    )
    t.add_argument("--sets", type=int, help="with --words: K image sets per split (default 5)")
    t.add_argument("--layers", help="with --words: the layers to analyse (default blocks,logits)")
    t.add_argument("--permutations", type=int, help="with --words: permutations for the null (default 1000)")
    t.add_argument("--out", help="output folder (default: runs/train-<experiment id>)")
    t.set_defaults(func=_job)
    d = sub.add_parser("dynamics", help="2 vs. 2 of every checkpoint of semprobe train runs, by epoch (Fig. 4)")
    d.add_argument("--config", help="TOML (or YAML/JSON) file of options; flags override it")
    d.add_argument(
        "--runs", help="semprobe train output folders, comma-separated (e.g. the normal and the permuted run)"
    )
    d.add_argument("--images", help="cifar100:DIR (default: the folder each run trained on)")
    d.add_argument("--splits", help="whose images: train, test or train,test (default)")
    _two_vs_two_args(
        d,
        sets="5 per split",
        layers="blocks,logits: every join and the classifier",
        family="every run x epoch x split x layer x word model",
    )
    d.add_argument(
        "--follow", action="store_true", default=None, help="keep analysing new checkpoints until the runs finish"
    )
    d.add_argument(
        "--poll-seconds", type=float, dest="poll_seconds", help="with --follow: how often to look (default 30)"
    )
    d.add_argument(
        "--out", help="output folder (default: RUN/dynamics for one run, runs/dynamics-<experiment id> for several)"
    )
    d.set_defaults(func=_job)
    b = sub.add_parser(
        "bench", help="benchmarks, each figure beside its floor (the bare operation, measured in the same run)"
    )
    b.add_argument("bench", choices=["all", "extract", "twovtwo", "permutations", "affine", "attack", "train"])
    b.add_argument("--images", default="sample:imagenet", help="extract, attack: the images")
    b.add_argument("--model", help="default: fractalnet for train, efficientnet_lite0 for the others")
    b.add_argument(
        "--batch-size", type=int, dest="batch_size", help="default: 100 for train (the paper's), 32 for the others"
    )
    b.add_argument("--out", help="where to write the benchmark's extraction (default: a temporary folder)")
    b.add_argument(
        "--results", default=os.path.join("runs", "bench"), help="all: the folder for bench.json and bench.md"
    )
    b.add_argument(
        "--quick",
        action="store_true",
        help="every benchmark at toy sizes: checks the suite runs; the figures mean nothing",
    )
    b.add_argument(
        "--sizes",
        type=lambda s: [int(w) for w in s.split(",")],
        help="twovtwo: concept counts w (default 166,838,2000)",
    )
    b.add_argument("--pairs", type=int, help="twovtwo: pairs sampled for the naive loop (default 300)")
    b.add_argument("--w", type=int, help="permutations: concept count (default 838)")
    b.add_argument("--permutations", type=int, help="permutations: how many (default 1000)")
    b.add_argument(
        "--widths",
        type=lambda s: [int(w) for w in s.split(",")],
        help="affine: feature widths of the N CNNs whose maps are solved (default the thesis's ten, 1024-4320)",
    )
    b.add_argument("--steps", type=int, help="attack: iterations (default 10); train: training steps (default 30)")
    b.add_argument(
        "--repeats",
        type=int,
        help="attack, train: interleaved repeats of the figure and its floor, medians (default 3)",
    )
    b.set_defaults(func=_bench)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except InputError as err:
        print(f"semprobe: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
