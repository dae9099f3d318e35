"""The scaling model: the papers' full experiments projected onto N GPU nodes from the benchmarks' per-unit costs.

Every per-unit cost is one ``semprobe bench all`` measured on this machine; the work of each stage is counted
from the real architectures (their layers' widths from the layer catalog, their forward FLOPs from
``torch.utils.flop_counter``), untrained, so nothing is downloaded. What is *assumed*, and stated with the
table: how much faster a GPU node runs the CNN stages than this machine (``gpu_factor``), that its CPUs run
the statistics at this machine's per-core speed, and its price. Stages add up (an upper bound: in the job
they overlap), and the largest one bounds the experiment.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from semprobe.actors.layers import LayerCatalog
from semprobe.actors.zoo import untrained

# The experiments as the papers ran them.
NN2021 = {
    "models": ["torchvision:resnet50", "torchvision:inception_v3", "torchvision:vgg16"],
    "concepts": 838,
    "sets": 5,
    "word_models": 6,
    "permutations": 1000,
}
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


@dataclass
class Node:
    """One GPU worker node of cluster.yaml (g5.2xlarge: 1 A10G, 8 vCPU = 4 cores)."""

    name: str = "g5.2xlarge"
    gpu_factor: float = 50.0  # assumed: CNN forward/backward on its GPU vs the whole of this machine's CPU
    cores: int = 4
    dollars_per_hour: float = 1.212  # us-west-2 on-demand; spot is about 40% of it


@functools.cache
def architecture(name: str) -> tuple[float, int, int, int]:
    """(forward GFLOPs per image, activation layers, their values per image, feature width) of an untrained model."""
    loaded = untrained(name)
    module, size = loaded.module.eval(), loaded.preprocess.size
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(torch.zeros(1, 3, size, size))
    layers = LayerCatalog(module, size).select("activations")
    width = next(m for m in reversed(list(module.modules())) if isinstance(m, torch.nn.Linear)).in_features
    return counter.get_total_flops() / 1e9, len(layers), sum(layer.dim for layer in layers), width


def unit_costs(bench: dict) -> dict[str, float]:
    """Per-unit costs on this machine, from one ``bench all`` report."""
    by = {r["benchmark"]: r for r in bench["results"]}
    lite0_gflops = architecture("efficientnet_lite0")[0]
    perms = next(r for r in by["permutations"]["results"] if r["threads"] == "all cores")
    return {
        "extract_gflops": by["extract"]["figure_images_per_s"] * lite0_gflops,  # forward + capture + store, effective
        "attack_gflops": lite0_gflops / (by["attack"]["figure_ms_per_image_iteration"] / 1e3),  # per forward-equivalent
        "gram_gflops": by["affine"]["accumulate_gflops"],
        "seconds_per_permutation": perms["permutation_null_s"] / by["permutations"]["permutations"],  # w = 838, one set
        "permutation_w": by["permutations"]["w"],
        "cores": bench["machine"]["cpus"],
        "solve_seconds_per_map": by["affine"]["solve_s_per_map"],
    }


def stages(costs: dict[str, float]) -> dict[str, dict[str, tuple[float, str]]]:
    """Each experiment's stages: (seconds on this machine, 'gpu' or 'cpu')."""
    e = NN2021
    w, k = e["concepts"], e["sets"]
    extract = sum(w * k * architecture(m)[0] for m in e["models"]) / costs["extract_gflops"]
    gram = sum(k * 2 * w * w * architecture(m)[2] for m in e["models"]) / 1e9 / costs["gram_gflops"]
    scale = (w / costs["permutation_w"]) ** 3  # a permutation is one w x w x w product per set
    layers = sum(architecture(m)[1] for m in e["models"])
    perms = layers * e["word_models"] * k * e["permutations"] * costs["seconds_per_permutation"] * scale
    a = ADVERSARIAL
    gflops_a = architecture(a["model"])[0]
    attack = a["images"] * a["steps"] * gflops_a / costs["attack_gflops"]
    adv_extract = 2 * a["images"] * gflops_a / costs["extract_gflops"]  # the adversarial and the clean images
    f = AFFINE
    forward = f["images"] * sum(architecture(m)[0] for m in f["models"]) / costs["extract_gflops"]
    width = sum(architecture(m)[3] for m in f["models"]) + 1
    accumulate = f["images"] * 2 * width * width / 1e9 / costs["gram_gflops"]
    n = len(f["models"])
    solve = n * (n - 1) * costs["solve_seconds_per_map"]
    return {
        f"2 vs. 2 (NN 2021): {w} concepts x {k} sets x {len(e['models'])} CNNs ({layers} layers) x "
        f"{e['word_models']} word models "
        f"x {e['permutations']} permutations": {
            "extraction": (extract, "gpu"),
            "Gram matrices": (gram, "cpu"),
            "2 vs. 2 and permutations": (perms, "cpu"),
        },
        f"adversarial (NN 2021): {a['images']} MIM attacks on Inception-v3, {a['steps']} steps, then extraction": {
            "attack": (attack, "gpu"),
            "extraction": (adv_extract, "gpu"),
        },
        f"affine maps (thesis): {n} CNNs x {f['images']:,} training images, Gram width {width}": {
            "forward passes": (forward, "gpu"),
            "Gram accumulation": (accumulate, "cpu"),
            f"solve {n * (n - 1)} maps": (solve, "solve"),
        },
    }


