"""``semprobe bench``: each figure beside its floor, the bare operation measured in the same run."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from contextlib import contextmanager, nullcontext

import numpy as np
import pyarrow.parquet as pq
import torch
from scipy.stats import pearsonr
from threadpoolctl import threadpool_limits

from semprobe.actors.extractor import normalise
from semprobe.actors.zoo import load_model
from semprobe.analysis import kernels
from semprobe.analysis.affine import JointGram, fit_affine
from semprobe.analysis.similarity import add_gram
from semprobe.analysis.twovtwo import permutation_null, two_vs_two
from semprobe.datasets.decode import decode_image, read_bytes
from semprobe.datasets.images import resolve_images
from semprobe.ray_jobs.config import ExtractConfig
from semprobe.ray_jobs.extraction import run_extract


def bare_forward(model: str, images: str, batch_size: int, min_images: int = 128) -> tuple[float, int]:
    """Images/s of the model's plain forward pass on the decoded images, all cores, no capture."""
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    loaded = load_model(model)
    module, pre = loaded.module, loaded.preprocess
    uris = resolve_images(images).images["uri"].to_pylist()
    pixels = np.stack([decode_image(read_bytes(u), **pre.decode_args()) for u in uris])
    cpu = torch.device("cpu")
    batches = [normalise(pixels[i : i + batch_size], pre, cpu) for i in range(0, len(pixels), batch_size)]
    with torch.inference_mode():
        module(batches[0])  # warm-up
        n, start = 0, time.perf_counter()
        while n < max(min_images, len(pixels)):
            for x in batches:
                module(x)
                n += len(x)
        return n / (time.perf_counter() - start), len(pixels)


def bench_extract(args: argparse.Namespace) -> dict:
    # --quick: the floor is one pass over the images, as the extraction makes (the full run repeats them to 128)
    forward_rate, n_images = bare_forward(args.model, args.images, args.batch_size, min_images=0 if args.quick else 128)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or os.path.join(tmp, "extract")
        cfg = ExtractConfig(
            images=args.images,
            model=args.model,
            out=out,
            layers="activations",
            batch_size=args.batch_size,
            shard_size=args.batch_size * 2,
        ).validate()
        summary = run_extract(cfg, log=lambda m: None)
    rate = summary.get("steady_images_per_second") or summary["images_per_second"]
    result = {
        "benchmark": "extract",
        "device": "cuda" if torch.cuda.is_available() else "cpu",  # the extraction actor's (pick_device)
        "model": args.model,
        "images": args.images,
        "n_images": n_images,
        "batch_size": args.batch_size,
        "layers": summary["n_layers"],
        "cpus": len(os.sched_getaffinity(0)),
        "gpus": torch.cuda.device_count(),
        "figure_images_per_s": rate,
        "floor_images_per_s": round(forward_rate, 3),
        "ratio": round(rate / forward_rate, 3),
        "target_ratio": 0.5,
        "end_to_end_images_per_s": summary["images_per_second"],
        "end_to_end_seconds": summary["seconds"],
    }
    result["rows"] = [
        row(
            f"extract {args.model}, {summary['n_layers']} activation layers, {n_images} images, batch "
            f"{args.batch_size}",
            f"{rate:.2f} img/s",
            f"{forward_rate:.2f} img/s (bare forward)",
            rate / forward_rate,
            ">=",
            0.5,
        )
    ]
    return result


@contextmanager
def _one_thread():
    """BLAS, OpenMP and torch on one thread: the unit of work a Ray task with num_cpus=1 gets."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(before)


THREAD_SETTINGS = {"1 thread": _one_thread, "all cores": nullcontext}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _median_seconds(fn, repeats: int) -> float:
    """Median wall time of ``repeats`` calls of fn, after one warm-up call."""
    fn()
    return float(np.median([_timed(fn) for _ in range(repeats)]))


def _cpu_times() -> tuple[int, int] | None:
    """(idle, total) jiffies of every CPU since boot (Linux), else None."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(t) for t in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return ticks[3] + ticks[4], sum(ticks)


def settle(busy: float = 0.2, limit: float = 60.0) -> float:
    """Wait until the machine's CPUs are at most ``busy`` in use (the last benchmark's Ray actors and workers
    wind down in the background for seconds, and a multi-threaded product beside them runs many times slower),
    at most ``limit`` seconds; returns the seconds waited."""
    started = time.monotonic()
    before = _cpu_times()
    while before is not None and time.monotonic() - started < limit:
        time.sleep(0.5)
        after = _cpu_times()
        idle, total = after[0] - before[0], after[1] - before[1]
        if total and 1 - idle / total <= busy:
            break
        before = after
    return time.monotonic() - started


