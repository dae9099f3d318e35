"""The scaling model: the work counted off the real architectures, and the projection's arithmetic."""

import pytest

from semprobe.ray_jobs.scaling import (
    ADVERSARIAL,
    AFFINE,
    NN2021,
    Node,
    architecture,
    hours,
    projection,
    stages,
    unit_costs,
)


def resnet50_activation_values() -> int:
    """Every ReLU output of ResNet-50 (v1.5, stride in the 3x3 conv) at 224 px, from the stage table of He et
    al. 2016."""
    total = 64 * 112 * 112  # stem
    side = 56
    for blocks, width in ((3, 64), (4, 128), (6, 256), (3, 512)):
        out = side if width == 64 else side // 2
        total += width * side * side + width * out * out + 4 * width * out * out  # first block: 1x1 at the input size
        total += (blocks - 1) * (width + width + 4 * width) * out * out
        side = out
    return total


def test_architectures_match_the_published_counts():
    gflops, n_layers, values, width = architecture("torchvision:resnet50")
    assert gflops == pytest.approx(2 * 4.09, rel=0.005)  # 4.09 G multiply-adds (torchvision's model card)
    assert (n_layers, values, width) == (1 + 16 * 3, resnet50_activation_values(), 2048)
    gflops, _, _, width = architecture("torchvision:inception_v3")
    assert gflops == pytest.approx(2 * 5.71, rel=0.005) and width == 2048  # at 299 px


BENCH = {
    "machine": {"cpus": 2},
    "results": [
        {"benchmark": "extract", "figure_images_per_s": 10.0},
        {
            "benchmark": "permutations",
            "w": 419,
            "permutations": 100,
            "results": [
                {"threads": "1 thread", "permutation_null_s": 9.0},
                {"threads": "all cores", "permutation_null_s": 2.0},
            ],
        },
        {"benchmark": "affine", "accumulate_gflops": 40.0, "solve_s_per_map": 1.5},
        {"benchmark": "attack", "figure_ms_per_image_iteration": 200.0},
    ],
}


def test_stages_from_the_per_unit_costs():
    lite0 = architecture("efficientnet_lite0")[0]
    costs = unit_costs(BENCH)
    assert costs["extract_gflops"] == pytest.approx(10 * lite0) and costs["attack_gflops"] == pytest.approx(lite0 / 0.2)
    nn, adversarial, affine = (dict(parts) for parts in stages(costs).values())
    w, k, models = NN2021["concepts"], NN2021["sets"], NN2021["models"]
    arch = {m: architecture(m) for m in models}
    assert nn["extraction"] == (pytest.approx(w * k * sum(a[0] for a in arch.values()) / (10 * lite0)), "gpu")
    assert nn["Gram matrices"] == (pytest.approx(sum(k * 2 * w * w * a[2] for a in arch.values()) / 40e9), "cpu")
    # one permutation of one set at w = 838 is eight of those measured at w = 419 (a w^3 product), 0.02 s each
    assert nn["2 vs. 2 and permutations"] == (
        pytest.approx(sum(a[1] for a in arch.values()) * 6 * 5 * 1000 * 8 * 0.02),
        "cpu",
    )
    inception = architecture(ADVERSARIAL["model"])[0]
    assert adversarial["attack"] == (pytest.approx(600 * 20 * inception * 0.2 / lite0), "gpu")
    assert adversarial["extraction"] == (pytest.approx(1200 * inception / (10 * lite0)), "gpu")
    assert affine["solve 90 maps"] == (pytest.approx(135.0), "solve")
    width = sum(architecture(m)[3] for m in AFFINE["models"]) + 1
    assert affine["Gram accumulation"] == (pytest.approx(1_281_167 * 2 * width * width / 40e9), "cpu")


def test_projection_spreads_each_stage_over_the_nodes():
    node = Node(gpu_factor=25.0, cores=8, dollars_per_hour=2.0)
    costs = unit_costs(BENCH)
    got = hours(costs, (1, 4), node)
    for experiment, parts in stages(costs).items():
        for stage, (seconds, kind) in parts.items():
            h = got[experiment][stage]
            speed = {"gpu": 25.0, "cpu": 8 / 2, "solve": 1.0}[kind]
            assert h["here"] == pytest.approx(seconds / 3600)
            assert h[1] == pytest.approx(seconds / 3600 / speed)
            assert h[4] == pytest.approx(h[1] if kind == "solve" else h[1] / 4)  # one reducer solves the maps
    table = projection(BENCH, (1, 4), node)
    nn = got[next(iter(got))]
    total = sum(h[4] for h in nn.values())
    assert f"{total:.3g} (${total * 4 * 2.0:,.0f})" in table.split("total (cost)")[1].splitlines()[0]
    bound = max(nn, key=lambda s: nn[s][4])
    assert f"**{bound}**" in table
