"""The ``semprobe`` command."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from analysis.errors import InputError


def _extract_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML or JSON file of options; flags override it")
    p.add_argument("--images", help="image source: DIR, s3://..., manifest .parquet, sample:imagenet, sample:cifar100")
    p.add_argument("--model", help="efficientnet_lite0|1|2, torchvision:NAME, timm:NAME, NAME:checkpoint=PATH")
    p.add_argument("--layers", help="kinds (activations, concat, blocks, pool, logits) and/or node names, comma-separated")
    p.add_argument("--words", action="append", help="word model (repeatable): glove-50d, word2vec:PATH, glove:PATH, fasttext:PATH")
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


def _extract(args: argparse.Namespace) -> int:
    from ray_jobs.config import ExtractConfig, load_config
    from ray_jobs.extract import run_extract

    # After Ray Data configured its logging on import: our progress line says what a person
    # needs, Ray Data's INFO lines restate its execution plan on every run.
    logging.getLogger("ray.data").setLevel(logging.WARNING)

    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "config", "func", "bench")}
    run_extract(load_config(ExtractConfig, args.config, overrides), log=lambda m: print(m, file=sys.stderr))
    return 0


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML (or YAML/JSON) file of options, or a packaged config's name; flags override it")
    p.add_argument("--images", help="image source: DIR, s3://..., manifest .parquet, sample:imagenet, sample:cifar100")
    p.add_argument("--models", help="CNNs, comma-separated: efficientnet_lite0|1|2, torchvision:NAME, timm:NAME, NAME:checkpoint=PATH")
    p.add_argument("--words", help="word models, comma-separated: glove-50d, word2vec:PATH, glove:PATH, fasttext:PATH")
    p.add_argument("--sets", type=int, help="K image sets, one image per concept each (default 1)")
    p.add_argument("--layers", help="kinds (activations, concat, blocks, pool, logits) and/or node names, comma-separated")
    p.add_argument("--permutations", type=int, help="permutations for the null (default 1000; 0: no p-values)")
    p.add_argument("--seed", type=int, help="seeds the image sets and the permutations")
    p.add_argument("--alpha", type=float, help="BHY false discovery rate (default 0.05)")
    p.add_argument("--batch-size", type=int, dest="batch_size")
    p.add_argument("--actors", type=int, help="model actors (default: one per GPU, or 1)")
    p.add_argument("--gpus-per-actor", type=float, dest="gpus_per_actor")
    p.add_argument("--out", help="output folder or s3:// / gs:// URI (default: runs/<experiment id>)")


def _run(args: argparse.Namespace) -> int:
    from ray_jobs.config import RunConfig, load_config
    from ray_jobs.run import run

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "config", "func")}
    run(load_config(RunConfig, args.config, overrides), log=lambda m: print(m, file=sys.stderr))
    return 0


def _affine(args: argparse.Namespace) -> int:
    from ray_jobs.affine import run_affine
    from ray_jobs.config import AffineConfig, load_config

    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "config", "func")}
    run_affine(load_config(AffineConfig, args.config, overrides), log=lambda m: print(m, file=sys.stderr))
    return 0


def _misclassified(args: argparse.Namespace) -> int:
    from ray_jobs.config import MisclassifiedConfig, load_config
    from ray_jobs.failures import run_misclassified

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "config", "func")}
    run_misclassified(load_config(MisclassifiedConfig, args.config, overrides), log=lambda m: print(m, file=sys.stderr))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from ray_jobs.bench import BENCHMARKS

    return BENCHMARKS[args.bench](args)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")  # foolbox imports GitPython; git may be absent
    parser = argparse.ArgumentParser(prog="semprobe", description="What do CNN layers know? Held against word embeddings, on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="the main job: 2 vs. 2 of every layer against word models, permutations, BHY, report")
    _run_args(r)
    r.set_defaults(func=_run)
    p = sub.add_parser("extract", help="capture every chosen layer of a CNN into Parquet")
    _extract_args(p)
    p.set_defaults(func=_extract)
    a = sub.add_parser("affine", help="affine maps between the penultimate features of every pair of CNNs (the N x N table)")
    a.add_argument("--config", help="TOML (or YAML/JSON) file of options; flags override it")
    a.add_argument("--models", help="CNNs, comma-separated (at least two)")
    a.add_argument("--train", help="training images (no labels used): DIR, s3://..., manifest .parquet, sample:imagenet")
    a.add_argument("--val", help="validation images with ImageNet labels")
    a.add_argument("--max-train", type=int, dest="max_train", help="a seeded sample of at most N training images")
    a.add_argument("--ridge", type=float, help="ridge added to the feature covariance (default 0: least squares)")
    a.add_argument("--seed", type=int)
    a.add_argument("--actors", type=int, help="model actors (default: one per GPU, or 1)")
    a.add_argument("--out", help="output folder or s3:// / gs:// URI (default: runs/affine-<experiment id>)")
    a.set_defaults(func=_affine)
    m = sub.add_parser("misclassified", help="misclassification severity and 1 vs. 2 through the layers")
    m.add_argument("--config", help="TOML (or YAML/JSON) file of options; flags override it")
    m.add_argument("--images", help="ImageNet-labelled images: DIR of wnids, s3://..., sample:imagenet")
    m.add_argument("--model", help="the CNN")
    m.add_argument("--words", help="one word model: glove-50d, word2vec:PATH, glove:PATH, fasttext:PATH")
    m.add_argument("--layers", help="kinds (activations, concat, blocks, pool, logits) and/or node names")
    m.add_argument("--references", type=int, help="R reference concepts (default 100; all that qualify if fewer)")
    m.add_argument("--permutations", type=int, help="permutations for the null (default 1000)")
    m.add_argument("--seed", type=int)
    m.add_argument("--out", help="output folder or URI (default: runs/misclassified-<experiment id>)")
    m.set_defaults(func=_misclassified)
    b = sub.add_parser("bench", help="benchmarks, each beside its floor")
    b.add_argument("bench", choices=["extract", "twovtwo", "permutations", "affine"])
    b.add_argument("--images", default="sample:imagenet")
    b.add_argument("--model", default="efficientnet_lite0")
    b.add_argument("--batch-size", type=int, default=32, dest="batch_size")
    b.add_argument("--out", help="where to write the benchmark's extraction (default: a temporary folder)")
    b.add_argument("--sizes", type=lambda s: [int(w) for w in s.split(",")], default="166,838,2000",
                   help="twovtwo: concept counts w, comma-separated")
    b.add_argument("--pairs", type=int, default=300, help="twovtwo: pairs sampled for the naive loop")
    b.add_argument("--w", type=int, default=838, help="permutations: concept count")
    b.add_argument("--permutations", type=int, default=1000, help="permutations: how many")
    b.set_defaults(func=_bench)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except InputError as err:
        print(f"semprobe: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
