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
from semprobe.ray_jobs import config
from semprobe.ray_jobs.storage import write_error

CONFIG_HELP = "TOML, YAML or JSON file (or a packaged config's name); flags override it"
PRINT_CONFIG_HELP = (
    "print the resolved config (defaults, then --config, then flags, validated) as JSON and exit without running; "
    "saved as a .json file it is a --config"
)

# command -> its line in `semprobe --help`; its flags come from its config class (JOBS)
JOB_HELP = {
    "run": "the main job: 2 vs. 2 of every layer against word models, permutations, BHY, report",
    "extract": "capture every chosen layer of a CNN into an activation store of Arrow IPC files "
    "(Parquet with --store-format parquet)",
    "affine": "affine maps between the penultimate features of every pair of CNNs (the N x N table)",
    "misclassified": "misclassification severity and 1 vs. 2 through the layers",
    "adversarial": "targeted MIM adversarial examples and 1 vs. 2 through the layers by target rank",
    "train": "train a CIFAR-100 CNN (FractalNet) through Ray Train, checkpointing every few epochs",
    "dynamics": "2 vs. 2 of every checkpoint of semprobe train runs, by epoch (Fig. 4)",
}


def add_options(p: argparse.ArgumentParser, cls: type) -> None:
    """A job command's flags: --config, --print-config and one per option of its config class that is not
    config-only, each with the field's help and default; booleans get --x / --no-x. Every flag's default is
    None (not given), so a config file's value stands unless a flag overrides it."""
    p.add_argument("--config", help=CONFIG_HELP)
    p.add_argument("--print-config", action="store_true", dest="print_config", help=PRINT_CONFIG_HELP)
    resources = p.add_argument_group("resources")
    for f in config.options(cls):
        if not f.metadata["flag"]:
            continue
        kwargs = {"dest": f.name, "help": config.help_text(f).replace("%", "%%")}
        if config.kind(cls, f.name)[0] is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif f.metadata["choices"]:
            kwargs["metavar"] = "{" + "|".join(f.metadata["choices"]) + "}"
        (resources if f.metadata["group"] == "resources" else p).add_argument(config.flag_name(f.name), **kwargs)


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


def _resolved(args: argparse.Namespace, cls: type, **given):
    """The config of ``cls``: defaults, then --config, then the flags given (and ``given``, e.g. positionals)."""
    flags = {f.name for f in config.options(cls) if f.metadata["flag"]}
    overrides = {k: config.parse_flag(cls, k, v) for k, v in vars(args).items() if k in flags and v is not None}
    return config.load_config(cls, args.config, {**overrides, **given})


def _job(args: argparse.Namespace) -> int:
    module, runner, cls = JOBS[args.command]
    cfg = _resolved(args, getattr(config, cls))
    if args.print_config:
        print(config.dumps(cfg))
        return 0
    runner = getattr(importlib.import_module(module), runner)
    # After Ray Data configured its logging on import: our progress line says what a person
    # needs, Ray Data's INFO lines restate its execution plan on every run.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
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


COMPARE_HELP = (
    "overlay the layer curves of finished runs (every CNN and word model in them) on relative depth in one figure, "
    "significant layers filled; reads the runs, writes only under --out"
)


def _compare(args: argparse.Namespace) -> int:
    from semprobe.ray_jobs.compare import run_compare

    cfg = _resolved(args, config.CompareConfig, runs=args.runs or None)  # RUN... over a config file's runs
    if args.print_config:
        print(config.dumps(cfg))
        return 0
    run_compare(cfg, log=lambda m: print(m, file=sys.stderr))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from semprobe.ray_jobs.bench import BENCHMARKS, bench_all, markdown, table_rows, with_defaults

    if args.bench == "all":
        report = bench_all(args, log=lambda m: print(m, file=sys.stderr))
        print(markdown(report["rows"]))
        print(f"\nwrote {os.path.join(args.results, 'bench.json')} and {os.path.join(args.results, 'bench.md')}")
    else:
        report = BENCHMARKS[args.bench](with_defaults(args.bench, args))
        print(json.dumps(report, indent=2))
        print("\n" + markdown(table_rows(report)))
    return 0


WORDS_CONVERT_HELP = (
    "convert a word2vec, glove or fasttext file (.gz included; local, s3://, gs://, file://) into a memory-mapped "
    ".npy matrix + Parquet word index, the layout of glove-50d; then --words table:DEST maps it instead of scanning "
    "the text (jobs do the same on their own in --word-cache)"
)