def row(
    benchmark: str,
    figure: str,
    floor: str,
    ratio: float | None,
    op: str | None,
    target: float | None,
    device: str | None = None,
) -> dict:
    """One line of the benchmark table: the figure beside its floor, their ratio and the target it must meet;
    ``device`` where it ran (default: its benchmark's)."""
    return {
        "benchmark": benchmark,
        "device": device,
        "figure": figure,
        "floor": floor,
        "ratio": None if ratio is None else _sig(ratio),
        "target": None if target is None else f"{op} {target:g}",
        "met": None if target is None else bool(ratio >= target if op == ">=" else ratio <= target),
    }


def table_rows(result: dict) -> list[dict]:
    """A benchmark's rows, each naming its device (the benchmark's unless the row says)."""
    return [{**r, "device": r["device"] or result["device"]} for r in result["rows"]]


def markdown(rows: list[dict]) -> str:
    lines = ["| benchmark | device | figure | floor | ratio | target | met |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3g}"
        met = {True: "yes", False: "**no**", None: "-"}[r["met"]]
        lines.append(
            f"| {r['benchmark']} | {r.get('device') or '-'} | {r['figure']} | {r['floor']} | {ratio} | "
            f"{r['target'] or '-'} | {met} |"
        )
    return "\n".join(lines)


def _sig(x: float) -> float:
    """x to 4 significant figures."""
    return float(f"{x:.4g}")


def similarity_pair(w: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Image- and word-side (w, w) float64 correlation matrices of 300-d features sharing a component."""
    rng = np.random.default_rng(seed)
    shared = rng.standard_normal((w, 300))
    return tuple(np.corrcoef(0.5 * shared + rng.standard_normal((w, 300))) for _ in range(2))


def naive_pair(a: np.ndarray, b: np.ndarray, i: int, j: int) -> bool:
    """The original authors' 2 vs. 2 of pair (i, j): four scipy Pearson r's of the rows without columns i, j."""
    keep = np.ones(len(a), bool)
    keep[[i, j]] = False
    a_i, a_j, b_i, b_j = a[i, keep], a[j, keep], b[i, keep], b[j, keep]
    r = lambda x, y: pearsonr(x, y).statistic  # noqa: E731
    return r(a_i, b_i) + r(a_j, b_j) > r(a_i, b_j) + r(a_j, b_i)


def bench_twovtwo(args: argparse.Namespace) -> dict:
    rows = []
    for w in args.sizes:
        a, b = similarity_pair(w)
        n_pairs = w * (w - 1) // 2
        pick = np.random.default_rng(0).choice(n_pairs, min(args.pairs, n_pairs), replace=False)
        pairs = np.stack(np.triu_indices(w, 1), axis=1)[pick]
        result = two_vs_two(a, b)
        for threads, limit in THREAD_SETTINGS.items():
            with limit():
                seconds = _median_seconds(lambda a=a, b=b: two_vs_two(a, b), 3)
                floor = _median_seconds(lambda a=a, b=b: a @ b, 5)
                start = time.perf_counter()
                naive = [naive_pair(a, b, i, j) for i, j in pairs]
                per_pair = (time.perf_counter() - start) / len(pairs)
            rows.append(
                {
                    "w": w,
                    "threads": threads,
                    "n_pairs": n_pairs,
                    "accuracy": round(result.accuracy, 4),
                    "two_vs_two_s": _sig(seconds),
                    "floor_matmul_s": _sig(floor),
                    "ratio": _sig(seconds / floor),
                    "naive_ms_per_pair": _sig(per_pair * 1e3),
                    "naive_extrapolated_s": _sig(per_pair * n_pairs),
                    "speedup": _sig(per_pair * n_pairs / seconds),
                    "naive_pairs": len(pairs),
                    "naive_agree": int(sum(n == result.passed[i, j] for n, (i, j) in zip(naive, pairs))),
                }
            )
    table = []
    for r in rows:
        name = f"two_vs_two w={r['w']}, {r['threads']}"
        table.append(
            row(
                name,
                f"{r['two_vs_two_s'] * 1e3:.3g} ms",
                f"{r['floor_matmul_s'] * 1e3:.3g} ms (one w x w x w matmul)",
                r["ratio"],
                "<=",
                3 if r["w"] == 838 else None,
            )
        )
        table.append(
            row(
                f"{name}: speedup on the naive pearsonr loop",
                f"{r['two_vs_two_s'] * 1e3:.3g} ms",
                f"{r['naive_extrapolated_s']:.4g} s (naive loop, {r['naive_agree']}/{r['naive_pairs']} pairs agree)",
                r["speedup"],
                ">=",
                1000,
            )
        )
    return {
        "benchmark": "twovtwo",
        "device": "cpu (numpy)",
        "cpus": len(os.sched_getaffinity(0)),
        "target_ratio_w838": 3,
        "target_speedup": 1000,
        "results": rows,
        "rows": table,
    }


PAPER_SETS = 5  # NN2021's null: every permutation meets the layer's 5 image sets' matrices


def bench_permutations(args: argparse.Namespace) -> dict:
    a, b = similarity_pair(args.w)
    n = args.permutations
    out = np.empty_like(a)
    rows = []
    # numpy (the reference) on one thread and on all cores; the torch kernels the jobs run, on all cores, for one
    # image matrix and as the paper's null runs (5 sets' matrices per permutation, n / 5 permutations: n products)
    sets = [a] + [similarity_pair(args.w, seed)[0] for seed in range(1, PAPER_SETS)]
    for (threads, limit), device, k in [
        *((t, None, 1) for t in THREAD_SETTINGS.items()),
        (("all cores", nullcontext), "cpu", 1),
        (("all cores", nullcontext), "cpu", PAPER_SETS),
    ]:
        n_perm = max(1, n // k)
        with limit():
            null = permutation_null if device is None else kernels.permutation_null
            null(sets[:k], b, 1, seed=0)  # warm-up
            start = time.perf_counter()
            null(sets[:k], b, n_perm, seed=0)
            seconds = time.perf_counter() - start
            np.matmul(a, b, out=out)
            start = time.perf_counter()
            for _ in range(n_perm * k):
                np.matmul(a, b, out=out)
            floor = time.perf_counter() - start
        rows.append(
            {
                "threads": threads,
                "kernel": "numpy" if device is None else "torch",
                "sets": k,
                "permutations": n_perm,
                "permutation_null_s": _sig(seconds),
                "ms_per_permutation": _sig(seconds / n_perm * 1e3),
                "floor_matmuls_s": _sig(floor),
                "floor_ms_per_matmul": _sig(floor / (n_perm * k) * 1e3),
                "ratio": _sig(seconds / floor),
            }
        )
    table = [
        row(
            f"permutation_null w={args.w}, {r['permutations']} permutations"
            + (f" x {r['sets']} image sets (the paper's null)" if r["sets"] > 1 else "")
            + f", {r['kernel']}, {r['threads']}",
            f"{r['permutation_null_s']:.4g} s",
            f"{r['floor_matmuls_s']:.4g} s ({r['permutations'] * r['sets']} w x w x w matmuls)",
            r["ratio"],
            "<=",
            2,
        )
        for r in rows
    ]
    return {
        "benchmark": "permutations",
        "device": "cpu",
        "w": args.w,
        "permutations": n,
        "cpus": len(os.sched_getaffinity(0)),
        "target_ratio": 2,
        "results": rows,
        "rows": table,
    }


THESIS_WIDTHS = [1024, 1280, 1536, 1792, 2048, 2048, 2560, 3072, 4096, 4320]  # N = 10 CNNs, widths as in the thesis


def synthetic_gram(widths: list[int], n: int, seed: int = 0) -> JointGram:
    """A valid joint Gram (positive definite, a ones column) of the given widths, without n x D features."""
    g = JointGram([f"cnn{i}" for i in range(len(widths))], widths)
    d = g.gram.shape[0] - 1
    r = np.random.default_rng(seed).standard_normal((d, 200))
    block = add_gram(np.eye(d), r.T / np.sqrt(200))  # I + r r^T / 200, not numpy's r @ r.T: it crashes at d ~ 20,000
    g.gram[:d, :d] = n * block
    g.gram[-1, :d] = g.gram[:d, -1] = 0.01 * n
    g.gram[-1, -1] = n
    return g


def bench_affine(args: argparse.Namespace) -> dict:
    names = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
    widths, batch = [1280, 1280, 1280], args.batch_size * 8
    rng = np.random.default_rng(0)
    feats = [rng.standard_normal((batch, w)).astype(np.float32) for w in widths]
    gram = JointGram(names, widths)
    d = gram.gram.shape[0]
    z, z2 = rng.standard_normal((batch, d)), rng.standard_normal((batch, d))
    flops = 2 * batch * d * d
    accumulate = _median_seconds(lambda: gram.add(feats), 5)
    floor = _median_seconds(lambda: z.T @ z2, 5)
    start = time.perf_counter()
    widths_solve = args.widths or THESIS_WIDTHS
    big = synthetic_gram(widths_solve, n=1_281_167)
    for source in big.names:
        fit_affine(big, source, [t for t in big.names if t != source])
    solve = time.perf_counter() - start
    n_maps = len(widths_solve) * (len(widths_solve) - 1)
    result = {
        "benchmark": "affine",
        "device": "cpu",
        "cpus": len(os.sched_getaffinity(0)),
        "gram_width": d,
        "batch": batch,
        "accumulate_gflops": _sig(flops / accumulate / 1e9),
        "floor_matmul_gflops": _sig(flops / floor / 1e9),
        "ratio": _sig(floor / accumulate),
        "target_ratio": 0.5,
        "solve_widths": widths_solve,
        "solve_maps": n_maps,
        "solve_s": _sig(solve),
        "solve_s_per_map": _sig(solve / n_maps),
    }
    result["rows"] = [
        row(
            f"joint Gram accumulation, width {d}, batch {batch}",
            f"{result['accumulate_gflops']:.1f} GFLOP/s",
            f"{result['floor_matmul_gflops']:.1f} GFLOP/s (float64 matmul of the same shape)",
            floor / accumulate,
            ">=",
            0.5,
        ),
        row(
            f"solve all {n_maps} maps, N = {len(widths_solve)}, widths {min(widths_solve)}-{max(widths_solve)}",
            f"{solve:.1f} s ({solve / n_maps:.2f} s/map)",
            "-",
            None,
            None,
            None,
        ),
    ]
    return result


def bench_attack(args: argparse.Namespace) -> dict:
    """The MIM attack's cost per image-iteration (the whole attacker call: the attack, the 8-bit
    projection, the clean and final predictions) against a bare forward+backward of the same batch."""
    from semprobe.actors.attack import SPACES, TargetedAttacker

    cpus = len(os.sched_getaffinity(0))
    attacker = TargetedAttacker(
        args.model, "[-1,1]", eps=0.3, step=0.06, steps=args.steps, momentum=1.0, device="cpu", threads=cpus
    )
    pre, module = attacker.preprocess, attacker.fmodel._model
    uris = resolve_images(args.images).images["uri"].to_pylist()
    pixels = np.stack(
        [decode_image(read_bytes(uris[i % len(uris)]), **pre.decode_args()) for i in range(args.batch_size)]
    )
    targets = np.random.default_rng(0).integers(0, 1000, args.batch_size)
    attacker(pixels[:2], targets[:2])  # warm-up

    low, high = SPACES["[-1,1]"]
    x0 = attacker.to_space(torch.from_numpy(pixels).permute(0, 3, 1, 2).float())
    mean = torch.tensor([low + (high - low) * m for m in pre.mean]).view(1, 3, 1, 1)
    std = torch.tensor([(high - low) * s for s in pre.std]).view(1, 3, 1, 1)
    target = torch.as_tensor(targets)

    def forward_backward():
        x = x0.clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(module((x - mean) / std), target, reduction="sum")
        torch.autograd.grad(loss, x)

    def floor_run():
        for _ in range(args.steps):
            forward_backward()

    forward_backward()
    # interleaved repeats, the median of each: the two share whatever else the machine is doing
    floors, figures, results = [], [], []
    for _ in range(args.repeats):
        floors.append(_timed(floor_run) / (args.steps * args.batch_size))
        figures.append(_timed(lambda: results.append(attacker(pixels, targets))) / (args.steps * args.batch_size))
    floor, figure = float(np.median(floors)), float(np.median(figures))
    result = {
        "benchmark": "attack",
        "device": "cpu",
        "model": args.model,
        "cpus": cpus,
        "gpus": torch.cuda.device_count(),
        "batch_size": args.batch_size,
        "steps": args.steps,
        "repeats": args.repeats,
        "figure_ms_per_image_iteration": _sig(1e3 * figure),
        "floor_ms_forward_backward_per_image": _sig(1e3 * floor),
        "ratio": _sig(figure / floor),
        "target_ratio": 1.3,
        "reached_target": int(np.count_nonzero(results[-1]["predicted"] == targets)),
    }
    result["rows"] = [
        row(
            f"MIM attack {args.model}, batch {args.batch_size}, {args.steps} steps",
            f"{result['figure_ms_per_image_iteration']:.1f} ms per image-iteration",
            f"{result['floor_ms_forward_backward_per_image']:.1f} ms per image (bare forward+backward)",
            figure / floor,
            "<=",
            1.3,
        )
    ]
    return result


def _plain_training(
    model: str, images: np.ndarray, labels: np.ndarray, batch_size: int, threads: int
) -> tuple[float, dict]:
    """The trainer's steps for one epoch written out as a plain PyTorch loop: (images per second, final state dict)."""
    from semprobe.actors.trainer import to_input

    torch.set_num_threads(threads)
    loaded = load_model(model)
    net = loaded.module.train()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.02, momentum=0.9)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (loaded.preprocess.mean, loaded.preprocess.std))
    order = np.random.default_rng([0, 0]).permutation(len(images))  # the trainer's order for seed 0, epoch 0
    # The trainer's seed for worker 0: the same drop-path draws (a global draw runs one column, a local one all
    # three), so both sides do the same work, step for step.
    torch.manual_seed(0)
    start = time.perf_counter()
    for step in range(len(images) // batch_size):
        idx = np.sort(order[step * batch_size : (step + 1) * batch_size])
        loss = torch.nn.functional.cross_entropy(
            net(to_input(torch.from_numpy(images[idx]), mean, std)), torch.from_numpy(labels[idx])
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return len(images) / (time.perf_counter() - start), net.state_dict()


def bench_train(args: argparse.Namespace) -> dict:
    """Training throughput of the model through Ray Train (one worker, every core) against the same steps
    in a plain PyTorch loop in this process (the floor) and in a bare Ray task (what being a Ray worker
    process costs), on the same synthetic CIFAR-100 images and batch; interleaved repeats, medians."""
    import ray

    from semprobe.datasets import cifar
    from semprobe.ray_jobs.checkpoints import checkpoints
    from semprobe.ray_jobs.config import TrainConfig
    from semprobe.ray_jobs.startup import connect
    from semprobe.ray_jobs.storage import Output
    from semprobe.ray_jobs.train import run_train

    cpus = len(os.sched_getaffinity(0))
    n = args.batch_size * args.steps
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 100, n)
    connect(lambda m: None)
    in_task = ray.remote(num_cpus=cpus)(_plain_training)
    rates = {"plain": [], "ray_task": [], "ray_train": []}
    apart = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        data = cifar.write(tmp, (images, labels), (images[:100], labels[:100]))
        for r in range(args.repeats):
            settle()
            rate, plain_state = _plain_training(args.model, images, labels, args.batch_size, cpus)
            rates["plain"].append(rate)
            settle()
            rates["ray_task"].append(ray.get(in_task.remote(args.model, images, labels, args.batch_size, cpus))[0])
            settle()
            cfg = TrainConfig(
                data=f"cifar100:{data}",
                model=args.model,
                epochs=1,
                batch_size=args.batch_size,
                torch_threads=cpus,
                cpus_per_worker=cpus,
                out=os.path.join(tmp, f"run-{r}"),
            ).validate()
            run_train(cfg, log=lambda m: None)
            seconds = pq.read_table(os.path.join(cfg.out, "training.parquet"))["epoch_seconds"][
                -1
            ].as_py()  # the steps alone
            rates["ray_train"].append(n / seconds)
            trained = torch.load(checkpoints(Output(cfg.out), cfg.run_name)[-1]["path"] + "/model.pt")
            # How far the two models ended apart: 0 when both sides ran the same steps.
            apart = max([apart] + [float((trained[k].float() - v.float()).abs().max()) for k, v in plain_state.items()])
    plain, task, figure = (float(np.median(rates[k])) for k in ("plain", "ray_task", "ray_train"))
    result = {
        "benchmark": "train",
        "device": "cpu",
        "model": args.model,
        "cpus": cpus,
        "gpus": torch.cuda.device_count(),
        "batch_size": args.batch_size,
        "steps": args.steps,
        "repeats": args.repeats,
        "figure_ray_train_images_per_s": _sig(figure),
        "floor_plain_loop_images_per_s": _sig(plain),
        "plain_loop_in_a_ray_task_images_per_s": _sig(task),
        "overhead": _sig(plain / figure - 1),
        "target_overhead": 0.10,
        "max_weight_difference": apart,
        "rates": {k: [_sig(v) for v in vs] for k, vs in rates.items()},
    }
    result["rows"] = [
        row(
            f"train {args.model} through Ray Train, batch {args.batch_size}, {args.steps} steps, median of "
            f"{args.repeats} "
            f"(the plain loop in a bare Ray task: {task:.1f} img/s)",
            f"{figure:.1f} img/s",
            f"{plain:.1f} img/s (plain PyTorch loop)",
            figure / plain,
            ">=",
            round(1 / 1.1, 3),
        )
    ]
    return result


def real_matrices(images: str, model: str = "efficientnet_lite0", word_model: str = "glove-50d"):
    """The (w, w) similarity matrices of a real run, without Ray: ``model``'s blocks on one image per concept of
    ``images`` that ``word_model`` has a word for, and that word model's matrix over the same concepts."""
    from semprobe.actors.extractor import ActivationExtractor
    from semprobe.analysis.scores import word_matrix
    from semprobe.analysis.similarity import correlation_matrix
    from semprobe.datasets.concepts import match_concepts
    from semprobe.datasets.words import load_word_model

    source = resolve_images(images)
    words = load_word_model(word_model)
    match = match_concepts(source.classes, source.class_space, [words])
    table = source.images.to_pylist()
    first = {}
    for r in sorted(table, key=lambda r: r["image_id"]):
        first.setdefault(r["concept_id"], r["uri"])
    concepts = [c for c in match.concept_ids if c in first]
    lemma = dict(zip(match.table["concept_id"].to_pylist(), match.table["word"].to_pylist()))
    extractor = ActivationExtractor(
        model, "blocks", dtype="float32", device="cpu", threads=len(os.sched_getaffinity(0))
    )
    pre = extractor.preprocess
    rows = {layer.name: [] for layer in extractor.layers}
    for lo in range(0, len(concepts), 32):
        pixels = np.stack([decode_image(read_bytes(first[c]), **pre.decode_args()) for c in concepts[lo : lo + 32]])
        out = extractor({"pixels": pixels})
        for name in rows:
            rows[name].append(out[name])
    matrices = [correlation_matrix(np.concatenate(rows[name])) for name in rows]
    return matrices, word_matrix(words.vectors([lemma[c] for c in concepts])).astype(np.float64)


# --quick: the end-to-end runs at three of Lite0's blocks (early, middle, late) rather than all 16
QUICK_RUN_LAYERS = "blocks.1.0.bn3,blocks.3.1.add,blocks.5.1.add"


def _timed_run(images: str, store: str, out: str, permutations: int, layers: str | None = None) -> float:
    from semprobe.ray_jobs.config import RunConfig
    from semprobe.ray_jobs.run import run

    given = {"layers": layers} if layers else {}
    cfg = RunConfig(images=images, out=out, store=store, permutations=permutations, **given).validate()
    start = time.perf_counter()
    run(cfg, log=lambda m: None)
    return time.perf_counter() - start


def bench_analysis(args: argparse.Namespace) -> dict:
    """The statistics on every device present (:mod:`semprobe.ray_jobs.kernel_bench`: the stacked permutation
    product's rate against the plain matmul rate, fp64 and fp32), the fraction of pairs fp32 rechecks on real
    activations, and ``semprobe run --store similarity`` end to end against ``--store activations``."""
    from semprobe.analysis.kernels import stacked_two_vs_two
    from semprobe.ray_jobs.kernel_bench import kernel_results

    results = kernel_results(args.quick)
    table = []
    for r in results:
        table.append(
            row(
                f"stacked 2 vs. 2 null on {r['device']} ({r['device_name']}), {r['precision']}: w={r['w']}, "
                f"{r['images']} image x {r['words']} word matrices x {r['permutations']} permutations",
                f"{r['tflops'] * 1e3:.4g} GFLOP/s",
                f"{r['plain_tflops'] * 1e3:.4g} GFLOP/s (plain {r['precision']} matmul of the stacked shape)",
                r["ratio"],
                ">=",
                0.6,
                r["device"],
            )
        )
    if not torch.cuda.is_available():
        for precision in ("fp64", "fp32"):
            table.append(row(f"stacked 2 vs. 2 null, {precision}", "no GPU", "no GPU", None, None, None, "GPU"))
    images = args.images
    matrices, word = real_matrices(images)
    n_perm = 5 if args.quick else 50
    fp32 = stacked_two_vs_two(matrices, [word], n_perm, seed=0, precision="fp32")
    fp64 = stacked_two_vs_two(matrices, [word], n_perm, seed=0, precision="fp64")
    agree = bool((fp32.passes == fp64.passes).all())
    fraction = fp32.rechecked / fp32.decided
    table.append(
        row(
            f"fp32 pairs rechecked in fp64, efficientnet_lite0 blocks on {images} ({len(word)} concepts, "
            f"{len(matrices)} layers, {n_perm} permutations; passes equal to fp64: {'yes' if agree else 'NO'})",
            f"{fraction:.3%} ({fp32.rechecked} of {fp32.decided})",
            "-",
            None,
            None,
            None,
        )
    )
    result = {
        "benchmark": "analysis",
        "device": ", ".join(sorted({r["device"] for r in results})),
        "kernels": results,
        "real": {"images": images, "concepts": len(word), "layers": len(matrices), "permutations": n_perm,
                 "rechecked": fp32.rechecked, "decided": fp32.decided, "fraction": fraction, "agree": agree},
    }  # fmt: skip
    settle()
    layers = QUICK_RUN_LAYERS if args.quick else None
    with tempfile.TemporaryDirectory() as tmp:
        seconds = {
            store: _timed_run(images, store, os.path.join(tmp, store), 20 if args.quick else 1000, layers)
            for store in ("activations", "similarity")
        }
    result["store_seconds"], result["run_layers"] = seconds, layers  # None: the run's default layers
    table.append(
        row(
            f"semprobe run --images {images}{' --layers ' + layers if layers else ''}, --store similarity against "
            f"activations (end to end, "
            f"{torch.cuda.device_count()} GPU)",
            f"{seconds['similarity']:.1f} s",
            f"{seconds['activations']:.1f} s (--store activations)",
            seconds["activations"] / seconds["similarity"],
            None,
            None,
        )
    )
    result["rows"] = table
    return result


def synthetic_word_file(path: str, megabytes: float, dim: int = 300, seed: int = 0) -> list[str]:
    """A fastText (word2vec text) file of about ``megabytes`` MB: '<n> <dim>', then 'wNNNNNNN v1 ... vdim' lines of
    5-decimal values; returns its words in file order."""
    rng = np.random.default_rng(seed)
    pool = np.array([f"{v:.5f}" for v in rng.standard_normal(4096)], dtype=object)
    line_bytes = 9 + dim * 8  # a word, then ' -0.12345' per value on average
    n_words = max(10, int(megabytes * 1e6 / line_bytes))
    words = [f"w{i:07d}" for i in range(n_words)]
    with open(path, "w") as f:
        f.write(f"{n_words} {dim}\n")
        for lo in range(0, n_words, 4096):
            chunk = words[lo : lo + 4096]
            values = pool[rng.integers(0, len(pool), (len(chunk), dim))]
            f.write("".join(w + " " + " ".join(v) + "\n" for w, v in zip(chunk, values)))
    return words


def bench_words(args: argparse.Namespace) -> dict:
    """What a job's planning asks of a word file, on a generated fastText text file of ``--words-mb`` MB: load
    the model and look up 1000 present and 1000 absent words, scanning the text (no cache: an absent word reads
    the whole file) against mapping its conversion (``--word-cache``: converted once, timed apart)."""
    from semprobe.datasets import words as words_module
    from semprobe.datasets.words import convert_word_file, load_word_model

    megabytes = args.words_mb or (2 if args.quick else 200)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "words.vec")
        words = synthetic_word_file(path, megabytes)
        rng = np.random.default_rng(1)
        present = [words[i] for i in rng.choice(len(words), min(1000, len(words)), replace=False)]
        query = present + [f"absent{i}" for i in range(1000)]
        name = f"fasttext:{path}"

        def lookups(model_name: str) -> None:
            words_module._LOADED.clear()  # a new process: nothing remembered
            model = load_word_model(model_name)
            assert model.contains(query).sum() == len(present)
            model.vectors(present)

        scan = _median_seconds(lambda: lookups(name), args.repeats)
        dest = os.path.join(tmp, "converted")
        conversion = _timed(lambda: convert_word_file(name, dest))
        mapped = _median_seconds(lambda: lookups(f"table:{dest}"), args.repeats)
        size = os.path.getsize(path)
    return {
        "benchmark": "words",
        "device": "CPU",
        "file_mb": round(size / 1e6, 1),
        "n_words": len(words),
        "dim": 300,
        "lookups": len(query),
        "scan_s": scan,
        "conversion_s": conversion,
        "mapped_s": mapped,
        "rows": [
            row(
                f"word model load + {len(query)} lookups (half absent) on a {size / 1e6:.0f} MB fastText text file "
                f"({len(words)} words x 300): its memory-mapped conversion (converted once in {conversion:.1f} s)",
                f"{mapped * 1e3:.1f} ms",
                f"{scan:.2f} s (scan of the text)",
                scan / mapped,
                ">=",
                10,
            )
        ],
    }


