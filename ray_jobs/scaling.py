"""The scaling model: the papers' full experiments projected onto GPU nodes from the benchmarks' measured rates.

The work of each stage is counted from the real architectures (their layers' widths from the layer catalog,
their forward FLOPs from ``torch.utils.flop_counter``), untrained, so nothing is downloaded; NN 2021's models,
word models, sets and permutations are the packaged ``nn2021-imagenet`` config's. Each stage's rate on a node
is an *assumed* peak (the GPU's datasheet TFLOP/s for the kind of product it does, and the node's price)
times a *measured* efficiency (what ``semprobe bench all`` measured against the plain product on this
machine, or on a GPU where it ran on one). Both are stated beside the table. Stages add up (an upper bound:
in the job they overlap).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources

import tomllib
import torch
from torch.utils.flop_counter import FlopCounterMode

from semprobe.actors.layers import LayerCatalog
from semprobe.actors.zoo import untrained


def _nn2021() -> dict:
    """The NN 2021 experiment as the packaged config runs it, with the paper's 838 concepts."""
    cfg = tomllib.loads(resources.files("semprobe.ray_jobs").joinpath("configs/nn2021-imagenet.toml").read_text())
    return {
        "models": [m.split("?")[0] for m in cfg["models"]],
        "layers": cfg["layers"],
        "concepts": 838,
        "sets": cfg["sets"],
        "word_models": len(cfg["words"]),
        "permutations": cfg["permutations"],
    }


NN2021 = _nn2021()
ADVERSARIAL = {"model": "torchvision:inception_v3", "images": 600, "steps": 20}
AFFINE = {
    "models": [
        "torchvision:" + m
        for m in (
            "vgg16",
            "vgg19",
            "resnet50",
            "resnet101",
            "resnet152",
            "densenet121",
            "densenet169",
            "densenet201",
            "inception_v3",
            "resnext50_32x4d",
        )
    ],
    "images": 1_281_167,
}


@dataclass(frozen=True)
class Node:
    """A kind of node and how many: its GPUs' assumed datasheet peaks (dense TFLOP/s per GPU) and price."""

    name: str
    count: int
    gpus: int  # per node
    gpu: str
    fp64_tflops: float  # the products of --precision fp64
    fp32_tflops: float  # the products of --precision fp32: TF32 tensor cores
    forward_tflops: float  # assumed effective rate of a CNN forward pass (cuDNN, mixed kernels) per GPU
    dollars_per_hour: float  # per node, on demand


# One 8-GPU node, and the GPU workers of cluster.yaml at their max_workers (its CPU workers run what GPUs do not).
EIGHT_GPU_NODE = Node("p5.48xlarge", 1, 8, "H100 SXM", 67.0, 495.0, 150.0, 98.32)
FLEET = Node("g5.2xlarge", 8, 1, "A10G", 31.2 / 64, 62.5, 20.0, 1.212)  # GA102: fp64 at 1/64 of fp32
NODES = (EIGHT_GPU_NODE, FLEET)


@functools.cache
def architecture(name: str, layers: str = "activations") -> tuple[float, int, int, int]:
    """(forward GFLOPs per image, chosen layers, their values per image, feature width) of an untrained model,
    built on the meta device: shapes and FLOPs without initialising a weight or computing a value."""
    with torch.device("meta"):
        loaded = untrained(name)
    module, size = loaded.module.eval(), loaded.preprocess.size
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(torch.zeros(1, 3, size, size, device="meta"))
    chosen = LayerCatalog(module, size).select(layers)
    width = next(m for m in reversed(list(module.modules())) if isinstance(m, torch.nn.Linear)).in_features
    return counter.get_total_flops() / 1e9, len(chosen), sum(layer.dim for layer in chosen), width