def hours(costs: dict[str, float], nodes: tuple[int, ...], node: Node) -> dict[str, dict[str, dict]]:
    """Per experiment and stage: hours on this machine (``"here"``) and on each N of ``nodes`` GPU nodes.
    CNN stages run ``gpu_factor`` times faster per node, statistics at the node's cores over this machine's,
    and both spread over the N nodes; one reducer solves the affine maps."""
    speed = {"gpu": node.gpu_factor, "cpu": node.cores / costs["cores"], "solve": 1.0}
    return {
        experiment: {
            stage: {
                "here": seconds / 3600,
                **{n: seconds / 3600 / speed[kind] / (1 if kind == "solve" else n) for n in nodes},
            }
            for stage, (seconds, kind) in parts.items()
        }
        for experiment, parts in stages(costs).items()
    }


def projection(bench: dict, nodes: tuple[int, ...] = (1, 8, 32), node: Node | None = None) -> str:
    """The Markdown table of the projection: stages add up (an upper bound: in the job they overlap),
    and the largest on the most nodes bounds the experiment."""
    node = node or Node()
    costs = unit_costs(bench)
    lines = [
        f"Projected on N {node.name} nodes (assumed: a GPU node runs CNN stages {node.gpu_factor:g}x as fast as this "
        f"{costs['cores']}-CPU machine, its {node.cores} cores run the statistics at this machine's per-core speed, "
        f"${node.dollars_per_hour}/h each). Hours per stage on N nodes; the bounding stage in bold.",
        "",
        "| experiment | stage | this machine (h) | " + " | ".join(f"N={n} (h)" for n in nodes) + " |",
        "|---|---|---|" + "---|" * len(nodes),
    ]
    for experiment, by_stage in hours(costs, nodes, node).items():
        bound = max(by_stage, key=lambda s: by_stage[s][nodes[-1]])
        for i, (stage, h) in enumerate(by_stage.items()):
            name = f"**{stage}**" if stage == bound else stage
            lines.append(
                f"| {experiment if i == 0 else ''} | {name} | {h['here']:.3g} | "
                + " | ".join(f"{h[n]:.3g}" for n in nodes)
                + " |"
            )
        totals = {n: sum(h[n] for h in by_stage.values()) for n in nodes}
        lines.append(
            "| | total (cost) | | "
            + " | ".join(f"{totals[n]:.3g} (${totals[n] * n * node.dollars_per_hour:,.0f})" for n in nodes)
            + " |"
        )
    return "\n".join(lines)
