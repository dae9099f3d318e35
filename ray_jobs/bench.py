"""``semprobe bench``: each figure beside its floor, the bare operation measured in the same run."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch

from actors.extractor import normalise
from actors.zoo import load_model
from datasets.decode import decode_image, read_bytes
from datasets.images import resolve_images
from ray_jobs.config import ExtractConfig
from ray_jobs.extract import run_extract


def bare_forward(model: str, images: str, batch_size: int, min_images: int = 128) -> tuple[float, int]:
    """Images/s of the model's plain forward pass on the decoded images, all cores, no capture."""
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    loaded = load_model(model)
    module, pre = loaded.module, loaded.preprocess
    uris = resolve_images(images).images["uri"].to_pylist()
    pixels = np.stack([decode_image(read_bytes(u), pre.size, pre.resize_size, pre.interpolation) for u in uris])
    cpu = torch.device("cpu")
    batches = [normalise(pixels[i:i + batch_size], pre, cpu) for i in range(0, len(pixels), batch_size)]
    with torch.inference_mode():
        module(batches[0])  # warm-up
        n, start = 0, time.perf_counter()
        while n < max(min_images, len(pixels)):
            for x in batches:
                module(x)
                n += len(x)
        return n / (time.perf_counter() - start), len(pixels)


def bench_extract(args: argparse.Namespace) -> int:
    forward_rate, n_images = bare_forward(args.model, args.images, args.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or os.path.join(tmp, "extract")
        cfg = ExtractConfig(images=args.images, model=args.model, out=out, layers="activations",
                            batch_size=args.batch_size, shard_size=args.batch_size * 2).validate()
        summary = run_extract(cfg, log=lambda m: None)
    rate = summary.get("steady_images_per_second") or summary["images_per_second"]
    result = {
        "benchmark": "extract", "model": args.model, "images": args.images, "n_images": n_images,
        "batch_size": args.batch_size, "layers": summary["n_layers"], "cpus": len(os.sched_getaffinity(0)),
        "gpus": torch.cuda.device_count(), "figure_images_per_s": rate, "floor_images_per_s": round(forward_rate, 3),
        "ratio": round(rate / forward_rate, 3), "target_ratio": 0.5,
        "end_to_end_images_per_s": summary["images_per_second"], "end_to_end_seconds": summary["seconds"],
    }
    print(json.dumps(result, indent=2))
    print(
        f"\n| benchmark | figure | floor (bare forward) | ratio | target |\n|---|---|---|---|---|\n"
        f"| extract {args.model}, {summary['n_layers']} activation layers, {n_images} images | {rate:.2f} img/s "
        f"| {forward_rate:.2f} img/s | {result['ratio']:.2f} | >= 0.5 |"
    )
    return 0


BENCHMARKS = {"extract": bench_extract}