def measured(bench: dict) -> dict[str, float | str]:
    """The rates one ``bench all`` report measured: this machine's, and the efficiencies carried to GPUs."""
    by = {r["benchmark"]: r for r in bench["results"]}
    lite0_gflops = architecture("efficientnet_lite0")[0]
    kernels = by["analysis"]["kernels"]
    gpu = [k for k in kernels if k["device"].startswith("cuda")]
    on = gpu or [k for k in kernels if k["device"] == "cpu"]
    ratio = {k["precision"]: k["ratio"] for k in on}
    here = {k["precision"]: k["tflops"] * 1e3 for k in kernels if k["device"] == "cpu"}
    return {
        "extract_gflops": by["extract"]["figure_images_per_s"] * lite0_gflops,  # forward + capture + store
        "attack_gflops": lite0_gflops / (by["attack"]["figure_ms_per_image_iteration"] / 1e3),
        "gram_gflops": by["affine"]["accumulate_gflops"],
        "gram_ratio": by["affine"]["ratio"],
        "stacked_gflops_fp64": here["fp64"],
        "stacked_ratio_fp64": ratio["fp64"],
        "stacked_ratio_fp32": ratio["fp32"],
        "ratio_measured_on": "a GPU" if gpu else "this machine's CPU",
        "recheck_fraction": by["analysis"]["real"]["fraction"],
        "solve_seconds_per_map": by["affine"]["solve_s_per_map"],
    }