BENCHMARKS = {
    "extract": bench_extract,
    "twovtwo": bench_twovtwo,
    "permutations": bench_permutations,
    "analysis": bench_analysis,
    "affine": bench_affine,
    "attack": bench_attack,
    "train": bench_train,
    "words": bench_words,
}

# --quick: every benchmark at toy sizes, to check the suite runs (a minute or two); its figures mean nothing
QUICK = {"sizes": [30], "pairs": 20, "w": 30, "permutations": 20, "steps": 2, "repeats": 1, "widths": [64, 96, 128]}


def with_defaults(name: str, args: argparse.Namespace) -> argparse.Namespace:
    """The options of one benchmark: what was given, else its own defaults (training: FractalNet at the paper's
    batch)."""
    a = argparse.Namespace(**vars(args))
    if a.quick:
        for k, v in QUICK.items():
            setattr(a, k, getattr(a, k) if getattr(a, k) is not None else v)
    cifar = name == "train"
    a.model = a.model or (("fractalnet_tiny" if a.quick else "fractalnet") if cifar else "efficientnet_lite0")
    a.batch_size = a.batch_size or ((10 if a.quick else 100) if cifar else (2 if a.quick else 32))
    a.steps = a.steps or (30 if cifar else 10)  # training: enough steps that warm-up weighs little
    a.sizes, a.pairs, a.w = a.sizes or [166, 838, 2000], a.pairs or 300, a.w or 838
    a.permutations, a.repeats = a.permutations or 1000, a.repeats or 3
    return a