def _words(args: argparse.Namespace) -> int:
    from semprobe.datasets.words import convert_word_file

    meta = convert_word_file(args.src, args.dest)
    print(json.dumps(meta, indent=2, sort_keys=True))
    print(f"\nuse it as --words {meta['name']}", file=sys.stderr)
    return 0


MODELS_HELP = (
    "list a model's layers of the chosen kinds with their output shapes and feature counts, from one forward pass "
    "of a zero image at the model's input size (no weights loaded, no images read): choose --layers before a job"
)


def _models(args: argparse.Namespace) -> int:
    from semprobe.actors.layers import LAYER_KINDS, LayerCatalog
    from semprobe.actors.zoo import untrained

    loaded = untrained(args.name)  # shapes do not depend on the weights: nothing is downloaded
    size = loaded.preprocess.size
    catalog = LayerCatalog(loaded.module, size)
    layers = catalog.select(args.layers, args.tokens)
    rows = [
        {"layer_index": x.layer_index, "name": x.name, "kind": x.kind, "shape": list(x.shape), "features": x.dim}
        for x in layers
    ]
    counts = {k: len(catalog.kinds[k]) for k in LAYER_KINDS if k in catalog.kinds}
    if args.json:
        print(json.dumps({"model": loaded.name, "input": [3, size, size], "layers": rows, "kinds": counts}, indent=2))
        return 0
    print(f"{loaded.name}: {len(rows)} layers of '{args.layers}', input 3x{size}x{size} (tokens: {args.tokens})")
    table = [("index", "layer", "kind", "shape", "features")] + [
        (str(r["layer_index"]), r["name"], r["kind"], "x".join(map(str, r["shape"])), str(r["features"])) for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(5)]
    for row in table:
        print("  ".join(c.rjust(w) if i in (0, 4) else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
    print("kinds: " + ", ".join(f"{k} {n}" for k, n in counts.items()))
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")  # foolbox imports GitPython; git may be absent
    parser = argparse.ArgumentParser(
        prog="semprobe", description="What do CNN layers know? Held against word embeddings, on Ray."
    )
    parser.add_argument("--version", action="version", version=f"semprobe {semprobe.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command, (_, _, cls) in JOBS.items():
        p = sub.add_parser(command, help=JOB_HELP[command], description=JOB_HELP[command])
        add_options(p, getattr(config, cls))
        p.set_defaults(func=_job)
    c = sub.add_parser("compare", help=COMPARE_HELP, description=COMPARE_HELP)
    c.add_argument("runs", nargs="*", metavar="RUN", help="output folders of finished semprobe runs")
    add_options(c, config.CompareConfig)
    c.set_defaults(func=_compare)
    b = sub.add_parser(
        "bench", help="benchmarks, each figure beside its floor (the bare operation, measured in the same run)"
    )
    b.add_argument(
        "bench", choices=["all", "extract", "twovtwo", "permutations", "analysis", "affine", "attack", "train", "words"]
    )
    b.add_argument(
        "--words-mb", type=float, dest="words_mb", help="words: size of the generated word file in MB (default 200)"
    )
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
    w = sub.add_parser("words", help="word-model files: convert text and binary files into memory-mapped tables")
    convert = w.add_subparsers(dest="words_command", required=True).add_parser(
        "convert", help=WORDS_CONVERT_HELP, description=WORDS_CONVERT_HELP
    )
    convert.add_argument("src", metavar="SRC", help="word2vec:PATH, glove:PATH or fasttext:PATH")
    convert.add_argument("dest", metavar="DEST", help="a new (or empty) folder, local or a URI; written whole or not")
    convert.set_defaults(func=_words)
    m = sub.add_parser("models", help=MODELS_HELP, description=MODELS_HELP)
    m.add_argument("name", metavar="NAME", help=f"the model: {config.MODEL_HELP}")
    m.add_argument("--layers", default="blocks", help=f"{config.LAYERS_HELP} (default: blocks)")
    m.add_argument(
        "--tokens",
        default="all",
        choices=config.TOKENS,
        help="a transformer's token sequences: all tokens, or the class token alone (default: all)",
    )
    m.add_argument("--json", action="store_true", help="print the listing as JSON")
    m.set_defaults(func=_models)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except InputError as err:
        print(f"semprobe: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