def work() -> dict[str, dict[str, tuple[float, str]]]:
    """Each experiment's stages: (FLOP, kind of product). Kinds: forward (CNN passes on the GPUs), gram
    (float32 Gram products), fp64 / fp32 (the statistics' stacked products), solve (one reducer's solves)."""
    e = NN2021
    w, k = e["concepts"], e["sets"]
    arch = {m: architecture(m, e["layers"]) for m in e["models"]}
    layers = sum(a[1] for a in arch.values())
    products = layers * k * e["word_models"] * (e["permutations"] + 1)  # observed + each permutation
    a = ADVERSARIAL
    gflops_a = architecture(a["model"])[0]
    f = AFFINE
    width = sum(architecture(m)[3] for m in f["models"]) + 1
    n = len(f["models"])
    return {
        f"2 vs. 2 (NN 2021): {w} concepts x {k} sets x {len(arch)} CNNs ({layers} layers) x {e['word_models']} word "
        f"models x {e['permutations']} permutations, --store similarity": {
            "extraction": (w * k * sum(v[0] for v in arch.values()) * 1e9, "forward"),
            "Gram matrices": (sum(k * 2 * w * w * v[2] for v in arch.values()), "gram"),
            f"2 vs. 2 and permutations ({products / 1e6:.2f} M products)": (products * 2 * w**3, "statistics"),
            # fp32 only: a rechecked pair's four float64 dot products of length w
            "fp32's float64 recheck": (products * w * (w - 1) // 2 * 8 * w, "recheck"),
        },
        f"adversarial (NN 2021): {a['images']} MIM attacks on Inception-v3, {a['steps']} steps, then extraction": {
            "attack": (a["images"] * a["steps"] * 3 * gflops_a * 1e9, "forward"),  # forward + backward
            "extraction": (2 * a["images"] * gflops_a * 1e9, "forward"),  # the adversarial and the clean images
        },
        f"affine maps (thesis): {n} CNNs x {f['images']:,} training images, Gram width {width}": {
            "forward passes": (f["images"] * sum(architecture(m)[0] for m in f["models"]) * 1e9, "forward"),
            "Gram accumulation": (f["images"] * 2 * width * width, "gram"),
            f"solve {n * (n - 1)} maps": (n * (n - 1), "solve"),
        },
    }


def rates(node: Node, m: dict, precision: str) -> dict[str, float]:
    """FLOP/s of each kind of work on ``node`` (all its nodes together) in ``precision``; "solve": maps per
    second; "recheck": the float64 rate over the fraction of pairs rechecked (none in fp64)."""
    gpus = node.gpus * node.count
    peak = node.fp64_tflops if precision == "fp64" else node.fp32_tflops
    fp64 = gpus * node.fp64_tflops * m["stacked_ratio_fp64"] * 1e12
    return {
        "forward": gpus * node.forward_tflops * 1e12,
        "gram": gpus * node.fp32_tflops * m["gram_ratio"] * 1e12,
        "statistics": gpus * peak * m[f"stacked_ratio_{precision}"] * 1e12,
        "recheck": float("inf") if precision == "fp64" else fp64 / m["recheck_fraction"],  # the pairs rechecked
        "solve": 1 / m["solve_seconds_per_map"],
    }


def here(m: dict) -> dict[str, float]:
    """FLOP/s of each kind of work on this machine, as measured."""
    return {
        "forward": m["extract_gflops"] * 1e9,
        "gram": m["gram_gflops"] * 1e9,
        "statistics": m["stacked_gflops_fp64"] * 1e9,
        "recheck": float("inf"),  # fp64 here
        "solve": 1 / m["solve_seconds_per_map"],
    }


def minutes(bench: dict, nodes: tuple[Node, ...] = NODES) -> dict[str, dict[str, dict[str, float]]]:
    """Per experiment and stage: minutes on this machine ("here") and on each node in fp64 and fp32."""
    m = measured(bench)
    columns = {"here": here(m)} | {f"{node.name}:{p}": rates(node, m, p) for node in nodes for p in ("fp64", "fp32")}
    return {
        experiment: {
            stage: {col: amount / r[kind] / 60 for col, r in columns.items()}
            for stage, (amount, kind) in stages.items()
        }
        for experiment, stages in work().items()
    }


def projection(bench: dict, nodes: tuple[Node, ...] = NODES) -> str:
    """The projection as Markdown: its assumptions and measured rates, then minutes per stage with each total's
    cost."""
    m = measured(bench)
    lines = ["Projection of the papers' full experiments. Assumed (datasheet peaks, dense; on-demand prices):"]
    for node in nodes:
        lines.append(
            f"- {node.count} x {node.name}: {node.gpus} x {node.gpu} each, fp64 {node.fp64_tflops:g} TFLOP/s, "
            f"fp32 (TF32) {node.fp32_tflops:g} TFLOP/s, CNN forward {node.forward_tflops:g} TFLOP/s per GPU, "
            f"${node.dollars_per_hour:g}/h per node"
        )
    lines.append("- not counted: decoding the images and storage I/O (the node's CPUs and network), nor start-up")
    lines += [
        f"Measured (`semprobe bench all`): the stacked 2 vs. 2 runs at {m['stacked_ratio_fp64']:.2f} (fp64) and "
        f"{m['stacked_ratio_fp32']:.2f} (fp32) of the plain product's rate on {m['ratio_measured_on']}, the Gram at "
        f"{m['gram_ratio']:.2f}; fp32 rechecks {m['recheck_fraction']:.3%} of pairs (on real activations), each with "
        f"8w float64 operations at the fp64 rate; this machine (fp64): "
        f"extraction {m['extract_gflops']:.1f} GFLOP/s, statistics {m['stacked_gflops_fp64']:.1f} GFLOP/s, Gram "
        f"{m['gram_gflops']:.1f} GFLOP/s; one reducer solves a map in {m['solve_seconds_per_map']:.2f} s.",
        "",
        "| experiment | stage | this machine (min) | "
        + " | ".join(f"{n.count} x {n.name} {p} (min)" for n in nodes for p in ("fp64", "fp32"))
        + " |",
        "|---|---|---|" + "---|" * (2 * len(nodes)),
    ]
    cols = [f"{n.name}:{p}" for n in nodes for p in ("fp64", "fp32")]
    price = {f"{n.name}:{p}": n.count * n.dollars_per_hour for n in nodes for p in ("fp64", "fp32")}
    for experiment, by_stage in minutes(bench, nodes).items():
        for i, (stage, h) in enumerate(by_stage.items()):
            lines.append(
                f"| {experiment if i == 0 else ''} | {stage} | {h['here']:.3g} | "
                + " | ".join(f"{h[c]:.3g}" for c in cols)
                + " |"
            )
        totals = {c: sum(h[c] for h in by_stage.values()) for c in ["here", *cols]}
        lines.append(
            f"| | total (cost) | {totals['here']:.3g} | "
            + " | ".join(f"{totals[c]:.3g} (${totals[c] / 60 * price[c]:,.2f})" for c in cols)
            + " |"
        )
    return "\n".join(lines)
