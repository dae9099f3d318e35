"""The statistics kernels' benchmark on every torch device present: the stacked 2 vs. 2 permutation product
rate against the device's plain matmul rate, in fp64 and fp32.

It imports neither Ray nor polars, so it runs on a bare GPU node as ``python -m semprobe.ray_jobs.kernel_bench``
(torch, numpy and scipy are all it needs); ``semprobe bench analysis`` calls it too.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from semprobe.analysis.kernels import stacked_two_vs_two
from semprobe.analysis.precision import PRECISIONS, dtype_of

# The stacked problem measured: L image matrices x M word matrices x n_perm permutations at w = 838.
CPU_SIZES = {"w": 838, "images": 4, "words": 2, "permutations": 10}
GPU_SIZES = {"w": 838, "images": 40, "words": 6, "permutations": 50}
QUICK_SIZES = {"w": 60, "images": 3, "words": 2, "permutations": 5}


def devices() -> list[str]:
    """The CPU and every CUDA device present."""
    return ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _seconds(fn, device: str, repeats: int = 1) -> float:
    """The best of ``repeats`` timed calls after one warm-up call: kernels, caches and clocks are warm."""
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def related_matrices(w: int, n: int, seed: int) -> list[np.ndarray]:
    """n (w, w) correlation matrices of 300-d features sharing one component, as real similarity matrices do."""
    rng = np.random.default_rng(seed)
    shared = rng.standard_normal((w, 300))
    return [np.corrcoef(0.5 * shared + rng.standard_normal((w, 300))) for _ in range(n)]


def plain_rate(device: str, precision: str, w: int, rows: int) -> float:
    """TFLOP/s of the plain product the stacked kernel is built on: (rows, w) @ (w, w) in ``precision`` (fp32:
    TF32 allowed on CUDA, as the kernel allows it)."""
    dtype = dtype_of(precision)
    x = torch.randn(rows, w, dtype=dtype, device=device)
    y = torch.randn(w, w, dtype=dtype, device=device)
    out = torch.empty(rows, w, dtype=dtype, device=device)
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "fp32"
    try:
        seconds = _seconds(lambda: torch.mm(x, y, out=out), device, repeats=5)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    return 2 * rows * w * w / seconds / 1e12


def stacked_rate(device: str, precision: str, sizes: dict) -> dict:
    """The stacked permutation product's rate (TFLOP/s of its w x w x w products) and its recheck fraction."""
    w, n_img, n_word, n_perm = (sizes[k] for k in ("w", "images", "words", "permutations"))
    images, words = related_matrices(w, n_img, 0), related_matrices(w, n_word, 1)
    result = {}

    def run():
        result["tests"] = stacked_two_vs_two(images, words, n_perm, seed=0, device=device, precision=precision)

    seconds = _seconds(run, device)
    products = n_img * n_word * n_perm
    tests = result["tests"]
    return {
        "seconds": seconds,
        "tflops": 2 * w**3 * products / seconds / 1e12,
        "products": products,
        "rechecked_fraction": tests.rechecked / tests.decided,
    }


def kernel_results(quick: bool = False) -> list[dict]:
    """One result per (device, precision): the stacked rate beside the plain rate, and their ratio."""
    results = []
    for device in devices():
        sizes = QUICK_SIZES if quick else (CPU_SIZES if device == "cpu" else GPU_SIZES)
        name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
        for precision in PRECISIONS:
            stacked = stacked_rate(device, precision, sizes)
            plain = plain_rate(
                device, precision, sizes["w"], sizes["words"] * min(sizes["permutations"], 64) * sizes["w"]
            )
            results.append(
                {"device": device, "device_name": name, "precision": precision, **sizes, **stacked,
                 "plain_tflops": plain, "ratio": stacked["tflops"] / plain}
            )  # fmt: skip
    return results


def check(sizes: tuple[int, ...] = (9, 60, 838), n_perm: int = 20) -> list[dict]:
    """On every device and precision: do the kernels decide every pair, and count every permutation's passes,
    exactly as the numpy reference? The device check of a machine without pytest or Ray."""
    from semprobe.analysis import kernels, twovtwo

    rows = []
    for w in sizes:
        a, a2, b = related_matrices(w, 3, w)
        ref = twovtwo.two_vs_two(a, b).passed
        null = twovtwo.permutation_null([a, a2], b, n_perm, seed=1).passes
        for device in devices():
            for precision in PRECISIONS:
                got = kernels.two_vs_two(a, b, device, precision).passed
                stacked = kernels.permutation_null([a, a2], b, n_perm, seed=1, device=device, precision=precision)
                rows.append(
                    {"w": w, "device": device, "precision": precision, "pairs_equal": bool((got == ref).all()),
                     "null_equal": bool((stacked.passes == null).all())}
                )  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="toy sizes: checks it runs; the figures mean nothing")
    parser.add_argument("--check", action="store_true", help="decisions against the numpy reference, every device")
    args = parser.parse_args(argv)
    print(json.dumps(check() if args.check else kernel_results(args.quick), indent=2))


if __name__ == "__main__":
    main()
