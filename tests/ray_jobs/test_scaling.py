"""The scaling model: the work counted off the real architectures, and the projection's arithmetic."""

import pytest

from semprobe.ray_jobs.scaling import (
    ADVERSARIAL,
    AFFINE,
    NN2021,
    Node,
    architecture,
    measured,
    minutes,
    projection,
    work,
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
            "benchmark": "analysis",
            "kernels": [
                {"device": "cpu", "precision": "fp64", "tflops": 0.03, "ratio": 0.5},
                {"device": "cpu", "precision": "fp32", "tflops": 0.05, "ratio": 0.4},
            ],
            "real": {"fraction": 0.002},
        },
        {"benchmark": "affine", "accumulate_gflops": 40.0, "ratio": 0.9, "solve_s_per_map": 1.5},
        {"benchmark": "attack", "figure_ms_per_image_iteration": 200.0},
    ],
}


def test_nn2021_is_the_packaged_config_and_its_work_is_counted_off_the_architectures():
    assert NN2021 == {
        "models": ["torchvision:resnet50", "torchvision:inception_v3"],
        "layers": "pixels,activations,mixed",
        "concepts": 838,
        "sets": 5,
        "word_models": 6,
        "permutations": 1000,
    }
    nn, adversarial, affine = (dict(parts) for parts in work().values())
    w, k = 838, 5
    arch = [architecture(m, NN2021["layers"]) for m in NN2021["models"]]
    assert [a[1] for a in arch] == [50, 106]  # pixels + 49 activations; pixels + 94 activations + 11 mixed
    products = 156 * 5 * 6 * 1001  # the count: about 4.7 M products, 5.5 PFLOP
    stats = next(v for s, v in nn.items() if s.startswith("2 vs. 2 and permutations"))
    assert stats == (products * 2 * w**3, "statistics") and 5.4e15 < stats[0] < 5.6e15
    assert nn["fp32's float64 recheck"] == (products * w * (w - 1) // 2 * 8 * w, "recheck")
    assert nn["extraction"] == (pytest.approx(w * k * sum(a[0] for a in arch) * 1e9), "forward")
    assert nn["Gram matrices"] == (sum(k * 2 * w * w * a[2] for a in arch), "gram")
    inception = architecture(ADVERSARIAL["model"])[0]
    assert adversarial["attack"] == (pytest.approx(600 * 20 * 3 * inception * 1e9), "forward")
    assert affine["solve 90 maps"] == (90, "solve")
    width = sum(architecture(m)[3] for m in AFFINE["models"]) + 1
    assert affine["Gram accumulation"] == (1_281_167 * 2 * width * width, "gram")


def test_projection_is_assumed_peaks_times_measured_efficiencies():
    node = Node("test", count=2, gpus=4, gpu="X", fp64_tflops=10.0, fp32_tflops=80.0, forward_tflops=30.0,
                dollars_per_hour=6.0)  # fmt: skip
    got = minutes(BENCH, (node,))
    lite0 = architecture("efficientnet_lite0")[0]
    rate = {
        "here": {"forward": 10 * lite0 * 1e9, "gram": 40e9, "statistics": 30e9},
        "test:fp64": {"forward": 8 * 30e12, "gram": 8 * 80e12 * 0.9, "statistics": 8 * 10e12 * 0.5},
        "test:fp32": {"forward": 8 * 30e12, "gram": 8 * 80e12 * 0.9, "statistics": 8 * 80e12 * 0.4},
    }
    for experiment, stages in work().items():
        for stage, (amount, kind) in stages.items():
            for col, r in rate.items():
                if kind in r:
                    assert got[experiment][stage][col] == pytest.approx(amount / r[kind] / 60)
            if kind == "recheck":  # fp32 only: the rechecked fraction of pairs at the fp64 rate
                assert got[experiment][stage]["test:fp64"] == got[experiment][stage]["here"] == 0
                assert got[experiment][stage]["test:fp32"] == pytest.approx(amount * 0.002 / (8 * 10e12 * 0.5) / 60)
            if kind == "solve":  # one reducer, wherever it runs
                assert got[experiment][stage]["test:fp32"] == pytest.approx(amount * 1.5 / 60)
    table = projection(BENCH, (node,))
    assert "2 x test: 4 x X each, fp64 10 TFLOP/s, fp32 (TF32) 80 TFLOP/s" in table
    assert "0.50 (fp64) and 0.40 (fp32) of the plain product's rate on this machine's CPU" in table
    nn = got[next(iter(got))]
    total = sum(h["test:fp32"] for h in nn.values())
    assert f"{total:.3g} (${total / 60 * 12.0:,.2f})" in table.split("total (cost)")[1].splitlines()[0]


def test_a_gpu_measurement_replaces_the_cpu_efficiency():
    bench = {**BENCH, "results": [dict(r) for r in BENCH["results"]]}
    analysis = next(r for r in bench["results"] if r["benchmark"] == "analysis")
    analysis["kernels"] = analysis["kernels"] + [
        {"device": "cuda:0", "precision": "fp64", "tflops": 40.0, "ratio": 0.7},
        {"device": "cuda:0", "precision": "fp32", "tflops": 300.0, "ratio": 0.65},
    ]
    m = measured(bench)
    assert (m["stacked_ratio_fp64"], m["stacked_ratio_fp32"], m["ratio_measured_on"]) == (0.7, 0.65, "a GPU")
    assert m["stacked_gflops_fp64"] == 30.0  # this machine's own rate stays the CPU's