def machine() -> dict:
    """Where the figures were measured."""
    import platform

    import ray

    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        platform.processor(),
    )
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpu": cpu,
        "cpus": len(os.sched_getaffinity(0)),
        "gpus": torch.cuda.device_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "numpy": np.__version__,
    }


def bench_all(args: argparse.Namespace, log=print) -> dict:
    """Every benchmark in one run; writes RESULTS/bench.json and RESULTS/bench.md (one table, every figure
    beside its floor)."""
    results = []
    for name, fn in BENCHMARKS.items():
        waited = settle()
        log(f"bench {name} ..." + (f" (after {waited:.0f} s for the machine to settle)" if waited >= 1 else ""))
        started = time.perf_counter()
        results.append({**fn(with_defaults(name, args)), "seconds": round(time.perf_counter() - started, 1)})
    report = {
        "benchmark": "all",
        "quick": bool(args.quick),
        "machine": machine(),
        "results": results,
        "rows": [r for result in results for r in table_rows(result)],
    }
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, "bench.json"), "w") as f:
        json.dump(report, f, indent=2)
    m = report["machine"]
    header = (
        f"Measured {m['date']} on {m['cpus']} x {m['cpu']}, {m['gpus']} GPU; torch {m['torch']}, ray {m['ray']}"
        f"{' (--quick: toy sizes, the figures mean nothing)' if args.quick else ''}. Reproduce: `semprobe bench all"
        f"{' --images ' + args.images if args.images != 'sample:imagenet' else ''}`.\n\n"
    )
    from semprobe.ray_jobs.scaling import projection

    with open(os.path.join(args.results, "bench.md"), "w") as f:
        f.write(header + markdown(report["rows"]) + "\n\n" + projection(report) + "\n")
    return report
